"""Pin a host's MPTCP sysctls, limits and endpoints through netlink."""
from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

from pyroute2 import MPTCP

from testbed.base.errors import TestbedError
from testbed.core.model import HostSettings
from testbed.mptcp import pm
from testbed.base.netns import read_sysctl, run_in_netns, write_sysctl

# Recorded with every run in addition to the MPTCP ones: they shape SYN timing, and
# (retries2, keep-alive) how long a subflow whose path vanished lives on.
RECORDED_TCP_SYSCTLS = [
    "net.ipv4.tcp_syn_retries",
    "net.ipv4.tcp_syn_linear_timeouts",
    "net.ipv4.tcp_congestion_control",
    "net.ipv4.tcp_no_metrics_save",
    "net.ipv4.tcp_retries2",
    "net.ipv4.tcp_keepalive_time",
]


def apply_settings(pid: int, settings: HostSettings) -> dict[str, str]:
    """Pin the host's MPTCP sysctls, on any kernel with MPTCP v1 (5.6+).

    Newer knobs do not exist on older kernels (path_manager: 6.15; scheduler,
    blackhole_timeout, syn_retrans_before_tcp_fallback, close_timeout: later
    than 6.1). `path_manager` maps to its older twin `pm_type`. Any other absent
    knob is skipped when the setting is our default, which there means the
    kernel's fixed behaviour (no blackhole detection exists, one scheduler), and
    is recorded as absent by snapshot(); asking for a non-default value that the
    kernel cannot apply is an error, never silently ignored.
    """
    wanted = settings.sysctls()
    present = set(run_in_netns(pid, _present_mptcp_sysctls))
    not_applied: dict[str, str] = {}
    if "net.mptcp.path_manager" not in present and "net.mptcp.pm_type" in present:
        pm = wanted.pop("net.mptcp.path_manager")
        wanted["net.mptcp.pm_type"] = PM_TYPE[str(pm)]
    defaults = HostSettings().sysctls()
    for name in [n for n in wanted if n not in present]:
        if wanted[name] != defaults.get(name):
            raise TestbedError(f"{name} = {wanted[name]} is not supported by this kernel "
                               f"({os.uname().release}); leave it at {defaults.get(name)!r} "
                               "or use a newer kernel")
        del wanted[name]
        if name == FALLBACK_KNOB and "net.mptcp.blackhole_timeout" in present:
            # 6.12 and 6.13 fall back to TCP after a fixed 2 MPTCP SYN retransmissions
            # (the default), with blackhole detection but before this knob existed.
            continue
        # Recorded with the run: what the kernel does instead of the setting.
        not_applied[name] = ABSENT_MEANS.get(name, "knob absent: the kernel's fixed behaviour")
    # Each run must start from the same state: without metrics saving off, a
    # host would reuse RTT/cwnd learned in the previous repetition.
    write_sysctl(pid, {**wanted, "net.ipv4.tcp_no_metrics_save": 1})
    return not_applied


PM_TYPE = {"kernel": 0, "userspace": 1}
FALLBACK_KNOB = "net.mptcp.syn_retrans_before_tcp_fallback"
# What the kernel does where a knob does not exist; where that differs from our
# default, results differ, and the manifest says so.
ABSENT_MEANS = {
    "net.mptcp.syn_retrans_before_tcp_fallback":
        "absent (< 6.12): no fallback to plain TCP when MPTCP SYNs are dropped; SYNs keep MP_CAPABLE",
    "net.mptcp.blackhole_timeout": "absent (< 6.12): no MPTCP blackhole detection, same as 0",
    "net.mptcp.scheduler": "absent (< 6.6): the one built-in scheduler, same as 'default'",
    "net.mptcp.close_timeout": "absent (< 6.8): fixed 60 s, same as the default",
}


MPTCPD = "/usr/libexec/mptcpd"  # Debian's path (package mptcpd)
MPTCPD_READY_S = 10.0
MPTCPD_PLUGINS = "/usr/lib/x86_64-linux-gnu/mptcpd"  # package mptcpd-plugins


def mptcpd_argv() -> list[str]:
    """mptcpd as the testbed runs it: the addr_adv plugin makes a `subflow`
    endpoint of every address already there and of each new one, logs to stderr."""
    return [MPTCPD, f"--plugin-dir={MPTCPD_PLUGINS}", "--path-manager=addr_adv", "--addr-flags=subflow",
            "--notify-flags=existing,skip_link_local,skip_loopback", "--log=stderr"]


