"""Watching the target: auth episodes and callbacks (`auth`), health probes (`health`),
Prometheus metrics (`metrics`) and the admin port that serves them (`admin`)."""
