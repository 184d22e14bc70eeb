"""Core layer: the topology model, the Testbed that builds it on Mininet, link
emulation, timed events and faults, per-host MPTCP settings, cleanup state.
May use testbed.base and testbed.mptcp."""
