"""Studies: grouping of received instances, readiness, and scheduling of jobs."""
