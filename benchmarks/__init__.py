"""Benchmarks: each module writes benchmarks/results/NAME.json."""
