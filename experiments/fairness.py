"""Fairness (RFC 6356's goals): one MPTCP connection against M single-path TCP
flows through shared bottleneck(s).

The topology's first client opens one MPTCP connection (a subflow per path);
every cross-traffic host ("host" role) sends one TCP flow; all go to the
server at once, each with its own congestion control set per socket (a
namespace cannot change the kernel default, bbr). Goodput per flow is read
over [warmup_s, seconds] (the TCP senders' acked bytes, MPTCP's received bytes).

Metrics: each flow's goodput and share of the total, Jain's fairness index
over all flows, MPTCP's share against a single flow's fair share 1/(M+1), and
the bottleneck utilisation (total goodput / the capacity of the links the
client's paths share beyond their access links).

The MPTCP connection is kernel MPTCP (`stack = "kernel"`, no coupled
congestion control: cubic, reno or bbr per socket) or the user-space stack
(`stack = "user"`, testbed.stack attached to the client's path interfaces, one
subflow per path, the default path first) with `cc` one of its controllers: the
coupled LIA (RFC 6356) and OLIA, or uncoupled cubic/reno as the control.
"""
from __future__ import annotations

from typing import Literal

import pandas as pd
from pydantic import Field, model_validator

from testbed.core.bulk import Sender, run_flows
from testbed.harness.experiment import Experiment, ExperimentParams, RunContext, RunOutput, register
from testbed.harness.workload.user_socket import UserSocket, open_stack
from testbed.stack.cc import CONTROLLERS, Coupled

BASE_PORT = 5400


class Params(ExperimentParams):
    """Parameters of the fairness experiment."""
    seconds: float = Field(20, gt=2, le=600)
    warmup_s: float = Field(5, ge=0, le=300, description="left out of the goodput window")
    tcp_cc: Literal["cubic", "reno", "bbr"] | None = Field(
        None, description="the TCP flows' congestion control (default: the client's)")
    stack: Literal["kernel", "user"] = Field(
        "kernel", description="the MPTCP connection: kernel sockets, or the user-space stack")
    cc: Literal["cubic", "reno", "bbr", "lia", "olia"] | None = Field(
        None, description="the MPTCP connection's congestion control (kernel default: the client's; "
                          "lia and olia are the user-space stack's coupled ones)")

    @model_validator(mode="after")
    def _window(self) -> "Params":
        if self.warmup_s >= self.seconds - 1:
            raise ValueError(f"warmup_s ({self.warmup_s:g}) must end at least 1 s before "
                             f"seconds ({self.seconds:g})")
        if self.stack == "kernel" and self.cc in ("lia", "olia"):
            raise ValueError(f"cc {self.cc!r} is coupled congestion control, which kernel MPTCP does not "
                             f"have: set stack = 'user'")
        if self.stack == "user" and self.cc not in CONTROLLERS:
            raise ValueError(f"stack 'user' needs cc, one of the user-space stack's "
                             f"({', '.join(CONTROLLERS)}), not {self.cc!r}")
        return self


class UserSender(UserSocket):
    """The user-space stack's MPTCP connection as run_flow's sender."""

    def extra_subflows(self) -> int:
        """Subflows beyond the initial one that got past their handshake."""
        return max(0, len(self.subflow_counters()) - 1)


def user_sender(tb, cc: str):
    """A factory of UserSenders on the client's paths (the default path first, one subflow per path)."""
    default = tb.topology.default.name
    paths = [q.addr.client for q in sorted(tb.paths, key=lambda q: q.name != default)]
    return lambda: UserSender(open_stack(tb.client.pid, cc), owns_stack=True, paths=paths)


def jain(xs: list[float]) -> float:
    """Jain's fairness index: (Σx)² / (n·Σx²); 1 = equal shares, 1/n = one takes all."""
    squares = sum(x * x for x in xs)
    return sum(xs) ** 2 / (len(xs) * squares) if squares else float("nan")


def shared_capacity_mbit(tb) -> float:
    """Σ rate of the distinct links the first client's paths cross beyond their
    access links (the bottlenecks it shares with the cross traffic)."""
    g = tb.graph
    crossed = {name for p in g.paths_of(g.client) for name in p.links[1:]}
    rates = [g.link(n).spec.direction("up").rate_mbit for n in crossed
             if g.link(n).spec.emulated]
    return float(sum(r for r in rates if r))


