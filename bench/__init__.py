"""Latency testing under load: the load generator and the benchmark suite (built with the service)."""
