"""mptcp-testbed: multipath Mininet topologies running real kernel MPTCP."""
from testbed.errors import TestbedError
from testbed.model import LinkParams, PathSpec, TopologySpec, HostSettings

__all__ = ["TestbedError", "LinkParams", "PathSpec", "TopologySpec", "HostSettings"]
