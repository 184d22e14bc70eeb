"""The link-emulation interface every backend implements.

An emulated link is an emulator node (its own namespace) with two ports:
port_a faces the client, port_b the server side. "up" is a -> b.
Backends decide what sits between the ports (a bridge, netem qdiscs, our
user-space forwarder); rate and queue are always HTB + pfifo (shaping.py).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from testbed.core.model import LinkParams

Direction = Literal["up", "down"]


@dataclass
class EmulatedLink:
    """One emulated link: the emulator node, its two ports and the parameters per direction."""
    name: str  # path name, or "bottleneck"
    node: Any  # mininet Node hosting the emulation
    port_a: str  # towards the client
    port_b: str  # towards the server / router
    up: LinkParams
    down: LinkParams
    mtu: int = 1500
    state: dict[str, Any] = field(default_factory=dict)  # backend-private

    @property
    def pid(self) -> int:
        """The pid whose namespace holds the emulation."""
        return self.node.pid

    @property
    def rtt_ms(self) -> float:
        """The configured round-trip delay (up + down)."""
        return self.up.delay_ms + self.down.delay_ms

    def params(self, direction: Direction) -> LinkParams:
        """The parameters of one direction."""
        return self.up if direction == "up" else self.down

    def egress_port(self, direction: Direction) -> str:
        """The port a packet of `direction` leaves the emulator by."""
        return self.port_b if direction == "up" else self.port_a


class Backend(abc.ABC):
    """A link-emulation backend: builds, changes and tears down emulated links."""
    name: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def check(cls) -> str | None:
        """None when usable on this machine, else a one-line reason with the fix."""

    @abc.abstractmethod
    def start(self, link: EmulatedLink) -> None:
        """Make the link carry packets with its configured parameters."""

    @abc.abstractmethod
    def update(self, link: EmulatedLink, direction: Direction, params: LinkParams) -> float | None:
        """Change one direction's parameters while traffic flows. Returns when the
        change took effect by the emulator's own clock (time.monotonic()), or None
        where the backend has no such clock (the caller's return time is then the
        best estimate)."""

    @abc.abstractmethod
    def set_blackhole(self, link: EmulatedLink, direction: Direction, on: bool) -> float | None:
        """Drop every packet of `direction` while the interfaces stay up; returns
        as update() does."""

    def stop(self, link: EmulatedLink) -> None:
        """Release what start() created outside the emulator's namespace (if any)."""

    def start_many(self, links: list[EmulatedLink]) -> None:
        """Start several links; backends with slow starts overlap them."""
        for link in links:
            self.start(link)

    def stop_many(self, links: list[EmulatedLink]) -> None:
        """Stop several links; never raises, teardown must go on."""
        for link in links:
            try:
                self.stop(link)
            except Exception:  # noqa: BLE001 - the namespace goes anyway
                pass

    def pids(self) -> list[int]:
        """Processes this backend started (recorded for crash cleanup)."""
        return []

    def describe(self) -> dict[str, Any]:
        """What the backend is and does, for the run manifest."""
        return {"backend": self.name}
