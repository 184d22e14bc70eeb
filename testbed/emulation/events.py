"""Timed link changes during an experiment.

    events = [LinkEvent(2.0, "wifi", set={"delay_ms": 50}),
              LinkEvent(5.0, "lte", state="down"),
              LinkEvent(6.0, "wifi", direction="up", blackhole=True)]
    with EventScheduler(tb, events) as sched:   # t = 0 is when the block starts
        ... run traffic ...
    sched.records   # scheduled vs applied time of every event

A scheduler thread (SCHED_FIFO where permitted) sleeps until ~2 ms before each
event and busy-waits the rest (timer wake-ups overshoot by up to a few hundred
microseconds), so a change starts within well under 1 ms of its schedule. Each record
has the scheduled time, when applying began and when the backend acknowledged
it (all time.monotonic(), plus offsets from t0). The user-space backend's
acknowledgment carries the forwarder's own apply time, which is recorded too.

Kinds of event (exactly one per event):
    set={"delay_ms": .., "loss_pct": .., "rate_mbit": ..}  -> tb.update_link
    state="down" | "up"                                     -> what tb.set_path_state does
                                                               (carrier of the client interface,
                                                               routes restored on "up")
    blackhole=True | False                                   -> backend.set_blackhole
                                                               (packets vanish, interfaces stay up)
"""
from __future__ import annotations

import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, TypeVar

from testbed.errors import TestbedError

BUSY_WAIT_S = 0.002
RT_PRIORITY = 5  # below the forwarders (10): a busy-waiting scheduler never delays packets
SWITCH_INTERVAL_S = 0.0002  # GIL hand-over while events are pending (Python's default: 5 ms)
T = TypeVar("T")


