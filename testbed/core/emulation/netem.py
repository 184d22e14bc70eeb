"""The kernel backend: netem for delay/jitter/loss, HTB + pfifo for rate/queue.

Inside the emulator node the two ports are joined through an internal veth
pair and two bridges, so each direction crosses two egress interfaces:

    port_a ── bra ── <port_a>i ═veth═ <port_b>i ── brb ── port_b
    up   (a -> b): egress <port_a>i = netem (delay line), egress port_b = HTB + pfifo
    down (b -> a): egress <port_b>i = netem (delay line), egress port_a = HTB + pfifo

The shaping queue stays separate from the delay line: netem gets a huge limit
(it only has to hold rate x delay), the pfifo under HTB is the bottleneck
buffer (the minitopo / simult_flows lesson: a big queue inside netem makes the
RTT grow over time). Jitter without `reorder` uses netem's rate mode at a rate
no link reaches, which makes each departure time at least the previous one's,
so jitter never reorders.

Availability is probed on a scratch veth pair in a scratch network namespace
(unshared by a short-lived thread, so it vanishes with the thread).
"""
from __future__ import annotations

import errno
import os
import platform
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from testbed.core.emulation import register, shaping
from testbed.core.emulation.base import Backend, Direction, EmulatedLink
from testbed.base.errors import TestbedError
from testbed.core.model import LinkParams
from testbed.base.netns import ScratchNetns, run_command, run_in_netns
from testbed.core.emulation.offloads import disable_offloads

NETEM_LIMIT = 1_000_000  # packets: the delay line must never be the queue
NO_REORDER_RATE = "100gbit"  # netem rate mode keeps departures in order
_probe_cache: dict[str, str | None] = {}


def _probe_in_scratch_netns() -> str | None:
    """Try a netem qdisc on a scratch veth; None on success, else the kernel's error."""

    def probe() -> None:
        with IPRoute() as ipr:
            ipr.link("add", ifname="mptbprobe0", kind="veth", peer="mptbprobe1")
            idx = ipr.link_lookup(ifname="mptbprobe0")[0]
            ipr.link("set", index=idx, state="up")
            ipr.tc("add", "netem", index=idx, handle="1:", delay=1000, limit=1000)

    try:
        with ScratchNetns() as scratch:  # the veth goes with the namespace
            scratch.run(probe)
        return None
    except NetlinkError as exc:
        return ("the kernel does not know qdisc kind 'netem'" if exc.code == errno.ENOENT
                else f"netlink error {exc.code}: {os.strerror(exc.code)}")
    except Exception as exc:  # noqa: BLE001 - reported as the reason
        return f"cannot probe in a scratch namespace: {type(exc).__name__}: {exc}"


def _module_on_disk() -> Path | None:
    root = Path("/lib/modules") / platform.release()
    if not root.is_dir():
        return None
    for p in root.rglob("sch_netem.ko*"):
        return p
    return None


def netem_args(p: LinkParams, blackhole: bool = False) -> list[str]:
    """`tc ... netem` arguments for one direction's delay line."""
    args = ["limit", str(NETEM_LIMIT)]
    if p.delay_ms or p.jitter_ms:
        args += ["delay", f"{round(p.delay_ms * 1000)}us"]
        if p.jitter_ms:
            args += [f"{round(p.jitter_ms * 1000)}us"]
    if blackhole:
        args += ["loss", "random", "100%"]
    elif p.gilbert is not None:
        g = p.gilbert
        # iproute2: gemodel p r 1-h 1-k, i.e. P(good->bad), P(bad->good),
        # loss in the bad state, loss in the good state.
        args += ["loss", "gemodel", f"{g.p_pct:g}%", f"{g.r_pct:g}%", f"{g.bad_loss_pct:g}%",
                 f"{g.good_loss_pct:g}%"]
    elif p.loss_pct:
        args += ["loss", "random", f"{p.loss_pct:g}%"]
    if p.jitter_ms and not p.reorder:
        args += ["rate", NO_REORDER_RATE]
    return args


