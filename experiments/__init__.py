"""Experiment types (one module each, registered by name) and shipped scenarios (*.toml)."""
