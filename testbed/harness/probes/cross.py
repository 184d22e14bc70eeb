"""cross: what each cross-traffic flow achieved, sampled through the run.

The scenario's `[[cross]]` flows live on the testbed (`tb.cross`); events
`cross_start`/`cross_stop` start and stop them. This probe reads their
receiver-counted bytes every interval: series `cross_mbit` (key = the flow,
host = its source node) in the `timeseries` table, the Mbit/s its receiver got
over the interval (0 while it is off). Metrics per flow: `cross.<flow>.mbit`
(delivered over the time it ran), `.delivered_bytes`, `.sent_bytes`,
`.active_s`. The summary (manifest `probes.cross`) lists every flow: its
declaration, port, route (the links it crosses), when it ran and its counts.
Problems (the run is then invalid): a sender that stopped on an error, a udp
sender that fell behind its rate. The runner adds this probe to every run that
declares cross traffic.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import Field

from testbed.harness.probes.base import Probe, ProbeParams, frame, register, rel_s


class CrossParams(ProbeParams):
    """Parameters of the cross probe."""
    interval_ms: float = Field(100, gt=0, le=60_000)


@register
class CrossProbe(Probe):
    """Each cross-traffic flow's achieved throughput, sampled (cross_mbit)."""
    name = "cross"
    description = "each cross-traffic flow's receiver throughput, sampled (cross_mbit)"
    Params = CrossParams

    def __init__(self, **params: Any):
        super().__init__(**params)
        self._cross: Any = None
        self._tb: Any = None
        self._samples: list[tuple[int, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0_ns = 0

    def start(self, tb: Any, run_dir: Path, t0_ns: int) -> None:
        self._tb, self._cross, self._t0_ns = tb, tb.cross, t0_ns
        if self._cross is None:
            return  # nothing declared: nothing to sample
        self._sample()
        interval = self.params.interval_ms / 1000

        def loop() -> None:
            while not self._stop.wait(interval):
                self._sample()

        self._thread = threading.Thread(target=loop, name="cross-probe", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        self._samples.append((time.monotonic_ns(), self._cross.delivered()))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
            self._sample()  # the flows have stopped: their last bytes

    def tables(self) -> dict[str, pd.DataFrame]:
        if self._cross is None:
            return {}
        rows = []
        for (t_a, a), (t_b, b) in zip(self._samples, self._samples[1:]):
            dt = (t_b - t_a) / 1e9
            for name, flow in self._cross.flows.items():
                rows.append({"t": rel_s(t_b, self._t0_ns), "host": flow.src, "series": "cross_mbit",
                             "key": name, "value": (b[name] - a[name]) * 8 / dt / 1e6 if dt else None})
        return {"timeseries": frame("timeseries", rows)}

    def _flows(self) -> dict[str, dict[str, Any]]:
        cross, now = self._cross, time.monotonic()
        delivered, sent, spans = cross.delivered(), cross.sent(), cross.intervals()
        out = {}
        for name, flow in cross.flows.items():
            dst = flow.dst or self._tb.graph.server
            active = sum((stop or now) - start for start, stop in spans[name])
            out[name] = {**flow.model_dump(mode="json"), "dst": dst, "port": cross.ports[name],
                         "dst_addr": cross.address(flow),
                         "route": list(self._tb.graph.route(flow.src, dst)),
                         "ran": [[round(rel_s(int(a * 1e9), self._t0_ns) or 0, 6),
                                  None if b is None else round(rel_s(int(b * 1e9), self._t0_ns) or 0, 6)]
                                 for a, b in spans[name]],
                         "active_s": round(active, 6), "delivered_bytes": delivered[name],
                         "sent_bytes": sent[name],
                         "mbit": delivered[name] * 8 / active / 1e6 if active > 0 else None}
        return out

    def summary(self) -> dict[str, Any]:
        if self._cross is None:
            return {}
        return {"interval_ms": self.params.interval_ms, "flows": self._flows()}

    def metrics(self) -> dict[str, float | int | str | bool | None]:
        if self._cross is None:
            return {}
        out: dict[str, float | int | str | bool | None] = {}
        for name, f in self._flows().items():
            for key in ("mbit", "delivered_bytes", "sent_bytes", "active_s"):
                out[f"cross.{name}.{key}"] = f[key]
        return out

    def problems(self) -> list[str]:
        return self._cross.problems() if self._cross is not None else []
