"""Rate limit: can a receiver cap one path of a download at R, and at what cost?

A two-path bulk download (the server sends, the client receives). At request_at_s
the client asks for the limited path (LTE) to carry at most R, by one of four modes:

- `srl`: the subflow rate limit option (SRL) of the user-space stack: the client
  (user stack) sends it on the LTE subflow, the server (user stack) enforces it.
- `window`: the room's proposal at IETF 105, "the server clamps the window": the
  receiver clamps its receive window, sized so that LTE alone would run at R
  (SO_RCVBUF = R x LTE's RTT on a kernel MPTCP client socket; TCP_WINDOW_CLAMP is
  refused on MPTCP sockets by Linux 6.18). The MPTCP window is connection-level,
  so the clamp bounds both paths together. `window_start`: the same clamp set as
  soon as the connection is up (the steady state of a server policy; its
  "before" is clamped too, the reference is `none`).
- `shaping`: the client shapes its own LTE interface, egress and ingress, to R
  (testbed.core.host_shaping: HTB, and IFB + HTB for arriving frames) with a
  kernel MPTCP client, whose TCP sees the shaped arrivals.
- `none`: no limit, the reference.

The sender (server) is the user-space stack in every mode by default, so that
only the limit differs (`sender = "kernel"` runs window, shaping and none on
kernel MPTCP on both sides, what hosts can do today). The client is the
user-space stack for srl (it sends the option) and kernel MPTCP otherwise (a
kernel socket's SO_RCVBUF; tc ingress acts only on what the kernel receives).
A connection that delivers nothing for stall_s is given up by the client's idle
timeout and counts as stalled: a finding for `window` (a kernel MPTCP receiver
whose SO_RCVBUF shrinks mid-transfer stopped accepting data here,
docs/rate-limit.md), a broken run for the others; any other failure (a reset, an
error) is not a stall and makes the run invalid. A limit applied later than one
rate bin after the request makes the run invalid. check_topology refuses at load
a path the topology lacks, R at or above the path's rate, and shaping without its
kernel parts built in or loaded (testbed.core.host_shaping.missing_kernel_parts).

Metrics: stalled, last_data_s, the LTE rate before and after the request, accuracy = median |rate-R|/R
over the bins after settle_s, convergence_s (request -> the first bin from which
LTE stays within converge_band of R), total goodput and the WiFi rate after the
request and their ratio to before, the sender's smoothed RTT per path after the
request and queueing delay = that minus the path's smallest RTT of the run.
Tables: the workload's, plus series rate_mbit (receiver's delivered bytes in
bins of bin_s, keys total / wifi / lte) in the timeseries table.
"""
from __future__ import annotations

import statistics
import threading
import time
from typing import Any, Literal

import pandas as pd
from pydantic import Field, model_validator

from testbed.base.errors import TestbedError
from testbed.core import host_shaping
from testbed.core.host_shaping import HostShaper
from testbed.harness import workload
from testbed.harness.experiment import Experiment, ExperimentParams, RunContext, RunOutput, register
from testbed.harness.probes.base import frame
from testbed.harness.workload.app_workload import ReceiverLimit
from testbed.stack import rate_limit as srl_option

Mode = Literal["srl", "window", "window_start", "shaping", "none"]
WINDOW_MODES = ("window", "window_start")
MSS_BYTES = 1448
# The server writes for `seconds`; what its send buffer still holds then drains at the
# limited rate (a window clamp set mid-transfer makes Linux prune data it had room for:
# the sender recovers by timeouts), so the workload may run this much longer.
DRAIN_S = 60


