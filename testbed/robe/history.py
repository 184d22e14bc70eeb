"""Per-path history for RobE_IPS, persisted in a small JSON file.

The draft leaves the heuristic open ("RTT, throughput, success rate, signal").
Our choice, kept simple enough to explain in one line: pick the path with the
lowest *expected setup cost*

    cost = srtt + (1 - ok) * failure_penalty

where srtt is the RFC 6298-style smoothed handshake RTT of the path, ok an
exponentially weighted success rate (recent failures weigh most: one failure
on a path that always worked drops ok from 1.0 to 0.7) and failure_penalty
the price of a failed attempt, by default the initial SYN RTO (1 s) — the time
RobE_TIMER would lose on it. Throughput is recorded and breaks ties only.
Paths without history get the cost of a perfect path with the worst RTT seen,
so a known-good path is preferred to an unknown one; with no history at all
the default-route path is chosen (draft).

One store, many writers: the threads of a proxy and concurrent `robe`
processes share it. Every change goes through `History.update()`, which holds
a thread lock and an flock on a sibling lock file, re-reads the file, applies
the change to the fresh records and replaces the file atomically (write to a
temporary file, fsync, rename): no update is lost and a reader never sees a
half-written file.
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from testbed.mptcp.linux import INITIAL_SYN_RTO_S, TCP_RTO_MIN_S
from testbed.robe.sockets import LocalPath

ALPHA_RTT = 1 / 8     # RFC 6298 gains
BETA_RTT = 1 / 4
ALPHA_OK = 0.3        # weight of the newest outcome in the success rate
DEFAULT_PENALTY_S = 1.0


def default_store() -> Path:
    """The history file: $ROBE_HISTORY or the user's state directory."""
    env = os.environ.get("ROBE_HISTORY")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "robe" / "history.json"


@dataclass
class PathRecord:
    """What is known about one path: attempts, success rate and RTT estimates."""
    attempts: int = 0
    successes: int = 0
    ok: float = 1.0              # EWMA success rate
    srtt_s: float | None = None
    rttvar_s: float | None = None
    rtt_samples: int = 0
    throughput_mbit: float | None = None
    updated: float = 0.0         # wall clock, for humans

    def add_outcome(self, success: bool) -> None:
        """Count an attempt and update the success rate."""
        self.ok = (1.0 if success else 0.0) if self.attempts == 0 else \
            (1 - ALPHA_OK) * self.ok + ALPHA_OK * (1.0 if success else 0.0)
        self.attempts += 1
        self.successes += int(success)
        self.updated = time.time()

    def add_rtt(self, rtt_s: float) -> None:
        """Update the smoothed RTT and its variation (RFC 6298)."""
        if self.srtt_s is None or self.rttvar_s is None:
            self.srtt_s, self.rttvar_s = rtt_s, rtt_s / 2
        else:
            self.rttvar_s = (1 - BETA_RTT) * self.rttvar_s + BETA_RTT * abs(self.srtt_s - rtt_s)
            self.srtt_s = (1 - ALPHA_RTT) * self.srtt_s + ALPHA_RTT * rtt_s
        self.rtt_samples += 1
        self.updated = time.time()

    def rto_s(self, floor_s: float = TCP_RTO_MIN_S, ceil_s: float = INITIAL_SYN_RTO_S) -> float | None:
        """RFC 6298 RTO from this path's history, clamped like Linux's (floor TCP_RTO_MIN)."""
        if self.srtt_s is None or self.rttvar_s is None:
            return None
        return min(ceil_s, max(floor_s, self.srtt_s + max(0.001, 4 * self.rttvar_s)))


@dataclass
class History:
    """Per-path records for IPS; change them only through update()."""
    path: Path | None = None  # None: in memory only
    records: dict[str, PathRecord] = field(default_factory=dict)
    failure_penalty_s: float = DEFAULT_PENALTY_S
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "History":
        """The store at `path` (default: default_store()); a missing file is empty."""
        h = cls(path=Path(path) if path is not None else default_store())
        h.records = h._read()
        return h

    def _read(self) -> dict[str, PathRecord]:
        assert self.path is not None
        try:
            data = json.loads(self.path.read_text())
            return {name: PathRecord(**{k: v for k, v in rec.items()
                                        if k in PathRecord.__dataclass_fields__})
                    for name, rec in data.get("paths", {}).items()}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"history store {self.path} is not valid: {exc}") from None

    def update(self, change: Callable[[dict[str, PathRecord]], None]) -> None:
        """Apply `change` to the newest records and store them (read-merge-write).

        The change works on fresh copies, so a reader of `records` in another
        thread sees either the old or the new records, never a half-applied change."""
        with self._lock:
            if self.path is None:
                fresh = {n: PathRecord(**asdict(r)) for n, r in self.records.items()}
                change(fresh)
                self.records = fresh
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock_path = self.path.with_name(self.path.name + ".lock")
            with open(lock_path, "a") as lock_file:
                fcntl.flock(lock_file, fcntl.LOCK_EX)  # other processes: released on close
                try:
                    fresh = self._read()
                except ValueError:
                    fresh = {}  # a corrupt store is replaced, not merged
                change(fresh)
                self._write(fresh)
                self.records = fresh

    def _write(self, records: dict[str, PathRecord]) -> None:
        assert self.path is not None
        data = {"version": 1, "paths": {n: asdict(r) for n, r in records.items()}}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".history-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def record(self, name: str) -> PathRecord:
        """A copy of `name`'s record (empty if unknown); change records with update()."""
        r = self.records.get(name)
        return PathRecord(**asdict(r)) if r is not None else PathRecord()

    def known(self, name: str) -> bool:
        """True when the path has been tried at least once."""
        r = self.records.get(name)
        return r is not None and r.attempts > 0

    # ---- the IPS heuristic -------------------------------------------------
    def cost_s(self, name: str) -> float | None:
        """The path's expected setup cost in seconds (RTT plus failure penalty); None when unknown."""
        r = self.records.get(name)
        if r is None or r.attempts == 0:
            return None
        rtt = r.srtt_s if r.srtt_s is not None else self.failure_penalty_s
        return rtt + (1 - r.ok) * self.failure_penalty_s

    def rank(self, paths: list[LocalPath]) -> list[LocalPath]:
        """Paths best first. No history at all: unchanged order (default first)."""
        records = self.records  # one snapshot: update() replaces, never mutates it
        costs = {p.name: self.cost_s(p.name) for p in paths}
        known = [c for c in costs.values() if c is not None]
        if not known:
            return list(paths)
        unknown_cost = max(r.srtt_s or 0.0 for r in records.values()) + 1e-6
        order = {p.name: i for i, p in enumerate(paths)}

        def key(p: LocalPath) -> tuple[float, float, int]:
            c = costs[p.name]
            tput = (records.get(p.name) or PathRecord()).throughput_mbit or 0.0
            return (c if c is not None else unknown_cost, -tput, order[p.name])

        return sorted(paths, key=key)

    def complete_for(self, paths: list[LocalPath], min_attempts: int = 1) -> bool:
        """Every path has history (SIM+IPS switches from SIM to IPS then)."""
        return all((self.records.get(p.name) or PathRecord()).attempts >= min_attempts
                   for p in paths)

    def to_dict(self) -> dict[str, Any]:
        """Every path's record with its cost, as a dict."""
        return {n: {**asdict(r), "cost_s": self.cost_s(n)} for n, r in self.records.items()}
