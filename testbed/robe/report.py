"""The timeline of one RobE connection attempt.

Every step is an Event stamped with time.monotonic_ns() at the moment the
library observed it (not when it was logged), so differences between events
are the latencies the draft's Table 1 talks about: attempt started -> SYN/ACK
(connect completed) is one handshake RTT, winner chosen -> RST sent is the
break-before-make gap, join started -> join established is the MP_JOIN
handshake.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

# Event kinds, in the order they normally occur.
ATTEMPT_STARTED = "attempt_started"      # SYN(+MP_CAPABLE) handed to the kernel on a path
CONNECT_COMPLETED = "connect_completed"  # SYN/ACK received: the socket became writable
CONNECT_FAILED = "connect_failed"        # the kernel reported an error for this attempt
TIMER_EXPIRED = "timer_expired"          # RobE_TIMER gave up on this path
WINNER_CHOSEN = "winner_chosen"
RST_SENT = "rst_sent"                    # attempt aborted with SO_LINGER 0 (detail: on_wire)
FALLBACK_TCP = "fallback_tcp"            # the winner is plain TCP (MPTCP option stripped)
ESTABLISHED = "established"              # PM event: MPTCP connection fully established
JOIN_STARTED = "join_started"
JOIN_ESTABLISHED = "join_established"    # PM event sub_established for that path
JOIN_FAILED = "join_failed"
KEPT_FOR_ESIM = "kept_for_esim"          # RobE_eSIM: a loser left pending to become a subflow
ESIM_FALLBACK = "esim_fallback"          # RobE_eSIM: the server did not echo ROBE_eSIM_EN: SIM
GAVE_UP = "gave_up"                      # no attempt completed before the deadline


@dataclass
class Event:
    """One thing that happened during an establishment."""
    t_ns: int
    kind: str
    path: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    """What an establishment did: its events, winner, outcome and timings."""
    strategy: str
    dest: tuple[str, int]
    paths: list[str]
    t0_ns: int = field(default_factory=time.monotonic_ns)
    events: list[Event] = field(default_factory=list)
    winner: str | None = None
    outcome: str = "pending"  # connected | fallback_tcp | failed
    error: str | None = None
    token: int | None = None  # local MPTCP token of the winning connection
    options: dict[str, Any] = field(default_factory=dict)  # effective parameters

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._joins_done = threading.Event()
        self._joins_done.set()  # until a joiner runs

    # ---- recording -------------------------------------------------------
    def add(self, kind: str, path: str | None = None, t_ns: int | None = None,
            **detail: Any) -> Event:
        """Record an event (thread-safe) and return it."""
        ev = Event(t_ns if t_ns is not None else time.monotonic_ns(), kind, path, detail)
        with self._lock:  # the join thread records concurrently
            self.events.append(ev)
        return ev

    def joins_pending(self) -> None:
        """Mark the joins as started."""
        self._joins_done.clear()

    def joins_finished(self) -> None:
        """Mark the joins as done."""
        self._joins_done.set()

    def wait_joins(self, timeout: float | None = None) -> bool:
        """Block until the background join step ended (established or failed)."""
        return self._joins_done.wait(timeout)

    # ---- queries -----------------------------------------------------------
    def find(self, kind: str, path: str | None = None) -> list[Event]:
        """The events of this kind (and path)."""
        with self._lock:
            return [e for e in self.events if e.kind == kind and (path is None or e.path == path)]

    def first(self, kind: str, path: str | None = None) -> Event | None:
        """The earliest event of this kind (and path)."""
        found = self.find(kind, path)
        return min(found, key=lambda e: e.t_ns) if found else None

    def since_start_s(self, ev: Event | None) -> float | None:
        """Seconds from the start of the establishment to ev."""
        return None if ev is None else (ev.t_ns - self.t0_ns) / 1e9

    @property
    def setup_s(self) -> float | None:
        """Start of connect() -> SYN/ACK of the winning attempt."""
        if self.winner is None:
            return None
        return self.since_start_s(self.first(CONNECT_COMPLETED, self.winner))

    @property
    def multipath_s(self) -> float | None:
        """Start of connect() -> first additional subflow established."""
        return self.since_start_s(self.first(JOIN_ESTABLISHED))

    def summary(self) -> dict[str, Any]:
        """Setup and multipath times, winner, outcome and packet counts."""
        return {"setup_s": self.setup_s, "multipath_s": self.multipath_s,
                "winner": self.winner, "outcome": self.outcome,
                "syns": len(self.find(ATTEMPT_STARTED)) + len(self.find(JOIN_STARTED)),
                "rsts_on_wire": sum(1 for e in self.find(RST_SENT) if e.detail.get("on_wire")),
                "joined": sorted({e.path for e in self.find(JOIN_ESTABLISHED) if e.path})}

    def to_dict(self) -> dict[str, Any]:
        """The whole report as a JSON-able dict."""
        with self._lock:
            events = sorted(self.events, key=lambda e: e.t_ns)
        return {
            "strategy": self.strategy, "dest": list(self.dest), "paths": self.paths,
            "outcome": self.outcome, "winner": self.winner, "error": self.error,
            "token": self.token, "options": self.options, "summary": self.summary(),
            "t0_ns": self.t0_ns,
            # Relative milliseconds for humans, absolute ns for joining with pcaps.
            "events": [{**asdict(e), "t_ms": round((e.t_ns - self.t0_ns) / 1e6, 3)} for e in events],
        }