class Params(ExperimentParams):
    """Parameters of the rate-limit experiment."""
    mode: Mode = "none"
    rate_mbit: float = Field(2.0, ge=0.01, le=1000, description="R: the rate asked for on the limited path (shaping and the emulator go down to 10 kbit/s)")
    path: str = Field("lte", description="the path whose rate the client limits")
    seconds: float = Field(12, ge=4, le=600, description="length of the download")
    request_at_s: float = Field(3, ge=0.5, le=590, description="when the client asks, s after the start")
    settle_s: float = Field(2, ge=0, le=60, description="left out of the accuracy window after the request")
    bin_s: float = Field(0.5, ge=0.05, le=10, description="rate samples' bin width")
    converge_band: float = Field(0.25, gt=0, le=1, description="converged: |rate-R|/R within this from then on")
    shaping_queue_pkts: int | None = Field(
        None, ge=2, le=10_000, description="shaping: each pfifo's limit (default: one BDP of R over the path's RTT, at least 8)")
    window_bytes: int | None = Field(
        None, ge=2048, le=64 << 20, description="window: SO_RCVBUF (default: R x the path's RTT)")
    cc: Literal["cubic", "reno"] = "cubic"
    stall_s: float = Field(8, ge=2, le=120, description="the connection counts as stalled after this long without a byte")
    sender: Literal["kernel", "user"] = Field(
        "user", description="the server's (sender's) MPTCP; kernel: not with mode srl")

    @model_validator(mode="after")
    def _timeline(self) -> "Params":
        if self.request_at_s + self.settle_s + 2 * self.bin_s > self.seconds:
            raise ValueError(f"request_at_s + settle_s + 2 x bin_s ({self.request_at_s + self.settle_s + 2 * self.bin_s:g} s) "
                             f"must fit in seconds ({self.seconds:g})")
        if self.shaping_queue_pkts is not None and self.mode != "shaping":
            raise ValueError("shaping_queue_pkts is for mode 'shaping'")
        if self.window_bytes is not None and self.mode not in WINDOW_MODES:
            raise ValueError("window_bytes is for modes 'window' and 'window_start'")
        if self.mode == "srl" and self.sender == "kernel":
            raise ValueError("mode 'srl' needs sender 'user' (kernel MPTCP does not know the option)")
        return self



