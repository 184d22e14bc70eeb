"""The conformance cases, one module per theme; each registers its cases on import.
Part of the conformance tool: may use testbed.tools.conformance, testbed.stack and testbed.base."""