def start_mptcpd(pid: int, spawn: Callable[..., subprocess.Popen]) -> subprocess.Popen:
    """Start mptcpd through `spawn(argv, **popen_kwargs)` (which runs it in the
    namespace of `pid` and owns it) and wait until it made an endpoint for each
    of the namespace's IPv4 addresses; one-line TestbedError otherwise."""
    if not os.access(MPTCPD, os.X_OK):
        raise TestbedError(f"path_manager = 'mptcpd': mptcpd is not installed ({MPTCPD}; "
                           "apt-get install mptcpd mptcpd-plugins, with its system service masked)")
    if not (Path(MPTCPD_PLUGINS) / "addr_adv.so").exists():
        raise TestbedError(f"path_manager = 'mptcpd': its addr_adv plugin is not installed "
                           f"({MPTCPD_PLUGINS}; apt-get install mptcpd-plugins)")
    # An unnamed file: mptcpd's log is there to quote when it fails, and goes with it.
    log = tempfile.TemporaryFile()
    proc = spawn(mptcpd_argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    wanted = set(run_in_netns(pid, _ipv4_addresses))
    deadline = time.monotonic() + MPTCPD_READY_S
    while True:
        missing = wanted - {e.addr for e in pm.endpoints(pid)}
        if not missing:
            return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            why = (f"exited with {proc.returncode}" if proc.poll() is not None
                   else f"made none within {MPTCPD_READY_S:g} s")
            log.seek(0)
            said = log.read().decode(errors="replace").strip().splitlines()
            raise TestbedError(f"mptcpd {why}: no endpoint for {', '.join(sorted(missing))}"
                               + (f" (it said: {said[-1]})" if said else ""))
        time.sleep(0.05)


def mptcpd_info(proc: subprocess.Popen | None) -> dict | None:
    """What the manifest records of a host's mptcpd (None without one)."""
    if proc is None:
        return None
    return {"pid": proc.pid, "argv": mptcpd_argv(), "version": _mptcpd_version()}


def _mptcpd_version() -> str | None:
    try:
        out = subprocess.run([MPTCPD, "--version"], capture_output=True, text=True, timeout=5)
        return (out.stdout or out.stderr).strip().splitlines()[0] or None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def _ipv4_addresses() -> list[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)
                if not a.get_attr("IFA_ADDRESS").startswith("127.")]


def available_schedulers() -> list[str]:
    """MPTCP packet schedulers this kernel offers (the same in every namespace);
    ["default"] where the kernel has one built-in scheduler and no knob."""
    try:
        with open("/proc/sys/net/mptcp/available_schedulers") as f:  # read-only
            return f.read().split() or ["default"]
    except FileNotFoundError:
        return ["default"]


def _present_mptcp_sysctls() -> list[str]:
    return [f"net.mptcp.{n}" for n in os.listdir("/proc/sys/net/mptcp")]


def set_limits(pid: int, subflows: int, add_addr_accepted: int) -> None:
    """Set the in-kernel PM's subflow and ADD_ADDR limits in pid's namespace."""
    def apply() -> None:
        with MPTCP() as m:
            m.limits("set", subflows=subflows, add_addr_accepted=add_addr_accepted)

    run_in_netns(pid, apply)


def set_backup(pid: int, endpoint: pm.Endpoint, backup: bool) -> None:
    """Set or clear the backup flag of an endpoint added by pm.add_endpoints (MP_PRIO
    on its established subflows); its other flags stay as they are."""
    flags = {f for f in endpoint.flags if f != "backup"} | ({"backup"} if backup else set())
    pm.set_endpoint_flags(pid, endpoint.addr, endpoint.id, pm.flag_bits(flags))


def snapshot(pid: int) -> dict:
    """Everything MPTCP-relevant about a host, for the run's manifest."""
    names = list(HostSettings().sysctls())  # every sysctl a host setting pins
    names += ["net.mptcp.pm_type", "net.mptcp.available_schedulers",
              "net.mptcp.available_path_managers"]
    values = {}
    for name in names + RECORDED_TCP_SYSCTLS:
        try:
            values.update(read_sysctl(pid, [name]))
        except FileNotFoundError:
            values[name] = None  # sysctl absent on this kernel: recorded as such

    def limits() -> dict:
        with MPTCP() as m:
            return dict(m.limits("show")[0]["attrs"])

    lim = run_in_netns(pid, limits)
    eps = [{"id": e.id, "addr": e.addr, "flags": list(e.flags)} for e in pm.endpoints(pid)]
    return {"sysctls": values, "subflows": lim.get("MPTCP_PM_ATTR_SUBFLOWS"),
            "add_addr_accepted": lim.get("MPTCP_PM_ATTR_RCV_ADD_ADDRS"), "endpoints": eps}
