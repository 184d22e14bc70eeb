"""The simplest backend: a Linux bridge between the ports, HTB for rate.

It cannot delay or drop packets at random, so it refuses any link that asks
for delay, jitter or loss instead of silently running without them.
"""
from __future__ import annotations

from pyroute2 import IPRoute

from testbed.core.emulation import shaping
from testbed.core.emulation.base import Backend, Direction, EmulatedLink
from testbed.base.errors import TestbedError
from testbed.core.model import LinkParams
from testbed.base.netns import run_in_netns


def refuse_delay_line(backend: str, link: str, params: LinkParams) -> None:
    """TestbedError when a link asks for delay, jitter or loss a backend cannot apply."""
    if params.needs_delay_line():
        raise TestbedError(
            f"link {link!r} asks for delay/jitter/loss but the {backend!r} backend "
            "cannot apply them (use backend 'netem' or 'userspace')"
        )


class BridgeBackend(Backend):
    """Rate and queue only (a bridge, HTB + pfifo): for links without delay or loss."""
    name = "bridge"

    @classmethod
    def check(cls) -> str | None:
        return None

    def start(self, link: EmulatedLink) -> None:
        for d in ("up", "down"):
            refuse_delay_line(self.name, link.name, link.params(d))

        def apply() -> None:
            with IPRoute() as ipr:
                ipr.link("add", ifname="br0", kind="bridge")
                br = ipr.link_lookup(ifname="br0")[0]
                for port in (link.port_a, link.port_b):
                    idx = ipr.link_lookup(ifname=port)[0]
                    ipr.link("set", index=idx, master=br, state="up")
                ipr.link("set", index=br, state="up")

        run_in_netns(link.pid, apply)
        for d in ("up", "down"):
            shaping.install(link, d)  # type: ignore[arg-type]

    def update(self, link: EmulatedLink, direction: Direction, params: LinkParams) -> None:
        refuse_delay_line(self.name, link.name, params)
        shaping.change(link, direction, params)

    def set_blackhole(self, link: EmulatedLink, direction: Direction, on: bool) -> None:
        raise TestbedError("the 'bridge' backend cannot blackhole a link; use 'userspace' or 'netem'")
