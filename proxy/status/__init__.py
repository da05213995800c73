"""Workload status: the pure derivation table (`model`), where records are kept
(`store`), and the in-memory view that writes them in order (`workload`)."""