def rates(ts: pd.DataFrame, host: str, bin_s: float, end_s: float) -> pd.DataFrame:
    """Mbit/s per key of the delivered_bytes series at host, in bins of bin_s from 0
    to end_s (bins past end_s are partial and left out): columns t (bin start), key, value."""
    d = ts[(ts["series"] == "delivered_bytes") & (ts["host"] == host)]
    if d.empty:
        return pd.DataFrame(columns=["t", "key", "value"])
    b = (d["t"] // bin_s).astype(int)
    sums = d.groupby([b, d["key"]])["value"].sum()
    n = int(end_s // bin_s)
    rows = [{"t": i * bin_s, "key": key, "value": float(sums.get((i, key), 0)) * 8 / bin_s / 1e6}
            for key in sorted(d["key"].unique()) for i in range(n)]
    return pd.DataFrame(rows)


def convergence_s(t: list[float], rate: list[float], target: float, band: float, since: float) -> float | None:
    """Seconds from `since` to the first bin (its end) from which every rate stays within
    band x target of target; None when the last bin is outside."""
    first = None
    for ti, r in zip(t, rate):
        if ti < since:
            continue
        if abs(r - target) <= band * target:
            first = ti if first is None else first
        else:
            first = None
    return None if first is None else max(0.0, first - since)


def path_rtt_ms(tb, name: str) -> float:
    """The path's configured round-trip time (its links' one-way delays both ways)."""
    g = tb.graph.composed(tb.path(name).graph)
    return g.direction("up").delay_ms + g.direction("down").delay_ms


@register
class RateLimit(Experiment):
    """A two-path download whose client asks for one path to carry at most R: SRL, window clamp, shaping, none."""
    name = "rate-limit"
    description = "client caps one path of a download at R: SRL vs receive-window clamp vs own shaping vs none"
    Params = Params
    # Two at once keep every run valid (quick scenario: 1.75x, none voided): docs/performance.md.
    max_parallel = 2

    @classmethod
    def check_topology(cls, params: Any, topology: Any) -> None:
        """The limited path exists beside another, R is below its rate, and mode
        shaping has the kernel parts it needs without loading a module."""
        p: Params = params
        g = topology.graph()
        paths = {gp.name: gp for gp in g.paths_of(g.client)}
        if p.path not in paths or len(paths) < 2:
            raise TestbedError(f"params.path {p.path!r}: must name one of the topology's paths "
                               f"({', '.join(paths)}), two or more needed")
        path_mbit = g.composed(paths[p.path]).direction("down").rate_mbit
        if path_mbit is not None and p.rate_mbit >= path_mbit:
            raise TestbedError(f"params.rate_mbit {p.rate_mbit:g}: must be below the path's rate "
                               f"{path_mbit:g} Mbit/s")
        missing = host_shaping.missing_kernel_parts() if p.mode == "shaping" else []
        if missing:
            raise TestbedError(f"params.mode 'shaping' needs {', '.join(missing)} built into the kernel "
                               f"or loaded (asking for a module loads it, which changes the host)")

    def run(self, ctx: RunContext) -> RunOutput:
        p: Params = ctx.params
        tb = ctx.tb
        names = [q.name for q in tb.paths]  # check_topology: p.path is one of two or more
        rtt_ms = path_rtt_ms(tb, p.path)
        bdp_bytes = p.rate_mbit * 1e6 / 8 * rtt_ms / 1000
        ctx.start_clock()
        at_ns = ctx.t0_ns + int(p.request_at_s * 1e9)
        limit = None
        if p.mode == "srl":
            limit = ReceiverLimit(kind="srl", at_ns=at_ns, path=p.path, rate_kbit=p.rate_mbit * 1000)
        elif p.mode in WINDOW_MODES:  # window_start: as soon as the connection is up
            limit = ReceiverLimit(kind="rcvbuf", at_ns=at_ns if p.mode == "window" else ctx.t0_ns,
                                  rcvbuf_bytes=p.window_bytes or max(2048, int(bdp_bytes)))
        load = workload.get("app", mode="bulk", direction="down", seconds=p.seconds, cc=p.cc,
                            client_stack="user" if p.mode == "srl" else "kernel", server_stack=p.sender,
                            limit=limit, idle_timeout_s=p.stall_s)
        shaper = HostShaper(tb.client.pid, tb.path(p.path).client_if) if p.mode == "shaping" else None
        queue = p.shaping_queue_pkts or max(8, int(bdp_bytes / MSS_BYTES) + 1)
        shaped: dict[str, Any] = {}
        timer = None
        if shaper is not None:
            def shape() -> None:
                try:
                    shaper.install(p.rate_mbit * 1000, queue)
                    shaped["applied_ns"] = time.monotonic_ns()
                except Exception as exc:  # reported as the run's reason below
                    shaped["error"] = str(exc)
            timer = threading.Timer(max(0.0, (at_ns - time.monotonic_ns()) / 1e9), shape)
            timer.start()
        try:
            result = load.run(tb, ctx.raw_dir, ctx.t0_ns, timeout_s=p.seconds + DRAIN_S)
        finally:
            if timer is not None:
                timer.cancel()
                timer.join()
            if shaper is not None:
                stop_shaping(shaper, shaped)
        m = dict(result.metrics)
        m.update(mode=p.mode, rate_mbit=p.rate_mbit, path_rtt_ms=rtt_ms, request_at_s=p.request_at_s)
        if shaper is not None:
            m.update(shaping_queue_pkts=queue, shaping_late_s=(shaped["applied_ns"] - at_ns) / 1e9
                     if "applied_ns" in shaped else None,
                     **{f"shaping_{side}_drops": s["drops"] for side, s in shaped.get("stats", {}).items()})
        if p.mode in WINDOW_MODES:
            m["window_bytes"] = limit.rcvbuf_bytes
        if m.get("connect_s") is None:
            return RunOutput(metrics=m, tables=result.tables, status="failed",
                             reason=f"workload: connection failed (errno {m.get('errno')})")
        m["stalled"] = is_stalled(m)
        ts = result.tables["timeseries"]
        binned = rates(ts, "client", p.bin_s, min(p.seconds, m.get("transfer_s") or p.seconds))
        m.update(summarise(binned, ts, p, names))
        tables = dict(result.tables)
        tables["timeseries"] = pd.concat(
            [ts, frame("timeseries", [{"t": r.t, "host": "client", "series": "rate_mbit", "key": r.key,
                                       "value": r.value} for r in binned.itertuples()])], ignore_index=True)
        # the option's choices where the draft leaves them open (the server enforces by pacing)
        protocol = {"srl": srl_option.describe("pacing")} if p.mode == "srl" else {}
        problem = invalid_reason(m, shaped, p, len(names))
        if problem:
            return RunOutput(metrics=m, tables=tables, status="invalid", reason=problem, protocol=protocol)
        return RunOutput(metrics=m, tables=tables, protocol=protocol)


def stop_shaping(shaper: HostShaper, shaped: dict[str, Any]) -> None:
    """Read the shaper's queue statistics into shaped["stats"] (or the reason into
    shaped["stats_error"]), then remove the shaping whatever happened."""
    try:
        shaped["stats"] = shaper.stats() if shaper.installed else {}
    except Exception as exc:  # noqa: BLE001 - the removal below must still run
        shaped["stats_error"] = f"{type(exc).__name__}: {exc}"
    finally:
        shaper.remove()


def is_stalled(m: dict[str, Any]) -> bool:
    """Established, then no progress for stall_s: an idle timeout ended the transfer
    (what the client got is kept): the client's, or the server's, whose send blocked
    on a shut window (its close then resets the client). Any other error is not a stall."""
    return m.get("outcome") == "failed" and bool(m.get("idle_timeout") or m.get("server_idle_timeout"))


def summarise(binned: pd.DataFrame, ts: pd.DataFrame, p: Params, paths: list[str]) -> dict[str, Any]:
    """The run's metrics from its rate bins and the sender's RTT samples."""
    m: dict[str, Any] = {}
    R = p.rate_mbit
    req, acc_from = p.request_at_s, p.request_at_s + p.settle_s

    def series(key: str) -> tuple[list[float], list[float]]:
        d = binned[binned["key"] == key]
        return list(d["t"]), list(d["value"])

    def median_between(key: str, lo: float, hi: float) -> float | None:
        t, v = series(key)
        xs = [x for ti, x in zip(t, v) if lo <= ti and ti + p.bin_s <= hi]
        return statistics.median(xs) if xs else None

    end = max(binned["t"]) + p.bin_s if not binned.empty else 0.0
    warm = min(1.0, req / 2)  # slow start is not the rate before the request
    for key in ("total", *paths):
        m[f"before_mbit.{key}"] = median_between(key, warm, req)
        m[f"after_mbit.{key}"] = median_between(key, acc_from, end)
    t, v = series(p.path)
    errs = [abs(x - R) / R for ti, x in zip(t, v) if ti >= acc_from]
    m["accuracy"] = statistics.median(errs) if errs else None
    m["convergence_s"] = convergence_s(t, v, R, p.converge_band, req)
    tt, tv = series("total")
    moving = [ti for ti, x in zip(tt, tv) if x > 0]
    m["last_data_s"] = moving[-1] + p.bin_s if moving else None  # bin end of the last data delivered
    m["limited_after_mbit"] = m.get(f"after_mbit.{p.path}")
    m["total_after_mbit"] = m.get("after_mbit.total")
    before_total = m.get("before_mbit.total")
    m["total_ratio"] = (m["total_after_mbit"] / before_total
                        if before_total and m["total_after_mbit"] is not None else None)
    # the sender's view of each path's queue: its smoothed RTT, above the path's floor
    rtt = ts[ts["series"] == "srtt_ms"]
    for key in paths:
        r = rtt[rtt["key"] == key]
        if r.empty:
            continue
        after = r[r["t"] >= acc_from]["value"]
        m[f"srtt_after_ms.{key}"] = float(after.median()) if not after.empty else None
        m[f"queueing_after_ms.{key}"] = (float(after.median() - r["value"].min())
                                         if not after.empty else None)
    return m


def invalid_reason(m: dict[str, Any], shaped: dict[str, Any], p: Params, n_paths: int) -> str:
    """Why the run cannot answer the question ('' when it can): the limit not applied
    or later than one rate bin, the transfer failed other than by a stall, data not
    intact, a path without a subflow, no rate after the request."""
    if m.get("limit_error"):
        return f"the client's limit failed: {m['limit_error']}"
    if p.mode in ("srl", *WINDOW_MODES) and m.get("limit_applied_s") is None:
        return "the client never applied its limit (the transfer ended first?)"
    if p.mode == "shaping" and "applied_ns" not in shaped:
        return f"shaping was not installed: {shaped.get('error', 'the transfer ended first')}"
    # window_start is due when the connection is up, which its at (the clock's start) precedes
    late = m.get("shaping_late_s") if p.mode == "shaping" else \
        m.get("limit_applied_s") if p.mode in ("srl", "window") else None
    if late is not None and late > p.bin_s:
        return f"the limit came {late:.3g} s after the request, bound {p.bin_s:g} s (one rate bin)"
    if m.get("outcome") == "failed" and not m.get("stalled"):
        server = f"; the server's: {m['server_error']}" if m.get("server_error") else ""
        return f"the transfer failed: {m.get('error') or 'errno ' + str(m.get('errno'))}{server}"
    if m.get("stalled") and p.mode not in WINDOW_MODES:
        return f"the transfer stalled (no byte for {p.stall_s:g} s)"
    if not m.get("stalled") and not m.get("sha256_match"):
        return "data not intact (sha256 of received != sent)"
    if (m.get("subflows_max") or 0) < n_paths:
        return f"{m.get('subflows_max')} subflows, bound {n_paths} (one per path)"
    if m.get("limited_after_mbit") is None:
        return "no rate samples after the request's settle time"
    return ""
