"""Benchmarks (raytrain bench ...)."""
