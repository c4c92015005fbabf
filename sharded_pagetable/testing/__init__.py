"""Helpers for tests, benchmarks and soaks: baselines and fault injection.

The library never imports this package; it exists so the chaos soak and the benchmark
baselines can be shared by ``tests/`` and ``scripts/`` without living in the library.
"""
