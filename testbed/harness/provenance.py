"""What a run needs to be reproduced a year later: code, kernel, tools, host."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from testbed.base.netns import run_in_netns
from testbed.core.net import Testbed

ROOT = Path(__file__).resolve().parents[2]  # the repository root
PY_PACKAGES = ["pyroute2", "pandas", "pyarrow", "seaborn", "matplotlib", "pydantic", "invoke", "tqdm"]
TOOLS = {"iperf3": ["iperf3", "--version"], "tshark": ["tshark", "--version"],
         "tcpdump": ["tcpdump", "--version"], "nft": ["nft", "--version"],
         "ip": ["ip", "-V"], "ethtool": ["ethtool", "--version"], "mptcpize": None}


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=cwd)
        return (res.stdout or res.stderr).strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def git_state() -> dict:
    """The repository's commit, whether it is dirty, and `git describe`."""
    commit = _run(["git", "rev-parse", "HEAD"], ROOT)
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], ROOT)
    return {"commit": commit or None, "dirty": bool(status), "describe": _run(["git", "describe", "--always", "--dirty"], ROOT)}


@lru_cache(maxsize=1)
def static_provenance() -> dict:
    """The parts that do not change during a sweep (computed once)."""
    tools = {}
    for name, argv in TOOLS.items():
        if argv is None:
            tools[name] = shutil.which(name)
        else:
            out = _run(argv) if shutil.which(argv[0]) else ""
            tools[name] = out.splitlines()[0] if out else None
    pkgs = {}
    for pkg in PY_PACKAGES:
        try:
            pkgs[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pkgs[pkg] = None
    try:
        import mininet.net
        pkgs["mininet"] = mininet.net.VERSION
    except Exception:  # noqa: BLE001 - recorded as unknown
        pkgs["mininet"] = None
    uname = platform.uname()
    return {
        "kernel": {"release": uname.release, "version": uname.version,
                   "mptcp_enabled": _read("/proc/sys/net/mptcp/enabled"),
                   "netem_module": _netem_present()},
        "host": {"hostname": uname.node, "machine": uname.machine, "cpus": os.cpu_count(),
                 "cpu_model": _cpu_model(),
                 "python": sys.version.split()[0],
                 "virtualisation": _run(["systemd-detect-virt"]) or None},
        "tools": {**tools, "python_packages": pkgs},
    }


# TCP buffer sysctls: pinned per node namespace where the kernel keeps them per
# namespace (testbed.core.net.NAMESPACE_SYSCTLS); the others are host-wide.
BUFFER_SYSCTLS = ["net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem", "net.core.rmem_default",
                  "net.core.wmem_default", "net.core.rmem_max", "net.core.wmem_max"]
HOST_WIDE_SYSCTLS = ["net.ipv4.tcp_mem", "net.core.netdev_max_backlog",
                     "net.core.rmem_max", "net.core.wmem_max"]


def namespace_sysctls(tb: Testbed) -> dict[str, Any]:
    """Each node namespace's TCP buffer sysctls as they apply there, and the
    host-wide ones (read, never written) that shape every namespace."""
    def read() -> dict[str, str | None]:
        return {name: _read("/proc/sys/" + name.replace(".", "/")) for name in BUFFER_SYSCTLS}

    return {"nodes": {name: run_in_netns(node.pid, read) for name, node in tb.nodes.items()},
            "host_wide": {name: _read("/proc/sys/" + name.replace(".", "/"))
                          for name in HOST_WIDE_SYSCTLS}}


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or None


def _netem_present() -> bool:
    release = platform.release()
    return any(Path(p).exists() for p in (f"/lib/modules/{release}/kernel/net/sched/sch_netem.ko",
                                          f"/lib/modules/{release}/kernel/net/sched/sch_netem.ko.xz",
                                          "/sys/module/sch_netem"))


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None
