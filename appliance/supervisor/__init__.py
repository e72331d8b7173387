"""Model workers as child processes: spawning, readiness, restarts with backoff, keep-alive, queueing."""
