"""Experiment types (one module each, registered by name) and shipped scenarios
(*.toml). Above the harness: may use testbed.harness and every layer below it."""
