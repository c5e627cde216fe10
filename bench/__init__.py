"""Benchmarks for taskserve against its peers; run `python bench/run.py`."""
