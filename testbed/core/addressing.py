"""The address plan: one /24 per path, one for the router-server segment.

Every address lives inside the testbed's own namespaces; nothing here is
reachable from (or routed to) the machine's real network.
"""
from __future__ import annotations

from dataclasses import dataclass

SERVER_NET = "10.100.0"
TABLE_BASE = 100  # policy routing table of path i is TABLE_BASE + i


@dataclass(frozen=True)
class PathAddresses:
    index: int  # 1-based path number

    @property
    def subnet(self) -> str:
        return f"10.{self.index}.0.0/24"

    @property
    def client(self) -> str:
        return f"10.{self.index}.0.1"

    @property
    def far(self) -> str:
        """Router (or multihomed server) end of the path."""
        return f"10.{self.index}.0.2"

    @property
    def table(self) -> int:
        return TABLE_BASE + self.index


ROUTER_SERVER_SIDE = f"{SERVER_NET}.1"
SERVER = f"{SERVER_NET}.2"
PREFIX = 24
