"""Benchmarks run from the CLI (`vlclassify bench ...`)."""