class NetemBackend(Backend):
    """The kernel backend: netem delay line and HTB + pfifo shaping per direction."""
    name = "netem"

    def __init__(self) -> None:
        self._blackholed: dict[tuple[int, str], bool] = {}

    @classmethod
    def check(cls) -> str | None:
        if "result" not in _probe_cache:
            _probe_cache["result"] = cls._diagnose()
        return _probe_cache["result"]

    @classmethod
    def _diagnose(cls) -> str | None:
        if os.geteuid() != 0:
            return "the netem probe needs root (network namespaces, qdiscs): run as root"
        error = _probe_in_scratch_netns()
        if error is None:
            return None
        release = platform.release()
        ko = _module_on_disk()
        if ko is not None:
            return (f"sch_netem not available: the module exists ({ko}) but a netem qdisc "
                    f"failed ({error}); run `modprobe sch_netem` and check dmesg, "
                    "or use backend 'userspace'")
        return (f"sch_netem not available: kernel {release} has no netem qdisc ({error}); "
                f"install the kernel modules package (e.g. linux-modules-extra-{release} "
                "on Ubuntu, kernel-modules-extra on Fedora) or build with "
                "CONFIG_NET_SCH_NETEM, or use backend 'userspace'")

    @staticmethod
    def _internal(link: EmulatedLink, direction: Direction) -> str:
        """The internal veth end whose egress is `direction`'s delay line."""
        return (link.port_a if direction == "up" else link.port_b) + "i"

    def _tc(self, link: EmulatedLink, argv: list[str]) -> None:
        proc = run_command(link.pid, ["tc", *argv])
        if proc.returncode != 0:
            raise TestbedError(f"link {link.name!r}: tc {' '.join(argv)}: "
                               f"{(proc.stderr or proc.stdout).strip().splitlines()[0:1]}")

    def start(self, link: EmulatedLink) -> None:
        ia, ib = self._internal(link, "up"), self._internal(link, "down")

        def build() -> None:
            with IPRoute() as ipr:
                ipr.link("add", ifname=ia, kind="veth", peer=ib)
                for br, members in (("bra", (link.port_a, ia)), ("brb", (ib, link.port_b))):
                    ipr.link("add", ifname=br, kind="bridge")
                    bidx = ipr.link_lookup(ifname=br)[0]
                    ipr.link("set", index=bidx, mtu=link.mtu)
                    for m in members:
                        idx = ipr.link_lookup(ifname=m)[0]
                        ipr.link("set", index=idx, mtu=link.mtu, master=bidx, state="up")
                    ipr.link("set", index=bidx, state="up")

        run_in_netns(link.pid, build)
        disable_offloads(link.pid, [ia, ib])
        for d in ("up", "down"):
            self._tc(link, ["qdisc", "add", "dev", self._internal(link, d), "root", "handle", "1:",
                            "netem", *netem_args(link.params(d))])  # type: ignore[arg-type]
            shaping.install(link, d)  # type: ignore[arg-type]

    def update(self, link: EmulatedLink, direction: Direction, params: LinkParams) -> None:
        old = link.params(direction)
        bh = self._blackholed.get((id(link), direction), False)
        self._tc(link, ["qdisc", "change", "dev", self._internal(link, direction), "root",
                        "handle", "1:", "netem", *netem_args(params, blackhole=bh)])
        if (old.rate_mbit, old.queue_pkts, old.queue_bdp) != (params.rate_mbit, params.queue_pkts,
                                                                params.queue_bdp):
            shaping.change(link, direction, params)

    def set_blackhole(self, link: EmulatedLink, direction: Direction, on: bool) -> None:
        self._blackholed[(id(link), direction)] = on
        self._tc(link, ["qdisc", "change", "dev", self._internal(link, direction), "root",
                        "handle", "1:", "netem", *netem_args(link.params(direction), blackhole=on)])

    def stop(self, link: EmulatedLink) -> None:
        # Everything lives in the emulator's namespace and goes with it.
        for d in ("up", "down"):
            self._blackholed.pop((id(link), d), None)

    def describe(self) -> dict[str, Any]:
        """The backend, kernel release, delay-line and shaping set-up, for the manifest."""
        return {"backend": self.name, "kernel": platform.release(),
                "delay_line": f"netem limit {NETEM_LIMIT}, jitter in order via rate {NO_REORDER_RATE}",
                "shaping": "HTB + pfifo on the egress port"}


register(NetemBackend)
