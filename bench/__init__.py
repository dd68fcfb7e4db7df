"""Benchmarks of adpo-kernels: one harness (``python -m bench``, ``adpo-bench``).

See bench/README.md and docs/benchmarks.md.
"""
