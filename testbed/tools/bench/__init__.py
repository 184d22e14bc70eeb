"""Benchmarks (`./tb bench.<name>`): measured numbers against the project's targets."""
