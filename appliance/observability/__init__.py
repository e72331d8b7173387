"""Metrics (Prometheus), and later tracing and alert rules."""
