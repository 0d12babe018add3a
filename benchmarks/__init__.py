"""Benchmarks for mettaformat (run as ``python -m benchmarks.bench_container``).

Everything here measures; nothing here is imported by the library.
"""
