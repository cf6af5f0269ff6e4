"""Benchmarks: datasets, protocols, peers, metrics, reports and the ``divtri`` CLI."""
