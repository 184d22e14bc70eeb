"""Timed faults and link changes during an experiment: the "when".

    events = [EventSpec(at_s=2.0, action="set_link", path="wifi", changes={"delay_ms": 50}),
              EventSpec(at_s=5.0, action="link_down", path="lte"),
              EventSpec(at_s=6.0, action="blackhole", path="wifi", direction="up")]
    with EventScheduler(tb, events) as sched:   # t = 0 is when the block starts
        ... run traffic ...
    sched.records   # AppliedEvent per event: scheduled vs applied time, link after

Each event is applied by Testbed.apply_event, the one route for every change
during a run (the scenario files' `[[events]]` are the same EventSpec). A scheduler thread (SCHED_FIFO where permitted) sleeps
until ~2 ms before each event and busy-waits the rest (timer wake-ups overshoot
by up to a few hundred microseconds), so a change starts within well under
1 ms of its schedule. Each record has the scheduled time, when applying began
and when it was done (time.monotonic()); the user-space backend acknowledges
with the forwarder's own apply time, which is recorded too.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from testbed.base.netns import realtime_thread
from testbed.core.events import AppliedEvent, EventSpec, check_events

if TYPE_CHECKING:
    from testbed.core.net import Testbed

BUSY_WAIT_S = 0.002
SWITCH_INTERVAL_S = 0.0002  # GIL hand-over while events are pending (Python's default: 5 ms)


class EventScheduler:
    """Applies events at their times (relative to start()) on a thread of its own."""

    def __init__(self, tb: Testbed, events: list[EventSpec]):
        check_events(events, tb.topology, tb.settings["client"].path_manager,  # before any time passes
                     cross=list(tb.cross.flows) if tb.cross is not None else [])
        self.tb = tb
        self.events = sorted(events, key=lambda e: e.at_s)
        self.records: list[AppliedEvent] = []
        self.t0: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._old_switch: float | None = None
        self.realtime = False

    def start(self, t0: float | None = None) -> EventScheduler:
        """Start applying the events on time, counted from t0 (now by default)."""
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
        """Stop the scheduler; events not yet due are not applied."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._old_switch is not None:
            sys.setswitchinterval(self._old_switch)
            self._old_switch = None

    def join(self, timeout: float | None = None) -> None:
        """Wait for the scheduler thread to end (all events applied)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> EventScheduler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        assert self.t0 is not None
        self.realtime = realtime_thread()
        for e in self.events:
            target = self.t0 + e.at_s
            while not self._stop.is_set():
                left = target - time.monotonic()
                if left <= BUSY_WAIT_S:
                    break
                self._stop.wait(min(left - BUSY_WAIT_S, 0.5))
            if self._stop.is_set():
                return
            while time.monotonic() < target:
                pass
            try:
                self.tb.apply_event(e, scheduled=target)
            except Exception as exc:  # recorded by the testbed; the runner decides what it means
                self.error = exc
            self.records.append(self.tb.applied_events[-1])

    def summary(self) -> dict[str, Any]:
        """Counts and the worst lateness (applied - scheduled) of the events so far."""
        late = [r.applied_lateness_ms for r in self.records]
        return {"events": len(self.events), "applied": sum(r.ok for r in self.records),
                "realtime": self.realtime,
                "max_applied_lateness_ms": max(late) if late else None,
                "within_1ms": all(x <= 1.0 for x in late)}
