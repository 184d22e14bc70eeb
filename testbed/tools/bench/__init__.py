"""Benchmarks (`./tb bench.<name>`): measured numbers against the project's targets.
Part of the tools layer: may use every layer below it."""
