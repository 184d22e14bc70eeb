"""A registry of what each live testbed started, for cleanup after a crash.

Every process the testbed starts (Mininet node shells, emulators, workloads) is
recorded with its PID *and* its start time, so `invoke clean` can end exactly
those processes after a `kill -9` of the runner, never a reused PID and never
anything chosen by name; signals go through pidfds where the kernel has them,
so the process checked is the process signalled. Each node's network namespace
is recorded too (inode and the kernel's never-reused namespace cookie): clean
finds a namespace whose shell died or that only a descriptor keeps alive.
Everything else the testbed creates (veths, bridges, qdiscs, nft tables,
addresses, routes) lives inside those namespaces and disappears with them.
PID 1's namespace (the host's) and clean's own are never treated as ours.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from testbed.base.errors import TestbedError
from testbed.base.netns import run_command, run_in_netns_file

STATE_DIR = Path(os.environ.get("MPTB_STATE_DIR", "/run/mptcp-testbed"))
SO_NETNS_COOKIE = 71  # Linux >= 5.14: a 64-bit id no other namespace ever gets


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may contain spaces; fields after ")" are fixed.
    return text.rsplit(")", 1)[1].split()


def start_time(pid: int) -> int | None:
    """Kernel start time of pid in clock ticks, or None when it is gone."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def state_dir() -> Path:
    """STATE_DIR, created if missing; refused unless owned by root and writable
    by nobody else (anyone who can plant a record there chooses what clean kills)."""
    STATE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    st = os.lstat(STATE_DIR)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a directory"
        raise TestbedError(f"state directory {STATE_DIR} ({kind}, owner uid {st.st_uid}, mode "
                           f"{stat.S_IMODE(st.st_mode):04o}) must be a directory owned by root and "
                           "writable by nobody else (chown root, chmod go-w)")
    return STATE_DIR


def netns_identity(ns_file: str) -> list[int | None] | None:
    """[inode, cookie] of the network namespace ns_file names (/proc/PID/ns/net
    or a descriptor's /proc/PID/fd/N); None when it is gone. The inode can be
    reused by a later namespace, the cookie never (None where the kernel lacks it)."""
    try:
        ino = os.stat(ns_file).st_ino
    except OSError:
        return None

    def cookie() -> int | None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            try:
                return struct.unpack("Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
            except OSError:
                return None

    try:
        return [ino, run_in_netns_file(ns_file, cookie)]
    except OSError:
        return None


class RunState:
    """The state file of one live testbed: owner, recorded processes and namespaces."""

    def __init__(self, run_id: str):
        self.path = state_dir() / f"{run_id}.json"
        self.data = {"run_id": run_id, "owner": [os.getpid(), start_time(os.getpid())],
                     "created": time.time(), "pids": [], "netns": []}
        self._write()

    def add_pid(self, pid: int) -> None:
        """Record pid with its start time."""
        st = start_time(pid)
        if st is not None:
            self.data["pids"].append([pid, st])
            self._write()

    def add_netns(self, pid: int) -> None:
        """Record the identity of pid's network namespace (a node's)."""
        ident = netns_identity(f"/proc/{pid}/ns/net")
        if ident is not None and ident not in self.data["netns"]:
            self.data["netns"].append(ident)
            self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)

    def remove(self) -> None:
        """Delete the state file (the run ended cleanly)."""
        self.path.unlink(missing_ok=True)


def alive(pid: int, recorded_start: int | None) -> bool:
    """pid is still the process recorded with that start time (a zombie is not alive)."""
    fields = _stat_fields(pid)
    return (recorded_start is not None and fields is not None
            and int(fields[19]) == recorded_start and fields[0] != "Z")


