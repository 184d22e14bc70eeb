"""A registry of what each live testbed started, for cleanup after a crash.

Every process the testbed starts (Mininet node shells, emulators, workloads) is
recorded with its PID *and* its start time, so `invoke clean` can end exactly
those processes after a `kill -9` of the runner, never a reused PID and never
anything chosen by name. Everything else the testbed creates (veths, bridges,
qdiscs, nft tables, addresses, routes) lives inside those processes' network
namespaces and disappears with them.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

STATE_DIR = Path(os.environ.get("MPTB_STATE_DIR", "/run/mptcp-testbed"))


def start_time(pid: int) -> int | None:
    """Kernel start time of pid in clock ticks, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may contain spaces; fields after ")" are fixed.
    return int(stat.rsplit(")", 1)[1].split()[19])


class RunState:
    def __init__(self, run_id: str):
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self.path = STATE_DIR / f"{run_id}.json"
        self.data = {"run_id": run_id, "owner": [os.getpid(), start_time(os.getpid())],
                     "created": time.time(), "pids": []}
        self._write()

    def add_pid(self, pid: int) -> None:
        st = start_time(pid)
        if st is not None:
            self.data["pids"].append([pid, st])
            self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def alive(pid: int, recorded_start: int | None) -> bool:
    return recorded_start is not None and start_time(pid) == recorded_start


def kill_recorded(pids: list[list[int]], sig: int = signal.SIGKILL) -> int:
    """Signal each recorded (pid, start time) that is still that same process."""
    n = 0
    for pid, st in pids:
        if alive(pid, st):
            try:
                os.kill(pid, sig)
                n += 1
            except ProcessLookupError:
                pass
    return n


def netns_id(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def namespace_members(pids: list[list[int]]) -> list[list[int]]:
    """Every process inside the network namespaces held by our live recorded
    processes (e.g. a command a user started in the Mininet CLI). The namespace
    identity comes from a verified recorded process, so these are ours too."""
    ours = {netns_id(p) for p, s in pids if alive(p, s)} - {None, netns_id(os.getpid())}
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and netns_id(int(entry)) in ours:
            members.append([int(entry), start_time(int(entry))])
    return members


def stale_runs() -> list[dict]:
    """State files whose owning process is gone (a crashed or killed runner)."""
    out = []
    if not STATE_DIR.is_dir():
        return out
    for f in sorted(STATE_DIR.glob("*.json")):
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        owner_pid, owner_start = data.get("owner", [0, None])
        if not alive(owner_pid, owner_start):
            data["_path"] = str(f)
            out.append(data)
    return out


def clean_stale() -> list[str]:
    """End the processes of crashed runs; returns the run ids cleaned."""
    cleaned = []
    for run in stale_runs():
        pids = run.get("pids", [])
        pids = pids + namespace_members(pids)
        kill_recorded(pids)
        deadline = time.time() + 5
        while time.time() < deadline and any(alive(p, s) for p, s in pids):
            time.sleep(0.05)
        Path(run["_path"]).unlink(missing_ok=True)
        cleaned.append(run["run_id"])
    return cleaned