def realtime_thread(priority: int = RT_PRIORITY) -> bool:
    """Make the calling thread SCHED_FIFO (Linux schedules threads, so only
    this one); False where not permitted. On a busy 2-core machine this is the
    difference between ~0.1 ms and up to ~40 ms of wake-up delay."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        return True
    except (OSError, AttributeError):
        return False


class NetnsWorker:
    """A thread living in another network namespace with an open IPRoute.

    pyroute2 (0.9) keeps its netlink socket per thread, so a socket opened in
    a namespace only stays there when it is always used from the thread that
    opened it; this worker is that thread. call(fn) runs fn(ipr) there and
    returns its result: one netlink round trip plus a thread hand-off
    (~0.1-0.3 ms) instead of a new thread and socket (~2 ms) per change.
    """

    def __init__(self, pid: int, name: str = "", realtime: bool = True):
        self._realtime = realtime
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(pid,), daemon=True,
                                        name=f"netns-worker-{name or pid}")
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error

    def _run(self, pid: int) -> None:
        from pyroute2 import IPRoute

        from testbed.netns import ns_path, setns_current_thread

        try:
            setns_current_thread(ns_path(pid))
            if self._realtime:
                realtime_thread()
            ipr = IPRoute()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                item = self._q.get()
                if item is None:
                    return
                fn, box, done = item
                try:
                    box["value"] = fn(ipr)
                except BaseException as exc:  # re-raised in the caller
                    box["error"] = exc
                done.set()
        finally:
            ipr.close()

    def call(self, fn: Callable[[Any], T], timeout: float = 10.0) -> T:
        if not self._thread.is_alive():
            raise TestbedError("netns worker is not running")
        box: dict[str, Any] = {}
        done = threading.Event()
        self._q.put((fn, box, done))
        if not done.wait(timeout):
            raise TestbedError(f"netns worker: no answer within {timeout} s")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def close(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join(5)


@dataclass(frozen=True)
class LinkEvent:
    t: float  # seconds after the scheduler's t0
    link: str  # path name or "bottleneck"
    direction: Literal["up", "down"] | None = None  # None: both
    set: dict[str, Any] = field(default_factory=dict)
    state: Literal["up", "down"] | None = None
    blackhole: bool | None = None

    def __post_init__(self) -> None:
        kinds = sum([bool(self.set), self.state is not None, self.blackhole is not None])
        if kinds != 1:
            raise TestbedError(f"link event at t={self.t} on {self.link!r}: give exactly one of "
                               "set=..., state='up'|'down', blackhole=True|False")
        if self.t < 0:
            raise TestbedError(f"link event on {self.link!r}: negative time {self.t}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LinkEvent":
        known = {"t", "link", "direction", "set", "state", "blackhole"}
        extra = set(d) - known
        if extra:
            raise TestbedError(f"link event: unknown key(s) {sorted(extra)} (known: {sorted(known)})")
        return cls(**d)

    def describe(self) -> str:
        what = (f"set {self.set}" if self.set else f"state {self.state}" if self.state
                else f"blackhole {'on' if self.blackhole else 'off'}")
        return f"{self.link}{'/' + self.direction if self.direction else ''}: {what}"


class EventScheduler:
    def __init__(self, tb: Any, events: list[LinkEvent | dict[str, Any]]):
        self.tb = tb
        self.events = sorted((e if isinstance(e, LinkEvent) else LinkEvent.from_dict(e)
                              for e in events), key=lambda e: e.t)
        for e in self.events:
            if e.state is not None and e.link == "bottleneck":
                raise TestbedError("link event: the bottleneck has no carrier to take down; "
                                   "use blackhole=True")
            tb.link(e.link)  # fails early on an unknown link name
        self.records: list[dict[str, Any]] = []
        # Carrier-down events are the ones whose timing experiments study most
        # (failover); a netlink socket opened now in the client's namespace makes
        # them one round trip (~0.3 ms) instead of a new thread and socket.
        self._client_nl: NetnsWorker | None = None
        if any(e.state is not None for e in self.events):
            self._client_nl = NetnsWorker(tb.client.pid, "client")
            names = {e.link: tb.path(e.link).client_if for e in self.events if e.state is not None}
            self._ifindex = self._client_nl.call(
                lambda ipr: {k: ipr.link_lookup(ifname=v)[0] for k, v in names.items()})
        self.t0: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._old_switch: float | None = None
        self.realtime = False

    def start(self, t0: float | None = None) -> "EventScheduler":
        self.t0 = time.monotonic() if t0 is None else t0
        # Other threads of this process (traffic generators, probes) would keep
        # the GIL for up to 5 ms after each of our syscalls; hand it over faster
        # while events are pending (restored in stop()).
        self._old_switch = sys.getswitchinterval()
        sys.setswitchinterval(min(self._old_switch, SWITCH_INTERVAL_S))
        self._thread = threading.Thread(target=self._run, name="link-events", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._old_switch is not None:
            sys.setswitchinterval(self._old_switch)
            self._old_switch = None
        if self._client_nl is not None:
            self._client_nl.close()
            self._client_nl = None

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "EventScheduler":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _apply(self, e: LinkEvent) -> float | None:
        tb = self.tb
        if e.set:
            tb.update_link(e.link, e.direction, **e.set)
        elif e.state is not None and self._client_nl is not None:
            # Exactly what Testbed.set_path_state() does, on the open socket
            # (~0.3 ms instead of ~2.5 ms with a new thread and socket).
            idx = self._ifindex[e.link]
            p = tb.path(e.link)
            is_default = p.name == tb.topology.default.name

            def carrier(ipr: Any) -> None:
                ipr.link("set", index=idx, state=e.state)
                if e.state == "up":  # the kernel dropped the routes with the carrier
                    ipr.route("replace", dst="0.0.0.0/0", gateway=p.addr.far, oif=idx,
                              table=p.addr.table)
                    if is_default:
                        ipr.route("replace", dst="0.0.0.0/0", gateway=p.addr.far, oif=idx)

            self._client_nl.call(carrier)
        elif e.state is not None:
            tb.set_path_state(e.link, e.state == "up")
        else:
            link = tb.link(e.link)
            for d in ("up", "down") if e.direction is None else (e.direction,):
                tb.backend.set_blackhole(link, d, bool(e.blackhole))
        applied = tb.link(e.link).state.get("applied") if e.state is None else None
        if applied:  # the forwarder's own timestamp of the (last) change
            return max(applied.values())
        return None

    def _run(self) -> None:
        assert self.t0 is not None
        self.realtime = realtime_thread()
        for e in self.events:
            target = self.t0 + e.t
            while not self._stop.is_set():
                left = target - time.monotonic()
                if left <= BUSY_WAIT_S:
                    break
                self._stop.wait(min(left - BUSY_WAIT_S, 0.5))
            if self._stop.is_set():
                return
            while time.monotonic() < target:
                pass
            began = time.monotonic()
            rec: dict[str, Any] = {"t": e.t, "event": e.describe(), "scheduled": target,
                                   "began": began}
            try:
                emu = self._apply(e)
                rec["ok"] = True
            except Exception as exc:  # recorded; the experiment decides what it means
                rec["ok"] = False
                rec["error"] = str(exc)
                self.error = exc
                emu = None
            done = time.monotonic()
            rec["done"] = done
            rec["emulator_applied"] = emu if emu is not None and began <= emu <= done else None
            applied = rec["emulator_applied"] or done
            rec["start_lateness_ms"] = round((began - target) * 1000, 3)
            rec["applied_lateness_ms"] = round((applied - target) * 1000, 3)
            rec["duration_ms"] = round((done - began) * 1000, 3)
            self.records.append(rec)

    def summary(self) -> dict[str, Any]:
        late = [r["applied_lateness_ms"] for r in self.records]
        return {"events": len(self.events), "applied": sum(r["ok"] for r in self.records),
                "realtime": self.realtime,
                "max_applied_lateness_ms": max(late) if late else None,
                "within_1ms": all(x <= 1.0 for x in late)}
