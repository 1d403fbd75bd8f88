"""Benchmarks: each `bench_*.py` runs our code and its peer in one process and prints the ratio."""
