"""Benchmarks: engine, adapters and trainer against baselines, writing tables, plots and JSON."""
