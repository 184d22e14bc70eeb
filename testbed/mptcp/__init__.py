"""Kernel MPTCP: host configuration, socket options, path-manager netlink."""
