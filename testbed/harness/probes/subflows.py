"""subflows: periodic TCP_INFO of every TCP socket (MPTCP subflows included)
in the client and server namespaces, via sock_diag (inet_diag with the
INET_DIAG_INFO extension) -> the `subflows` table.

MPTCP subflows are ordinary TCP sockets to sock_diag, so this needs no access
to the application's socket (works for iperf3 too). Plain TCP connections
(baselines, iperf3's control connection) show up as well: filter on the ports
in `subflow` when that matters. `path` is the path of the client-side address.
One sampler thread per host, pinned to its namespace (pyroute2 0.9 keeps
per-thread sockets). The last sample may precede the last packets of a flow.
"""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import Field
from pyroute2 import DiagSocket

from testbed.mptcp.sockopt import TCP_STATES
from testbed.base.netns import ns_path, setns_current_thread
from testbed.harness.probes.base import Probe, ProbeParams, frame, register, rel_s

INET_DIAG_INFO_EXT = 1 << (2 - 1)  # request INET_DIAG_INFO (attribute 2)
# every state but LISTEN (10) and TIME_WAIT (6): those carry no flow
STATES = sum(1 << s for s in TCP_STATES if s not in (6, 10))


class SubflowsParams(ProbeParams):
    """Parameters of the subflows probe."""
    interval_ms: float = Field(50, gt=0, le=60_000)
    hosts: list[str] = ["client", "server"]


def sample(ds: DiagSocket) -> list[dict[str, Any]]:
    """TCP_INFO of every TCP socket of the namespace (sock_diag), one row each."""
    out = []
    for msg in ds.get_sock_stats(family=socket.AF_INET, states=STATES,
                                 protocol=socket.IPPROTO_TCP, extensions=INET_DIAG_INFO_EXT):
        src, dst = msg["idiag_src"], msg["idiag_dst"]
        if src.startswith("127.") or dst.startswith("127."):
            continue
        info = msg.get_attr("INET_DIAG_INFO")
        row = {"subflow": f"{src}:{msg['idiag_sport']}-{dst}:{msg['idiag_dport']}",
               "src": src, "dst": dst,
               "state": TCP_STATES.get(msg["idiag_state"], str(msg["idiag_state"]))}
        if info is not None:
            row.update(cwnd=info["tcpi_snd_cwnd"], srtt_us=info["tcpi_rtt"],
                       bytes_acked=info["tcpi_bytes_acked"],
                       bytes_received=info["tcpi_bytes_received"],
                       retrans=info["tcpi_total_retrans"])
        out.append(row)
    return out


@register
class SubflowsProbe(Probe):
    """Per-subflow TCP_INFO (cwnd, srtt, bytes, retransmits) sampled via sock_diag."""
    name = "subflows"
    description = "per-subflow TCP_INFO (cwnd, srtt, bytes, retransmits) via sock_diag"
    Params = SubflowsParams

    def __init__(self, **params: Any):
        super().__init__(**params)
        self._rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._errors: dict[str, str] = {}
        self._paths: dict[str, str] = {}
        self._t0_ns = 0

    def start(self, tb: Any, run_dir: Path, t0_ns: int) -> None:
        self._t0_ns = t0_ns
        self._paths = {p.addr.client: p.name for p in tb.paths}
        for host in self.params.hosts:  # type: ignore[attr-defined]
            started = threading.Event()
            t = threading.Thread(target=self._loop, args=(host, getattr(tb, host).pid, started),
                                 name=f"subflows-{host}", daemon=True)
            t.start()
            started.wait(5)
            self._threads.append(t)

    def _loop(self, host: str, pid: int, started: threading.Event) -> None:
        interval = self.params.interval_ms / 1000  # type: ignore[attr-defined]
        try:
            setns_current_thread(ns_path(pid))
            ds = DiagSocket()
            ds.bind()
        except OSError as exc:
            self._errors[host] = str(exc)
            started.set()
            return
        started.set()
        try:
            while True:
                t = time.monotonic_ns()
                rows = sample(ds)
                with self._lock:
                    for r in rows:
                        r["t"], r["host"] = rel_s(t, self._t0_ns), host
                        r["path"] = self._paths.get(r["src"] if host == "client" else r["dst"])
                        self._rows.append(r)
                if self._stop.wait(interval):
                    break
        except Exception as exc:  # namespace torn down under us: keep what we have
            self._errors[host] = f"{type(exc).__name__}: {exc}"
        finally:
            ds.close()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)

    def tables(self) -> dict[str, pd.DataFrame]:
        """The samples as the subflows table."""
        with self._lock:
            rows = list(self._rows)
        return {"subflows": frame("subflows", rows)}

    def summary(self) -> dict[str, Any]:
        """Sample count and the subflows seen per host."""
        with self._lock:
            seen = {(r["host"], r["subflow"]) for r in self._rows}
        out: dict[str, Any] = {"samples": len(self._rows),
                               "subflows": {h: sorted(s for hh, s in seen if hh == h)
                                            for h in self.params.hosts}}  # type: ignore[attr-defined]
        if self._errors:
            out["errors"] = self._errors
        return out
