"""Harness layer: scenario files, the runner, the results schema and store,
probes, workloads, campaigns. May use testbed.core, testbed.robe, testbed.mptcp,
testbed.stack and testbed.base."""
