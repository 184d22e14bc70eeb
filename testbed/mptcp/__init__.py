"""Kernel MPTCP API layer: socket options (sockopt), the path manager's netlink
commands, events and endpoints (pm), and what Linux does on its own (linux).
May use testbed.base only."""