def signal_recorded(pid: int, recorded_start: int | None, sig: int = signal.SIGKILL) -> bool:
    """Send sig to pid only if it is still the recorded process; True if sent.

    Through a pidfd where the kernel has them (Linux >= 5.3): the start time is
    checked after the pidfd pins the process, so a PID reused between check and
    signal cannot be hit. Elsewhere os.kill after the check (a tiny window)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except (OSError, AttributeError):  # no pidfds here (ENOSYS)
        if not alive(pid, recorded_start):
            return False
        try:
            os.kill(pid, sig)
            return True
        except ProcessLookupError:
            return False
    try:
        if not alive(pid, recorded_start):
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def kill_recorded(pids: list[list[int]], sig: int = signal.SIGKILL) -> int:
    """Signal each recorded (pid, start time) that is still that same process."""
    return sum(signal_recorded(pid, st, sig) for pid, st in pids)


def end_recorded(pids: list[list[int]], timeout: float = 5.0) -> list[int]:
    """SIGKILL each recorded process still alive and wait for it to go; returns
    the PIDs still alive after timeout s."""
    kill_recorded(pids)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p, s) for p, s in pids):
        time.sleep(0.02)
    return [p for p, s in pids if alive(p, s)]


def _never_ours() -> set[int]:
    """Namespace inodes that are never ours: PID 1's, the initial one (kernel
    threads live there; kthreadd is PID 2 outside PID namespaces; some PID 1s
    hide their namespace) and this process's. Refuses when the host's cannot
    be told: every process of the host would look like a candidate."""
    host = set()
    for pid in (1, 2):
        if pid == 2 and _comm(2) != "kthreadd":
            continue
        try:
            host.add(os.stat(f"/proc/{pid}/ns/net").st_ino)
        except OSError:
            pass
    if not host:
        raise TestbedError("cannot tell the host's network namespace (PID 1's and kthreadd's are "
                           "unreadable): refusing to look for processes by namespace")
    return host | {os.stat(f"/proc/{os.getpid()}/ns/net").st_ino}


@dataclass
class NamespaceScan:
    """Where given network namespaces are in use: as a process's own namespace,
    or held open by a descriptor (nsfs) in any process."""

    members: dict[int, list[int]] = field(default_factory=dict)  # inode -> pids inside
    holders: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # inode -> (pid, fd)

    def ns_file(self, ino: int) -> str | None:
        """A path naming namespace ino while it exists."""
        if self.members.get(ino):
            return f"/proc/{self.members[ino][0]}/ns/net"
        if self.holders.get(ino):
            pid, fd = self.holders[ino][0]
            return f"/proc/{pid}/fd/{fd}"
        return None


def scan_namespaces(inodes: set[int]) -> NamespaceScan:
    """Every process inside, and every descriptor holding, the namespaces with these inodes."""
    scan = NamespaceScan()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            ino = os.stat(f"/proc/{pid}/ns/net").st_ino
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        if ino in inodes:
            scan.members.setdefault(ino, []).append(pid)
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("net:[") and int(target[5:-1]) in inodes:
                scan.holders.setdefault(int(target[5:-1]), []).append((pid, int(fd)))
    return scan


def _recorded_namespaces(pids: list[list[int]], netns: list[list[int | None]]) -> tuple[set[int], NamespaceScan]:
    """The recorded namespaces that still exist and are certainly ours (cookie
    checked), never PID 1's or this process's; with where each is in use."""
    never = _never_ours()
    wanted = {ident[0]: ident for ident in netns if ident and ident[0] not in never}
    # A live recorded process vouches for its namespace (and covers state files
    # written before namespaces were recorded).
    for pid, st in pids:
        if alive(pid, st):
            ident = netns_identity(f"/proc/{pid}/ns/net")
            if ident is not None and ident[0] not in never:
                wanted.setdefault(ident[0], ident)
    scan = scan_namespaces(set(wanted))
    ours = set()
    for ino, ident in wanted.items():
        path = scan.ns_file(ino)
        now = netns_identity(path) if path else None
        if now is not None and (ident[1] is None or now == ident):
            ours.add(ino)
    return ours, scan


def namespace_members(pids: list[list[int]], netns: list[list[int | None]] | None = None) -> list[list[int]]:
    """Every process inside our namespaces: those recorded in netns and those of
    our live recorded processes (e.g. a command a user started in the Mininet
    CLI, or what a node's shell left running after it died). Never a process of
    PID 1's namespace or of this process's."""
    ours, scan = _recorded_namespaces(pids, netns or [])
    return [[pid, start_time(pid)] for ino in sorted(ours) for pid in scan.members.get(ino, [])
            if pid != os.getpid() and start_time(pid) is not None]


def _empty_namespace(ns_file: str) -> None:
    """Remove every interface but lo (veth peers go with them, qdiscs with
    their interfaces) and the nft ruleset of a namespace we cannot end."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    def links() -> None:
        with IPRoute() as ipr:
            for link in ipr.get_links():
                if link.get_attr("IFLA_IFNAME") != "lo":
                    try:
                        ipr.link("del", index=link["index"])
                    except NetlinkError:  # the peer of one already deleted
                        pass

    run_in_netns_file(ns_file, links)
    run_command(ns_file, ["nft", "flush", "ruleset"])


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def stale_runs() -> list[dict]:
    """State files whose owning process is gone (a crashed or killed runner)."""
    out: list[dict] = []
    if not STATE_DIR.exists():
        return out
    for f in sorted(state_dir().glob("*.json")):
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        # A writer killed between writing its next record and renaming it: that
        # one is the newer (records only grow), when it is whole.
        try:
            newer = json.loads(f.with_suffix(".tmp").read_text())
            if newer.get("run_id") == data.get("run_id") and newer.get("owner") == data.get("owner"):
                data = newer
        except (OSError, json.JSONDecodeError):
            pass
        owner_pid, owner_start = data.get("owner", [0, None])
        if not alive(owner_pid, owner_start):
            data["_path"] = str(f)
            out.append(data)
    return out


@dataclass
class CleanReport:
    """What clean did: runs whose every process and namespace is gone (state
    file removed), and runs kept with what survives (state file kept)."""

    removed: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)


