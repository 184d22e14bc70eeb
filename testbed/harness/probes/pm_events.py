"""pm_events: MPTCP path-manager netlink events of the client and the server.

Rows go to the `events` table with source "pm"; the detail holds the decoded
attributes (addresses, ports, ids, backup, error, ...). Tokens are local:
each side of one connection has its own token.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from testbed.mptcp.pm import PMEventListener
from testbed.harness.probes.base import Probe, ProbeParams, frame, register, rel_s


class PMEventsParams(ProbeParams):
    """Parameters of the pm_events probe."""
    interval_ms: float | None = None  # accepted for uniformity; events are pushed, not polled
    hosts: list[str] = ["client", "server"]


@register
class PMEventsProbe(Probe):
    """The MPTCP path manager's netlink events per host."""
    name = "pm_events"
    description = "netlink MPTCP PM events (created, established, sub_established, ...)"
    Params = PMEventsParams

    def __init__(self, **params: Any):
        super().__init__(**params)
        self._listeners: dict[str, PMEventListener] = {}
        self._t0_ns = 0

    def start(self, tb: Any, run_dir: Path, t0_ns: int) -> None:
        self._t0_ns = t0_ns
        for host in self.params.hosts:  # type: ignore[attr-defined]
            self._listeners[host] = PMEventListener(getattr(tb, host).pid).start()

    def stop(self) -> None:
        for lst in self._listeners.values():
            lst.stop()

    def tables(self) -> dict[str, pd.DataFrame]:
        """The events as rows of the events table."""
        rows = [{"t": rel_s(ev.t_ns, self._t0_ns), "source": "pm", "host": host, "event": ev.type,
                 "token": ev.token, "detail": json.dumps(ev.attrs, sort_keys=True)}
                for host, lst in self._listeners.items() for ev in lst.events()]
        return {"events": frame("events", sorted(rows, key=lambda r: r["t"]))}

    def summary(self) -> dict[str, Any]:
        """How many events of each type each host saw."""
        return {host: dict(Counter(ev.type for ev in lst.events()))
                for host, lst in self._listeners.items()}

    def metrics(self) -> dict[str, Any]:
        return {f"{host}.pm_{ev}": n for host, counts in self.summary().items()
                for ev, n in counts.items()}
