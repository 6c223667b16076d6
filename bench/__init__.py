"""Benchmark harness (fastjanus.bench). Not built yet."""