def clean_run(run: dict) -> str | None:
    """End what one crashed run left; None when nothing of it survives, else what does."""
    pids = run.get("pids", [])
    ours, scan = _recorded_namespaces(pids, run.get("netns", []))
    members = [[pid, start_time(pid)] for ino in ours for pid in scan.members.get(ino, [])]
    victims = [[p, s] for p, s in pids + members if p not in (1, os.getpid()) and s is not None]
    survivors = end_recorded(victims)
    problems = [f"PIDs {', '.join(map(str, survivors))} survived SIGKILL"] if survivors else []
    after = scan_namespaces(ours)
    for ino in sorted(ours):
        if after.members.get(ino):
            problems.append(f"namespace net:[{ino}] still has processes {after.members[ino]}")
        elif after.holders.get(ino):
            pid, fd = after.holders[ino][0]
            _empty_namespace(f"/proc/{pid}/fd/{fd}")
            problems.append(f"namespace net:[{ino}] is held open by PID {pid} ({_comm(pid)}) through "
                            f"descriptor {fd}: its interfaces and nft tables were removed; it goes "
                            "when that process closes the descriptor")
    return "; ".join(problems) or None


# A live writer replaces its temporary record within microseconds: one this old
# belongs to a writer killed mid-write.
HALF_WRITTEN_AFTER_S = 60.0


def clean_stale() -> CleanReport:
    """End what crashed runs left; a run's state file goes only when nothing of it
    survives. Temporary records their writers left half-written go too."""
    report = CleanReport()
    for run in stale_runs():
        problem = clean_run(run)
        if problem is None:
            Path(run["_path"]).unlink(missing_ok=True)
            Path(run["_path"]).with_suffix(".tmp").unlink(missing_ok=True)
            report.removed.append(run["run_id"])
        else:
            report.kept[run["run_id"]] = problem
    if STATE_DIR.exists():
        for tmp in state_dir().glob("*.tmp"):
            try:
                if time.time() - tmp.stat().st_mtime > HALF_WRITTEN_AFTER_S:
                    tmp.unlink()
            except FileNotFoundError:
                pass  # its writer renamed it meanwhile
    return report
