"""Benchmarks: real brokers, real node processes, separate publisher processes."""
