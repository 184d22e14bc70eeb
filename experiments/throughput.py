"""Throughput: one bulk MPTCP (or TCP) transfer over 1..N paths.

Metrics: aggregate goodput, efficiency = goodput / sum of configured rates
(kernel simult_flows bound: >= 0.9 for equal paths), each path's share of the
bytes on the wire, transfer time against the ideal size*8 / sum of rates.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from testbed.harness import workload
from testbed.harness.experiment import Experiment, RunContext, RunOutput, register
from testbed.harness.workload.app_workload import StackChoice, check_stacks


class Params(StackChoice):
    """Parameters of the throughput experiment (client_stack / server_stack: kernel or user)."""
    seconds: float = Field(10, gt=1, le=600)
    direction: Literal["up", "down"] = "up"
    protocol: Literal["mptcp", "tcp"] = "mptcp"
    tool: Literal["app", "iperf3"] = "app"

    @model_validator(mode="after")
    def _stacks(self) -> "Params":
        if self.tool == "iperf3" and "user" in (self.client_stack, self.server_stack):
            raise ValueError("the user-space stack runs with tool 'app' (iperf3 uses kernel sockets)")
        check_stacks(self.client_stack, self.server_stack, self.protocol)
        return self


def configured_rates(tb, direction: str) -> dict[str, float]:
    """Each path's configured rate in one direction: its slowest link's (the
    path's links composed), and where paths share a shaped link, their sum capped
    by that link's rate (spread in proportion, for the share metric)."""
    rates = {p.name: tb.graph.composed(p.graph).direction(direction).rate_mbit or 0.0
             for p in tb.paths}
    sharing: dict[str, tuple[float, list[str]]] = {}
    for p in tb.paths:
        for hop in tb.graph.hops(p.graph):
            rate = (hop.up if direction == "up" else hop.down).rate_mbit
            if rate:
                sharing.setdefault(hop.name, (rate, []))[1].append(p.name)
    for cap, users in sharing.values():
        total = sum(rates[u] for u in users)
        if len(users) > 1 and total > cap:
            rates.update({u: rates[u] * cap / total for u in users})
    return rates


@register
class Throughput(Experiment):
    """A bulk transfer over 1..N paths: goodput, efficiency and per-path share."""
    name = "throughput"
    description = "bulk transfer over 1..N paths: goodput, efficiency, per-path share"
    Params = Params
    # Two bulk runs at once keep every run valid here (quick scenario: 1.89x, none
    # voided; three at once too, once): docs/performance.md.
    max_parallel = 2

    def run(self, ctx: RunContext) -> RunOutput:
        p: Params = ctx.params
        tb = ctx.tb
        cc = tb.settings["client"].congestion_control
        if p.tool == "app":
            load = workload.get("app", mode="bulk", seconds=p.seconds, direction=p.direction,
                                protocol=p.protocol, cc=cc, client_stack=p.client_stack,
                                server_stack=p.server_stack, user_scheduler=p.user_scheduler)
        else:
            load = workload.get("iperf", seconds=p.seconds, reverse=p.direction == "down",
                                protocol=p.protocol, cc=cc)
        before = tb.interface_bytes()
        result = load.run(tb, ctx.raw_dir, ctx.t0_ns, timeout_s=p.seconds + 30)
        after = tb.interface_bytes()
        key = "tx_bytes" if p.direction == "up" else "rx_bytes"
        wire = {n: after[n][key] - before[n][key] for n in before}
        total_wire = sum(wire.values()) or 1
        rates = configured_rates(tb, p.direction)
        sum_rates = sum(rates.values())
        m = dict(result.metrics)
        if m.get("outcome") == "failed":
            return RunOutput(metrics=m, tables=result.tables, status="failed",
                             reason=f"workload: connection failed (errno {m.get('errno')})")
        goodput = m.get("goodput_mbit") or 0.0
        m.update({
            "sum_rates_mbit": sum_rates,
            "best_path_mbit": max(rates.values()),
            "efficiency": goodput / sum_rates if sum_rates else None,
            "paths": len(tb.paths),
            "cc": cc,
            **{f"share.{n}": b / total_wire for n, b in wire.items()},
        })
        if m.get("bytes") and sum_rates:
            m["ideal_transfer_s"] = m["bytes"] * 8 / (sum_rates * 1e6)
        return RunOutput(metrics=m, tables=result.tables)