def paths_share_a_link(tb) -> bool:
    """Whether the first client's paths cross a common emulated link."""
    g = tb.graph
    sets = [{n for n in p.links[1:] if g.link(n).spec.emulated} for p in g.paths_of(g.client)]
    return bool(set.intersection(*sets)) if len(sets) > 1 else False


@register
class Fairness(Experiment):
    """One MPTCP connection against M TCP flows at shared or disjoint bottlenecks."""
    name = "fairness"
    description = "one MPTCP connection vs M TCP flows at shared or disjoint bottlenecks"
    Params = Params
    # Two at once keep every run valid, kernel and user-space stack alike
    # (quick scenarios: 1.86x and 1.80x, none voided): docs/performance.md.
    max_parallel = 2

    def run(self, ctx: RunContext) -> RunOutput:
        p: Params = ctx.params
        tb = ctx.tb
        client_cc = tb.settings["client"].congestion_control
        cc = p.cc or client_cc
        hosts = tb.graph.nodes("host")
        senders = [Sender("mptcp", tb.client.pid, BASE_PORT, "mptcp", cc,
                          user_sender(tb, cc) if p.stack == "user" else None)]
        senders += [Sender(h, tb.node(h).pid, BASE_PORT + i, "tcp", p.tcp_cc or client_cc)
                    for i, h in enumerate(hosts, start=1)]
        ctx.start_clock()
        flows = run_flows(senders, tb.server.pid, tb.server_addr, [p.warmup_s, p.seconds],
                          acked_patience_s=0)
        rows = []
        for s in senders:
            f = flows[s.name]
            rows.append({"flow": s.name, "protocol": s.protocol, "cc": s.cc,
                         "goodput_mbit": f.goodput_mbit(0, 1) if len(f.marks) == 2 else float("nan"),
                         "subflows": f.subflows + 1 if s.protocol == "mptcp" else 1,
                         "source": f.source, "error": f.error})
        df = pd.DataFrame(rows)
        broken = df[df["goodput_mbit"].isna() | df["error"].notna()]
        if not broken.empty:
            first = broken.iloc[0]
            return RunOutput(metrics={}, status="failed",
                             reason=f"flow {first['flow']}: {first['error'] or 'ended before its window'}")
        total = float(df["goodput_mbit"].sum())
        df["share"] = df["goodput_mbit"] / total if total else float("nan")
        mptcp = df.iloc[0]
        fair = 1 / len(senders)
        capacity = shared_capacity_mbit(tb)
        m = {
            "flows": len(senders), "tcp_flows": len(hosts), "cc": cc, "tcp_cc": p.tcp_cc or client_cc,
            "stack": p.stack, "coupled": p.stack == "user" and issubclass(CONTROLLERS[cc], Coupled),
            "mptcp_subflows": int(mptcp["subflows"]),
            "mptcp_goodput_mbit": float(mptcp["goodput_mbit"]),
            "tcp_mean_goodput_mbit": float(df["goodput_mbit"].iloc[1:].mean()) if hosts else None,
            "total_goodput_mbit": total, "jain_index": jain(list(df["goodput_mbit"])),
            "mptcp_share": float(mptcp["share"]), "fair_share": fair,
            "mptcp_share_ratio": float(mptcp["share"]) / fair,
            "shared_capacity_mbit": capacity, "shared_bottleneck": paths_share_a_link(tb),
            "tcp_max_goodput_mbit": float(df["goodput_mbit"].iloc[1:].max()) if hosts else None,
            "utilisation": total / capacity if capacity else None,
            **{f"goodput.{r.flow}": r.goodput_mbit for r in df.itertuples()},
            **{f"share.{r.flow}": r.share for r in df.itertuples()},
        }
        if int(mptcp["subflows"]) < len(tb.paths):
            return RunOutput(metrics=m, status="invalid",
                             reason=f"MPTCP used {int(mptcp['subflows'])} subflows, bound "
                                    f"{len(tb.paths)} (one per path)")
        return RunOutput(metrics=m)
