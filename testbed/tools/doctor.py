"""`invoke doctor`: can experiments run here? Each check says how to fix it."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Callable

from testbed.core import emulation
from testbed.base.errors import TestbedError
from testbed.base.netns import ScratchNetns, run_command
from testbed.core.emulation.offloads import disable_offloads, offload_state


@dataclass
class Check:
    """One doctor check: its result, detail and how to fix it."""
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def _kernel_checks() -> list[Check]:
    out = []
    enabled = _read("/proc/sys/net/mptcp/enabled")
    out.append(Check("kernel MPTCP", enabled == "1", f"net.mptcp.enabled={enabled}",
                     "use a kernel with CONFIG_MPTCP=y and `sysctl net.mptcp.enabled=1`"))
    try:
        def probe() -> str:
            with open("/proc/sys/net/mptcp/enabled", "w") as f:  # writable per namespace
                f.write("1")
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_MPTCP)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"cubic")
            s.close()
            knobs = sorted(os.listdir("/proc/sys/net/mptcp"))
            # path_manager (6.15+) or its older twin pm_type (5.19+): both PMs usable
            pm = "path_manager" if "path_manager" in knobs else "pm_type" if "pm_type" in knobs else None
            if pm is None:
                raise OSError("no net.mptcp.path_manager or pm_type: the userspace PM needs Linux >= 5.19")
            return f"per-namespace net.mptcp.*: {len(knobs)} knobs; path manager via {pm}"
        # A namespace certainly new (created and verified in-process): the
        # probe's writes must never land in the namespace doctor runs in.
        with ScratchNetns() as scratch:
            detail = scratch.run(probe)
        out.append(Check("per-namespace MPTCP sysctls + socket", True, detail))
    except (OSError, TestbedError) as exc:
        out.append(Check("per-namespace MPTCP sysctls + socket", False, str(exc),
                         "needs root and a kernel with per-netns MPTCP sysctls (>= 6.x)"))
    allowed = _read("/proc/sys/net/ipv4/tcp_allowed_congestion_control") or ""
    available = _read("/proc/sys/net/ipv4/tcp_available_congestion_control") or ""
    out.append(Check("congestion control cubic (per socket)", "cubic" in available.split(),
                     f"default={_read('/proc/sys/net/ipv4/tcp_congestion_control')}; allowed: {allowed}",
                     "modprobe tcp_cubic"))
    return out


def _backend_checks() -> list[Check]:
    out = []
    for name, cls in emulation.backends().items():
        problem = cls.check()
        out.append(Check(f"link emulation: {name}", problem is None,
                         "usable" if problem is None else problem, problem or "", required=False))
    try:
        chosen = emulation.select("auto").name
        out.append(Check("link emulation with delay/loss", True, f"backend {chosen!r} will be used"))
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        out.append(Check("link emulation with delay/loss", False, str(exc),
                         "install sch_netem (kernel modules) or fix the userspace backend"))
    return out


def _tool_checks() -> list[Check]:
    out = []
    for tool, pkg in [("mnexec", "mininet"), ("tc", "iproute2"), ("ethtool", "ethtool"),
                      ("nft", "nftables"), ("tcpdump", "tcpdump"), ("tshark", "tshark"),
                      ("ping", "iputils-ping"), ("nsenter", "util-linux")]:
        path = shutil.which(tool)
        out.append(Check(f"tool {tool}", path is not None, path or "missing",
                         f"apt-get install {pkg} (or rerun scripts/bootstrap.sh)"))
    iperf = shutil.which("iperf3")
    if iperf:
        version = _run([iperf, "--version"]).splitlines()[0] if iperf else ""
        native = "--mptcp" in _run([iperf, "--help"])
        via = "native --mptcp" if native else ("mptcpize" if shutil.which("mptcpize") else None)
        out.append(Check("iperf3 over MPTCP", via is not None, f"{version}; MPTCP via {via}",
                         "apt-get install mptcpize (iperf3 < 3.19 has no --mptcp)"))
    else:
        out.append(Check("iperf3 over MPTCP", False, "iperf3 missing", "apt-get install iperf3"))
    return out


def _offload_check() -> Check:
    # The testbed's own routine on a veth pair in a namespace of our own.
    try:
        with ScratchNetns() as scratch:
            res = run_command(scratch.path, ["ip", "link", "add", "dr0", "type", "veth", "peer", "name", "dr1"])
            if res.returncode != 0:
                raise TestbedError(f"ip link add: {res.stderr.strip()}")
            disable_offloads(scratch.path, ["dr0"])
            values = offload_state(scratch.path, "dr0")
    except (TestbedError, OSError) as exc:
        return Check("offloads can be turned off on veth", False, str(exc), "apt-get install ethtool")
    ok = all(v == "off" for v in values.values())
    detail = ", ".join(f"{k}={v}" for k, v in values.items())
    return Check("offloads can be turned off on veth", ok, detail, "apt-get install ethtool")


def run_checks() -> list[Check]:
    """Run every check (only the root check when not root)."""
    checks = [Check("running as root", os.geteuid() == 0, f"euid={os.geteuid()}", "run as root")]
    if os.geteuid() != 0:
        return checks
    sections: list[Callable[[], list[Check]]] = [_kernel_checks, _backend_checks, _tool_checks,
                                                  lambda: [_offload_check()]]
    for section in sections:
        checks.extend(section())
    return checks


def render(checks: list[Check]) -> str:
    """The checks as aligned lines, with the fix under each failed one."""
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        mark = "ok  " if c.ok else ("FAIL" if c.required else "no  ")
        line = f"{mark} {c.name:<{width}}  {c.detail}"
        if not c.ok and c.fix:
            line += f"\n     {'':<{width}}  fix: {c.fix}"
        lines.append(line)
    return "\n".join(lines)


def healthy(checks: list[Check]) -> bool:
    """True when every required check passed."""
    return all(c.ok for c in checks if c.required)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
