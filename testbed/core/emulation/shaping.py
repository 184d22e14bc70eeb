"""Rate and bottleneck queue: HTB with one pfifo leaf, on an egress port.

Kept apart from any delay line, so the queue limit is the bottleneck buffer and
nothing else (a large netem limit behind HTB makes the RTT grow over time).
"""
from __future__ import annotations

from pyroute2 import IPRoute

from testbed.core.emulation.base import Direction, EmulatedLink
from testbed.core.model import LinkParams
from testbed.base.netns import run_in_netns

UNSHAPED_MBIT = 10_000  # HTB still holds the queue when no rate is given


def htb_args(params: LinkParams, mtu: int) -> dict:
    """The HTB class attributes (rate, ceil, bursts, quantum) for params at this MTU."""
    mbit = params.rate_mbit or UNSHAPED_MBIT
    # Burst of ~1 ms at rate (at least two MTUs) keeps HTB accurate at high
    # rates without letting more than a millisecond of bursting through.
    burst = max(2 * (mtu + 14), int(mbit * 1e6 / 8 / 1000))
    rate = f"{mbit * 1000:.0f}kbit"
    return {"rate": rate, "ceil": rate, "burst": burst, "cburst": burst, "quantum": mtu + 14}


def queue_limit(link: EmulatedLink, params: LinkParams) -> int:
    """The link's queue limit in packets for these parameters."""
    return params.queue_limit_pkts(max(link.rtt_ms, 1.0), link.mtu)


def install(link: EmulatedLink, direction: Direction) -> None:
    """Install HTB + pfifo for one direction on its egress port."""
    params = link.params(direction)
    port = link.egress_port(direction)
    limit = queue_limit(link, params)

    def apply() -> None:
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=port)[0]
            ipr.tc("add", "htb", index=idx, handle="1:", default=0x10)
            ipr.tc("add-class", "htb", index=idx, handle="1:10", parent="1:",
                   **htb_args(params, link.mtu))
            ipr.tc("add", "pfifo", index=idx, handle="10:", parent="1:10", limit=limit)

    run_in_netns(link.pid, apply)


def change(link: EmulatedLink, direction: Direction, params: LinkParams) -> None:
    """Change the HTB rate and the pfifo limit of one direction in place."""
    port = link.egress_port(direction)
    limit = queue_limit(link, params)

    def apply() -> None:
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=port)[0]
            ipr.tc("change-class", "htb", index=idx, handle="1:10", parent="1:",
                   **htb_args(params, link.mtu))
            ipr.tc("change", "pfifo", index=idx, handle="10:", parent="1:10", limit=limit)

    run_in_netns(link.pid, apply)
