"""ifstats: per-path interface byte counters of the client, sampled.

Reads /proc/<client pid>/net/dev (the client namespace's view; no netlink
socket, no thread pinned to a namespace). Series path_tx_bytes / path_rx_bytes
(bytes per interval, key = path name) in the `timeseries` table.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import Field

from testbed.harness.probes.base import Probe, ProbeParams, frame, register, rel_s


class IfstatsParams(ProbeParams):
    """Parameters of the ifstats probe."""
    interval_ms: float = Field(100, gt=0, le=60_000)


def read_dev(pid: int) -> dict[str, tuple[int, int]]:
    """ifname -> (rx_bytes, tx_bytes)."""
    return {name: (c["rx_bytes"], c["tx_bytes"]) for name, c in read_counters(pid).items()}


def read_counters(pid: int) -> dict[str, dict[str, int]]:
    """ifname -> {rx_bytes, rx_packets, tx_bytes, tx_packets} of pid's namespace."""
    out = {}
    for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]:
        name, _, rest = line.partition(":")
        f = rest.split()
        out[name.strip()] = {"rx_bytes": int(f[0]), "rx_packets": int(f[1]),
                             "tx_bytes": int(f[8]), "tx_packets": int(f[9])}
    return out


@register
class IfstatsProbe(Probe):
    """Client interface bytes per path, sampled at an interval."""
    name = "ifstats"
    description = "client interface bytes per path, sampled (path_tx_bytes / path_rx_bytes)"
    Params = IfstatsParams

    def __init__(self, **params: Any):
        super().__init__(**params)
        self._samples: list[tuple[int, dict[str, tuple[int, int]]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._paths: dict[str, str] = {}
        self._t0_ns = 0

    def start(self, tb: Any, run_dir: Path, t0_ns: int) -> None:
        self._t0_ns = t0_ns
        self._paths = {p.client_if: p.name for p in tb.paths}
        pid = tb.client.pid
        self._samples.append((time.monotonic_ns(), read_dev(pid)))

        def loop() -> None:
            while not self._stop.wait(self.params.interval_ms / 1000):  # type: ignore[attr-defined]
                try:
                    self._samples.append((time.monotonic_ns(), read_dev(pid)))
                except OSError:
                    return  # namespace gone

        self._thread = threading.Thread(target=loop, name="ifstats", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    def tables(self) -> dict[str, pd.DataFrame]:
        """Bytes per path per interval (path_tx_bytes / path_rx_bytes)."""
        rows = []
        for (_, prev), (t, cur) in zip(self._samples, self._samples[1:]):
            for ifname, path in self._paths.items():
                if ifname in cur and ifname in prev:
                    for i, series in ((1, "path_tx_bytes"), (0, "path_rx_bytes")):
                        rows.append({"t": rel_s(t, self._t0_ns), "host": "client", "series": series,
                                     "key": path, "value": cur[ifname][i] - prev[ifname][i]})
        return {"timeseries": frame("timeseries", rows)}

    def summary(self) -> dict[str, Any]:
        """Bytes per path over the whole run."""
        if len(self._samples) < 2:
            return {}
        first, last = self._samples[0][1], self._samples[-1][1]
        return {path: {"rx_bytes": last[i][0] - first[i][0], "tx_bytes": last[i][1] - first[i][1]}
                for i, path in self._paths.items() if i in first and i in last}
