"""A host's own traffic control on one of its interfaces: shaping both directions.

Not link emulation (that is testbed.core.emulation's job, on the emulator's
ports): this is what an end host can do to its own traffic with the tools Linux
offers, inside its own namespace. Egress: HTB at the rate with a pfifo queue, as
the root qdisc of the interface. Ingress: Linux has no ingress queue, and this
kernel has no `police` action (docs/rate-limit.md), so arriving frames are
redirected (ingress qdisc, u32 match-all, mirred) to an IFB device of the same
namespace whose egress runs the same HTB + pfifo; they re-enter the host's stack
from there, shaped. remove() takes all of it away again (the IFB device too),
and is safe to call twice or after a partial install.

Note: an AF_PACKET socket (the user-space MPTCP stack) sees arriving frames
before the ingress hook, so ingress shaping only acts on what the kernel's own
TCP/MPTCP receives.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from testbed.base.errors import TestbedError
from testbed.base.netns import run_in_netns
from testbed.core.emulation import shaping
from testbed.core.model import LinkParams

# The kernel parts install() uses, each with its kernel config symbol. Asking
# for one that is a module not loaded yet makes the kernel load it, and loading
# `ifb` creates ifb0/ifb1 in the host's root namespace: a host change the testbed
# must not make, so shaping is refused unless each is built in or loaded.
KERNEL_PARTS = {"ifb": "CONFIG_IFB", "act_mirred": "CONFIG_NET_ACT_MIRRED",
                "sch_ingress": "CONFIG_NET_SCH_INGRESS", "cls_u32": "CONFIG_NET_CLS_U32"}
SYS_MODULE = Path("/sys/module")
KERNEL_CONFIG = Path("/proc/config.gz")


def missing_kernel_parts(sys_module: Path = SYS_MODULE, builtin_list: Path | None = None,
                         config: Path | None = KERNEL_CONFIG) -> list[str]:
    """The KERNEL_PARTS neither loaded (/sys/module) nor built in (the kernel's
    modules.builtin list, or =y in its config), in KERNEL_PARTS' order."""
    if builtin_list is None:
        builtin_list = Path("/lib/modules") / os.uname().release / "modules.builtin"
    present = {name for name in KERNEL_PARTS if (sys_module / name).exists()}
    try:
        present |= {Path(line.strip()).name.removesuffix(".ko") for line in builtin_list.read_text().splitlines()}
    except OSError:
        pass  # no list: the config says
    if config is not None:
        try:
            raw = config.read_bytes()
            text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode()
            built_in = {line.split("=")[0] for line in text.splitlines() if line.endswith("=y")}
            present |= {name for name, symbol in KERNEL_PARTS.items() if symbol in built_in}
        except (OSError, EOFError, gzip.BadGzipFile):
            pass
    return [name for name in KERNEL_PARTS if name not in present]


INGRESS_HANDLE = 0xFFFF0000
ETH_P_ALL = 0x0003
MTU = 1500  # the testbed's interfaces


class HostShaper:
    """Shapes one interface of a host (its namespace: a process id) in both directions."""

    def __init__(self, pid: int, ifname: str, ifb_name: str | None = None):
        self.pid, self.ifname = pid, ifname
        self.ifb = ifb_name or f"ifb-{ifname}"[:15]
        self.installed = False

    def install(self, rate_kbit: float, queue_pkts: int) -> None:
        """Shape egress and ingress of the interface to rate_kbit, each with a
        pfifo of queue_pkts; TestbedError (after removing what was made) if the
        kernel refuses a step."""
        if rate_kbit <= 0 or queue_pkts < 1:
            raise TestbedError(f"host shaping: rate {rate_kbit} kbit/s and queue {queue_pkts} "
                               f"packets must be positive")
        missing = missing_kernel_parts()
        if missing:  # asking for them would load them, ifb's devices in the host's namespace
            raise TestbedError(f"host shaping needs {', '.join(missing)} built into the kernel or loaded")
        htb = shaping.htb_args(LinkParams(rate_mbit=rate_kbit / 1000), MTU)  # the emulator's HTB settings

        def apply() -> None:
            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=self.ifname)[0]
                ipr.link("add", ifname=self.ifb, kind="ifb")
                ifb = ipr.link_lookup(ifname=self.ifb)[0]
                ipr.link("set", index=ifb, state="up")
                for dev in (idx, ifb):
                    ipr.tc("add", "htb", index=dev, handle="1:", default=0x10)
                    ipr.tc("add-class", "htb", index=dev, handle="1:10", parent="1:", **htb)
                    ipr.tc("add", "pfifo", index=dev, handle="10:", parent="1:10", limit=queue_pkts)
                ipr.tc("add", "ingress", index=idx, handle=INGRESS_HANDLE)
                ipr.tc("add-filter", "u32", index=idx, parent=INGRESS_HANDLE, target=INGRESS_HANDLE | 1,
                       protocol=ETH_P_ALL, prio=1, keys=["0x0/0x0+0"],
                       action={"kind": "mirred", "direction": "egress", "action": "redirect",
                               "ifindex": ifb})

        self.installed = True
        try:
            run_in_netns(self.pid, apply)
        except (NetlinkError, OSError, IndexError) as exc:
            self.remove()
            raise TestbedError(f"host shaping on {self.ifname}: the kernel refused it ({exc})") from None

    def remove(self) -> None:
        """Take the shaping away: the interface's root and ingress qdiscs, the IFB device."""
        if not self.installed:
            return

        def apply() -> None:
            with IPRoute() as ipr:
                found = ipr.link_lookup(ifname=self.ifname)
                if found:
                    for kind, handle in (("htb", None), ("ingress", INGRESS_HANDLE)):
                        try:
                            if handle is None:
                                ipr.tc("del", kind, index=found[0], handle="1:")
                            else:
                                ipr.tc("del", kind, index=found[0], handle=handle)
                        except NetlinkError:
                            pass  # not installed (a partial install)
                for ifb in ipr.link_lookup(ifname=self.ifb):
                    ipr.link("del", index=ifb)

        run_in_netns(self.pid, apply)
        self.installed = False

    def stats(self) -> dict[str, dict[str, int]]:
        """Bytes, packets and drops of the egress and the ingress (IFB) pfifo."""
        def read() -> dict[str, dict[str, int]]:
            out = {}
            with IPRoute() as ipr:
                for side, dev in (("egress", self.ifname), ("ingress", self.ifb)):
                    found = ipr.link_lookup(ifname=dev)
                    if not found:
                        continue
                    for q in ipr.get_qdiscs(index=found[0]):
                        if q.get_attr("TCA_KIND") == "pfifo":
                            st = q.get_attr("TCA_STATS2").get_attr("TCA_STATS_BASIC")
                            qs = q.get_attr("TCA_STATS2").get_attr("TCA_STATS_QUEUE")
                            out[side] = {"bytes": st["bytes"], "packets": st["packets"],
                                         "drops": qs["drops"]}
            return out
        return run_in_netns(self.pid, read)


__all__ = ["HostShaper", "KERNEL_PARTS", "missing_kernel_parts"]
