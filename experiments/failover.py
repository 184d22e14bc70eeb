"""Failover: bulk transfer over two paths; the primary fails mid-transfer.

The failure is a timed event of the scenario (link_down, blackhole, or
set_link loss_pct=100), so one scenario file sweeps all kinds through its
grid. Metrics: longest stall in delivered bytes, time until goodput is back to
>= 90 % of what the remaining paths can carry, bytes, integrity (sha256).
"""
from __future__ import annotations

from typing import Literal

import pandas as pd
from pydantic import Field

from testbed.harness import workload
from testbed.harness.experiment import Experiment, RunContext, RunOutput, register
from testbed.harness.workload.app_workload import StackChoice

FAILURES = {"link_down", "blackhole", "set_link"}


class Params(StackChoice):
    """Parameters of the failover experiment (client_stack / server_stack: kernel or user)."""
    seconds: float = Field(12, gt=2, le=600)
    direction: Literal["up", "down"] = "up"
    recovery_window_s: float = Field(0.5, gt=0, description="goodput averaging window")
    recovery_fraction: float = Field(0.9, gt=0, le=1)


def stall_and_recovery(series: pd.DataFrame, fault_t: float, remaining_mbit: float,
                       window_s: float, fraction: float) -> tuple[float | None, float | None]:
    """Longest gap without delivered bytes after the fault, and the time from the
    fault until goodput over `window_s` first reaches fraction x remaining rate."""
    after = series[series.t >= fault_t].sort_values("t")
    if after.empty:
        return None, None
    delivering = after[after.value > 0].t.tolist()
    edges = [fault_t, *delivering]
    stall = max((b - a for a, b in zip(edges, edges[1:])), default=after.t.max() - fault_t)
    step = after.t.diff().median() or 0.01
    n = max(1, round(window_s / step))
    mbit = after.value.rolling(n).sum() * 8 / (n * step) / 1e6
    ok = after.t[mbit >= fraction * remaining_mbit]
    recovery = float(ok.iloc[0] - fault_t) if len(ok) else None
    return float(stall), recovery


def connect_start(events: pd.DataFrame | None) -> float | None:
    """When the client began connecting, in seconds since t0 (app events)."""
    if events is None or not len(events):
        return None
    rows = events[(events.source == "app") & (events.event == "connect_start")]
    return float(rows.t.min()) if len(rows) else None


@register
class Failover(Experiment):
    """The primary path fails during a bulk transfer: stall, recovery and integrity."""
    name = "failover"
    description = "primary path fails during a bulk transfer: stall, recovery, integrity"
    Params = Params
    # Two at once: 2.05x on the quick scenario at 3 repetitions, none voided, recovery
    # times within the spread of two serial sweeps: docs/performance.md.
    max_parallel = 2

    def run(self, ctx: RunContext) -> RunOutput:
        p: Params = ctx.params
        tb = ctx.tb
        faults = [e for e in ctx.spec.scenario.events if e.action in FAILURES]
        load = workload.get("app", mode="bulk", seconds=p.seconds, direction=p.direction,
                            protocol="mptcp", cc=tb.settings["client"].congestion_control,
                            client_stack=p.client_stack, server_stack=p.server_stack,
                            user_scheduler=p.user_scheduler)
        result = load.run(tb, ctx.raw_dir, ctx.t0_ns, timeout_s=p.seconds + 30)
        m = dict(result.metrics)
        if m.get("outcome") == "failed":
            return RunOutput(metrics=m, tables=result.tables, status="failed",
                             reason=f"workload: connection failed (errno {m.get('errno')})")
        started = connect_start(result.tables.get("events"))
        if faults and started is not None and started >= faults[0].at_s:
            return RunOutput(metrics=m, tables=result.tables, status="invalid",
                             reason=f"the fault at {faults[0].at_s:g} s came before the transfer "
                                    f"started ({started:.2f} s): nothing to fail over")
        ts = result.tables.get("timeseries")
        if faults and ts is not None and len(ts):
            fault = faults[0]
            # What the other paths carry end to end: each one's links composed.
            remaining = sum(tb.graph.composed(q.graph).direction(p.direction).rate_mbit or 0
                            for q in tb.paths if q.name != fault.path)
            total = ts[(ts.series == "delivered_bytes") & (ts.key == "total")]
            stall, recovery = stall_and_recovery(total, fault.at_s, remaining,
                                                 p.recovery_window_s, p.recovery_fraction)
            m.update({"fault_at_s": fault.at_s, "fault": fault.action, "failed_path": fault.path,
                      "remaining_rate_mbit": remaining, "stall_s": stall, "recovery_s": recovery,
                      "recovered": recovery is not None})
        return RunOutput(metrics=m, tables=result.tables)
