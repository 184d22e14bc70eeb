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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

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
    def from_dict(cls, d: dict[str, Any]) -> LinkEvent:
        known = {"t", "link", "direction", "set", "state", "blackhole"}
        extra = set(d) - known
        if extra:
            raise TestbedError(f"link event: unknown key(s) {sorted(extra)} (known: {sorted(known)})")
        return cls(**d)

    def describe(self) -> str:
        what = (f"set {self.set}" if self.set else f"state {self.state}" if self.state
                else f"blackhole {'on' if self.blackhole else 'off'}")
        return f"{self.link}{'/' + self.direction if self.direction else ''}: {what}"


class RawRtnl:
    """Carrier and default-route changes as hand-packed rtnetlink messages on a
    socket created in a namespace (~0.03-0.1 ms plus the kernel's own work,
    against ~0.2-0.4 ms per request through pyroute2)."""

    RTM_NEWLINK, RTM_NEWROUTE, NLMSG_ERROR = 16, 24, 2
    F_REQUEST, F_ACK, F_REPLACE, F_CREATE = 0x1, 0x4, 0x100, 0x400
    IFF_UP = 0x1
    RTA_OIF, RTA_GATEWAY, RTA_TABLE = 4, 5, 15

    def __init__(self, pid: int):
        import socket

        from testbed.netns import run_in_netns

        def make() -> socket.socket:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
            s.bind((0, 0))
            s.settimeout(2)
            return s

        self.sock = run_in_netns(pid, make)
        self.seq = 0

    def _request(self, msg_type: int, flags: int, body: bytes) -> None:
        import struct

        self.seq += 1
        self.sock.send(struct.pack("IHHII", 16 + len(body), msg_type, flags | self.F_REQUEST | self.F_ACK,
                                   self.seq, 0) + body)
        while True:
            data = self.sock.recv(65536)
            _n, typ, _f, seq, _pid = struct.unpack_from("IHHII", data)
            if typ == self.NLMSG_ERROR and seq == self.seq:
                (err,) = struct.unpack_from("i", data, 16)
                if err:
                    raise OSError(-err, os.strerror(-err))
                return

    def set_link(self, ifindex: int, up: bool) -> None:
        import struct

        body = struct.pack("BxHiII", 0, 0, ifindex, self.IFF_UP if up else 0, self.IFF_UP)
        self._request(self.RTM_NEWLINK, 0, body)

    def replace_default(self, gateway: str, oif: int, table: int = 254) -> None:
        """ip route replace default via GATEWAY dev OIF table TABLE proto static."""
        import socket
        import struct

        def attr(kind: int, payload: bytes) -> bytes:
            return struct.pack("HH", 4 + len(payload), kind) + payload

        # rtmsg: family, dst_len, src_len, tos, table, protocol (static), scope, type (unicast), flags
        rtm = struct.pack("BBBBBBBBI", socket.AF_INET, 0, 0, 0, table if table < 256 else 252, 4, 0, 1, 0)
        body = (rtm + attr(self.RTA_GATEWAY, socket.inet_aton(gateway)) +
                attr(self.RTA_OIF, struct.pack("i", oif)) + attr(self.RTA_TABLE, struct.pack("I", table)))
        self._request(self.RTM_NEWROUTE, self.F_CREATE | self.F_REPLACE, body)

    def close(self) -> None:
        self.sock.close()


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
            try:
                self._client_raw: RawRtnl | None = RawRtnl(tb.client.pid)
            except OSError:
                self._client_raw = None
        self.t0: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._old_switch: float | None = None
        self.realtime = False

    def start(self, t0: float | None = None) -> EventScheduler:
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
        if getattr(self, "_client_raw", None) is not None:
            self._client_raw.close()
            self._client_raw = None

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> EventScheduler:
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

            raw = self._client_raw
            if raw is not None:
                try:
                    raw.set_link(idx, e.state == "up")
                    if e.state == "up":
                        raw.replace_default(p.addr.far, idx, p.addr.table)
                        if is_default:
                            raw.replace_default(p.addr.far, idx)
                    return None
                except OSError:
                    pass  # the same through pyroute2
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
