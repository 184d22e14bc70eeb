"""What the VM tooling leaves in libvirt, found and removed through libvirt itself.

Vagrant records the domain it made in its id file only once the domain exists;
a vagrant killed mid-`up` (a timeout, ^C) leaves a running qemu that no
`vagrant destroy` can find. Here domains and volumes are found by their unique
name prefix instead, libvirt networks (each with its dnsmasq) and the libvirt
daemons are inventoried so that whoever started them can stop exactly those:
networks through libvirt, daemons by the PID in their pid file. Nothing is ever
looked up or ended by process name.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from testbed.tools.vm.errors import VmError

URI = "qemu:///system"
POOL = "default"
# Written by `libvirtd -d` / `virtlogd -d` (scripts/vm-host-setup.sh starts them
# by hand where there is no init system).
DAEMON_PIDFILES = {"libvirtd": Path("/run/libvirtd.pid"), "virtlogd": Path("/run/virtlogd.pid")}
# libvirt's own record of the dnsmasq it runs for a network.
NETWORK_PIDDIR = Path("/run/libvirt/network")


def virsh(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """One virsh command against the system instance; never raises on a non-zero exit."""
    return subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True, timeout=timeout)


def _names(*args: str) -> list[str]:
    res = virsh(*args)
    return res.stdout.split() if res.returncode == 0 else []


def domains(prefix: str) -> list[str]:
    """Defined domains (running or not) whose name starts with prefix; raises
    VmError when libvirt cannot say (never an empty list that means "unknown")."""
    res = virsh("list", "--all", "--name")
    if res.returncode != 0:
        lines = res.stderr.strip().splitlines() or ["no output"]
        raise VmError(f"cannot list libvirt's domains on {URI}: {lines[-1]}")
    return [n for n in res.stdout.split() if n.startswith(prefix)]


def volumes(prefix: str, pool: str = POOL) -> list[str]:
    """Volumes of the pool whose name starts with prefix."""
    res = virsh("vol-list", "--pool", pool)
    rows = res.stdout.splitlines()[2:] if res.returncode == 0 else []
    return [row.split()[0] for row in rows if row.strip() and row.split()[0].startswith(prefix)]


def networks(active_only: bool = True) -> set[str]:
    """Names of the libvirt networks that are active (or merely defined)."""
    return set(_names("net-list", "--name", *(() if active_only else ("--all",))))


def qemu_pids(prefix: str) -> list[int]:
    """PIDs of qemu processes running a domain whose name starts with prefix
    (libvirt passes `-name guest=NAME,...`): for checking, never for killing."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.startswith(f"guest={prefix}".encode()) for a in argv):
            found.append(int(proc.name))
    return found


def _pid_from(pidfile: Path, program: str | None = None) -> int | None:
    """The live PID a pid file names; with program, only if that PID still runs
    it (a stale pid file's PID may belong to someone else by now)."""
    try:
        pid = int(pidfile.read_text().strip())
        if not _alive(pid):
            return None
        if program and Path(f"/proc/{pid}/comm").read_text().strip() != program:
            return None
        return pid
    except (OSError, ValueError):
        return None


def dnsmasq_pids() -> dict[str, int]:
    """Network name -> PID of the dnsmasq libvirt runs for it (alive ones only;
    the directory also holds the network driver's own pid file)."""
    if not NETWORK_PIDDIR.is_dir():
        return {}
    pids = {f.stem: _pid_from(f, "dnsmasq") for f in NETWORK_PIDDIR.glob("*.pid")}
    return {name: pid for name, pid in pids.items() if pid is not None}


def stop_network(name: str, grace_s: float = 10.0) -> None:
    """Stop a network through libvirt and wait until its dnsmasq has exited
    (libvirt only signals it); if it outlives the grace, end it by the PID
    libvirt recorded."""
    pid = dnsmasq_pids().get(name)
    virsh("net-destroy", name)
    if pid is not None and not _wait_gone(pid, grace_s):
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, grace_s)


def purge_domains(prefix: str) -> list[str]:
    """Stop, undefine and delete the storage of every domain named prefix*, and
    delete pool volumes named prefix* (a vagrant killed between creating the
    disk and defining the domain leaves one). Returns what was removed; raises
    VmError naming a domain that survived."""
    removed = []
    for name in domains(prefix):
        virsh("destroy", name)  # fails harmlessly when the domain is not running
        virsh("undefine", name, "--remove-all-storage", "--managed-save", "--snapshots-metadata")
        removed.append(name)
    for vol in volumes(prefix):
        virsh("vol-delete", "--pool", POOL, vol)
        removed.append(vol)
    left = domains(prefix) + volumes(prefix)
    if left:
        raise VmError(f"libvirt still has {', '.join(left)} after removing it")
    return removed


@dataclass(frozen=True)
class Footprint:
    """The libvirt daemons and networks present at one moment."""

    daemons: dict[str, int] = field(default_factory=dict)
    active_networks: frozenset[str] = frozenset()
    defined_networks: frozenset[str] = frozenset()

    @classmethod
    def now(cls) -> "Footprint":
        """Inventory of what runs now (no daemon: no network either)."""
        daemons = {n: pid for n, pf in DAEMON_PIDFILES.items() if (pid := _pid_from(pf, n)) is not None}
        if "libvirtd" not in daemons:
            return cls(daemons)
        return cls(daemons, frozenset(networks()), frozenset(networks(active_only=False)))


def undo_since(before: Footprint, grace_s: float = 10.0) -> list[str]:
    """Stop what appeared after `before`: networks first (libvirt ends their
    dnsmasq) while libvirtd still answers, networks it did not know undefined,
    then the daemons by their PIDs. Returns what was stopped."""
    now = Footprint.now()
    stopped = []
    for net in sorted(now.active_networks - before.active_networks):
        stop_network(net, grace_s)
        stopped.append(f"network {net}")
    for net in sorted(now.defined_networks - before.defined_networks):
        virsh("net-undefine", net)
    for name in ("libvirtd", "virtlogd"):  # libvirtd talks to virtlogd: stop it first
        pid = now.daemons.get(name)
        if pid is None or name in before.daemons:
            continue
        os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, grace_s):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, grace_s)
        stopped.append(f"{name} (pid {pid})")
    return stopped


def _wait_gone(pid: int, grace_s: float) -> bool:
    deadline = time.monotonic() + grace_s
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _alive(pid: int) -> bool:
    """Running, not a zombie: daemons that exit wait as zombies until init reaps
    them, which can take a while on light VMs and containers."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
