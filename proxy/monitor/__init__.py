"""Watching the target: auth episodes and callbacks (`auth`), the `--on-unauthorized-exec`
hook (`hooks`), health probes (`health`), Prometheus metrics (`metrics`) and the admin
port that serves them (`admin`)."""
