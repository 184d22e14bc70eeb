"""The expectation table: what the drafts and physics say, what was measured, agreement.

Rows come from draft-amend-tcpm-mptcp-robe-02 Table 1 and its combinations, RFC 8684,
RFC 6356's three goals of coupled congestion control (fairness runs),
the physical limits (one RTT of the fastest working path, the Linux SYN schedule,
Σ rates) and this testbed's own targets (setup within 5 ms of the bound, the
kernel's simult_flows selftest bound of 90 % of Σ rates, failover integrity).
The `source` column names exactly one of those: the user reads where a claim
comes from, in the words of the documents and the project.
Every row gets a measured value and a verdict — "holds", "does not hold" or
"not measured" — never an empty cell: a missing cell says which runs are missing.

Path RTTs and faults are what each run recorded for its links at the end
(`links_at_end`: the experiment's own change of the default path included),
read through analysis.paths; nothing the run already knows is recomputed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import pandas as pd

from analysis import Results, esim_checks, inactivity, paths, privacy, rate_limit
from analysis.establishment_checks import (FAILS, HOLDS, NOT_MEASURED,
                                           SIMULT_FLOWS, Establishment, bounded, ci_text, delayed,
                                           fallback, fastest_working, guaranteed, multipath_after,
                                           no_connection, setup_matches, syn_schedule, timer_floor)
from analysis.stats import bootstrap_ci
from testbed.mptcp.linux import SYN_GIVEUP_S

__all__ = ["table", "Row", "HOLDS", "FAILS", "NOT_MEASURED"]

# The sources a row may name (what the report's "source" column says).
DRAFT = "draft-amend-tcpm-mptcp-robe-02"
TARGET = "this testbed's target"
SIMULT = TARGET + " (Linux simult_flows selftest: 90 % of Σ rates)"


@dataclass
class Row:
    """One row of the expectation table: source, subject, condition, expectation, criterion, measurement, verdict."""
    source: str
    subject: str
    condition: str
    expected: str
    criterion: str
    measured: str
    verdict: str


# ---- the table -----------------------------------------------------------------
Check = Callable[[], tuple[str, str, str]]


def _establishment_rows(E: Establishment) -> list[Row]:
    rows: list[Row] = []
    t1 = DRAFT + ", Table 1"

    def add(source: str, subject: str, cond: str, expected: str, check: Check) -> None:
        crit, meas, verdict = check()
        rows.append(Row(source, subject, cond, expected, crit, meas, verdict))

    present = set(E.df["param.condition"].astype(str)) if not E.df.empty else set()
    lossy = sorted(s for s in present if s.startswith("lossy")) or ["lossy30"]
    for sc in lossy:
        add(t1, "MPTCP", f"packet loss ({sc})", "delayed connection", lambda sc=sc: delayed(E, sc, "mptcp"))
        add(t1, "TIMER", f"packet loss ({sc})", "bounded by the timer", lambda sc=sc: bounded(E, sc, "timer", True))
        add(t1, "SIM", f"packet loss ({sc})", "no impact", lambda sc=sc: bounded(E, sc, "sim", False))
        add(t1, "IPS", f"packet loss ({sc})", "delayed connection", lambda sc=sc: delayed(E, sc, "ips"))
    add(t1, "MPTCP", "broken (blackhole)", "no connection", lambda: no_connection(E, "blackhole", "mptcp"))
    t16 = t1 + " / " + TARGET
    add(t16, "TIMER", "broken (blackhole)", "bounded by the timer", lambda: bounded(E, "blackhole", "timer", True))
    add(t16, "SIM", "broken (blackhole)", "no impact", lambda: bounded(E, "blackhole", "sim", False))
    add(t1, "IPS", "broken (blackhole)", "no connection", lambda: no_connection(E, "blackhole", "ips"))
    sd = "setup time depends on (slow_default)"
    add(t1, "MPTCP", sd, "default route", lambda: setup_matches(E, "slow_default", "mptcp", "default"))
    add(t1, "TIMER", sd, "default route (+ path 1..n)", lambda: setup_matches(E, "slow_default", "timer", "default"))
    add(t16, "SIM", sd, "fastest path", lambda: setup_matches(E, "slow_default", "sim", "fastest"))
    add(t1, "IPS", sd, "selected path", lambda: setup_matches(E, "slow_default", "ips", "selected"))
    ma = "multipath available after (healthy)"
    add(t1, "MPTCP", ma, "MP_CAPABLE HS + MP_JOIN HS", lambda: multipath_after(E, "healthy", "mptcp"))
    add(t1, "TIMER", ma, "sum of tried MP_CAPABLE HS + MP_JOIN HS (one tried when healthy)",
        lambda: multipath_after(E, "healthy", "timer"))
    add(t16, "SIM", ma, "MP_CAPABLE HS + MP_JOIN HS", lambda: multipath_after(E, "healthy", "sim"))
    add(t1, "IPS", ma, "MP_CAPABLE HS + MP_JOIN HS", lambda: multipath_after(E, "healthy", "ips"))
    sg = "session setup guaranteed (all conditions)"
    add(t1, "MPTCP", sg, "depends on default route", lambda: guaranteed(E, "mptcp", "default"))
    add(t1, "TIMER", sg, "yes", lambda: guaranteed(E, "timer", "yes"))
    add(t1, "SIM", sg, "yes", lambda: guaranteed(E, "sim", "yes"))
    add(t1, "IPS", sg, "depends on selection", lambda: guaranteed(E, "ips", "selection"))
    # eSIM's column: the user-space stack on both sides (analysis.esim_checks)
    rows += [Row(*r) for r in esim_checks.expectation_rows(E.res)]
    dr = DRAFT + ", combinations"
    add(dr, "TIMER+IPS", "broken (blackhole)", "IPS picks, the timer moves on: bounded by the timer",
        lambda: bounded(E, "blackhole", "timer+ips", True))
    add(dr, "SIM+IPS", sd, "with history: the IPS-selected path", lambda: setup_matches(E, "slow_default", "sim+ips", "selected"))
    return rows


def _throughput_rows(res: Results) -> list[Row]:
    runs = res.of("throughput")
    src = "physical limit"
    if runs.empty or "metric.efficiency" not in runs:
        why = "not measured (no complete runs of throughput with metric.efficiency)"
        return [Row(src, "throughput", "any", "goodput ≤ Σ configured rates", "max efficiency ≤ 1.0", why, NOT_MEASURED),
                Row(SIMULT, "throughput", "equal paths", "efficiency ≥ 0.90",
                    "median efficiency ≥ 0.90", why, NOT_MEASURED)]
    eff = runs["metric.efficiency"].astype("float64")
    rows = [Row(src, "throughput", "all runs", "goodput ≤ Σ configured rates", "max efficiency ≤ 1.0",
                f"max {eff.max():.3f} (n={eff.notna().sum()})",
                HOLDS if eff.max() <= 1.0 else FAILS)]

    def equal(r: pd.Series) -> bool:
        ps = paths(res.manifests.get((r["experiment"], r["run_id"]), {}))
        rates = {p["rate_mbit"] for p in ps}
        rtts = {round(p["rtt_s"], 6) for p in ps}
        return len(ps) > 1 and len(rates) == 1 and None not in rates and len(rtts) == 1
    eq = runs[runs.apply(equal, axis=1)]
    if eq.empty:
        rows.append(Row(SIMULT, "throughput", "equal paths", "efficiency ≥ 0.90",
                        "median efficiency ≥ 0.90", "not measured (no runs with equal rates and delays)",
                        NOT_MEASURED))
    from analysis.figures import variant_label
    eq = eq.assign(variant=variant_label(eq))
    for v, g in eq.groupby("variant", observed=True):
        ci = bootstrap_ci(g["metric.efficiency"])
        rows.append(Row(SIMULT, "throughput", f"equal paths: {v}",
                        "efficiency ≥ 0.90", "median efficiency ≥ 0.90",
                        f"median {ci.estimate:.3f}" + (f" [{ci.low:.3f}, {ci.high:.3f}]" if np.isfinite(ci.low) else "")
                        + f" (n={ci.n})", HOLDS if ci.estimate >= SIMULT_FLOWS else FAILS))
        if {"metric.goodput_mbit", "metric.best_path_mbit"} <= set(g.columns):
            better = (g["metric.goodput_mbit"].astype(float) > g["metric.best_path_mbit"].astype(float))
            rows.append(Row(TARGET, "throughput", f"equal paths: {v}", "aggregate > best single path",
                            "every run's goodput > the best path's configured rate",
                            f"{int(better.sum())}/{len(g)} runs", HOLDS if better.all() else FAILS))
    return rows


def _failover_rows(res: Results) -> list[Row]:
    runs = res.of("failover")
    if runs.empty:
        why = "not measured (no complete runs of failover)"
        return [Row(TARGET, "failover", "any", "integrity always holds (sha256)", "every run sha256 equal", why, NOT_MEASURED),
                Row(TARGET, "failover", "any", "data keeps flowing on the other path", "every run recovered", why, NOT_MEASURED)]
    rows = []
    integ = [c for c in runs.columns if c.startswith("metric.") and ("sha256" in c or "integrity" in c)]
    if integ:
        ok = runs[integ[0]].astype("boolean").fillna(False)
        rows.append(Row(TARGET, "failover", "all variants", "integrity always holds (sha256)",
                        "every run's sha256 equal", f"{int(ok.sum())}/{len(runs)} runs", HOLDS if ok.all() else FAILS))
    else:
        rows.append(Row(TARGET, "failover", "all variants", "integrity always holds (sha256)",
                        "every run's sha256 equal", "not measured (no sha256/integrity metric)", NOT_MEASURED))
    from analysis.figures import variant_label
    runs = runs.assign(variant=variant_label(runs))
    for v, g in runs.groupby("variant", observed=True):
        rec = g["metric.recovery_s"].astype("float64") if "metric.recovery_s" in g else pd.Series(np.nan, index=g.index)
        stall = g["metric.stall_s"] if "metric.stall_s" in g else pd.Series(dtype=float)
        meas = f"stall {ci_text(stall)}; recovery {ci_text(rec)}; {int(rec.notna().sum())}/{len(g)} recovered"
        rows.append(Row(TARGET, "failover", v, "data keeps flowing on the other path; stall and recovery "
                        "reported as distributions", "every run back to ≥ 90 % of the remaining path",
                        meas, HOLDS if rec.notna().all() else FAILS))
    return rows


RFC6356 = "RFC 6356, section 2.1"
OLIA_SOURCE = "RFC 6356 goals, OLIA (Khalili et al.)"
# Who the fairness rows judge: (subject, source, stack, the MPTCP connection's cc or None for any).
IMPLEMENTATIONS = [("kernel MPTCP", RFC6356, "kernel", None),
                   ("user-space stack, LIA", RFC6356, "user", "lia"),
                   ("user-space stack, OLIA", OLIA_SOURCE, "user", "olia"),
                   ("user-space stack, CUBIC (uncoupled control)", RFC6356, "user", "cubic")]
FAIRNESS_GOALS = [("do no harm", "shared bottleneck",
                   "takes no more than one TCP flow's share, 1/(M+1)", "median share / (1/(M+1)) ≤ 1.1"),
                  ("improve throughput", "disjoint paths",
                   "at least what a TCP flow gets on the best path", "median MPTCP / best TCP goodput ≥ 0.9"),
                  ("balance congestion", "disjoint paths",
                   "moves traffic off the congested path: all flows near equal", "median Jain's index ≥ 0.95")]
FAIRNESS_NEEDS = {"metric.shared_bottleneck", "metric.mptcp_share_ratio", "metric.jain_index",
                  "metric.mptcp_goodput_mbit", "metric.tcp_max_goodput_mbit"}


def _fairness_runs_of(runs: pd.DataFrame, stack: str, cc: str | None) -> pd.DataFrame:
    """The fairness runs of one implementation (runs from before the stack choice are kernel runs)."""
    stacks = (runs["metric.stack"].astype("string").fillna("kernel") if "metric.stack" in runs
              else pd.Series("kernel", index=runs.index, dtype="string"))
    sel = runs[stacks == stack]
    if cc is not None:
        sel = sel[sel["metric.cc"].astype("string") == cc] if "metric.cc" in sel else sel.iloc[0:0]
    return sel


def _fairness_rows(res: Results) -> list[Row]:
    """RFC 6356's three goals, judged on the fairness runs of each implementation:
    kernel MPTCP (uncoupled), the user-space stack's LIA and OLIA, and its
    uncoupled CUBIC as the control."""
    runs = res.of("fairness")
    complete = not runs.empty and FAIRNESS_NEEDS <= set(runs.columns)
    rows: list[Row] = []
    for subject, source, stack, cc in IMPLEMENTATIONS:
        which = f"stack {stack}" + (f", cc {cc}" if cc else "")
        sel = _fairness_runs_of(runs, stack, cc) if complete else runs.iloc[0:0]
        if sel.empty:
            why = f"not measured (no complete runs of fairness with {which})"
            rows += [Row(source, subject, f"{c} ({g})", e, k, why, NOT_MEASURED) for g, c, e, k in FAIRNESS_GOALS]
            continue
        shared = sel["metric.shared_bottleneck"].astype("boolean").fillna(False)
        sh, dj = sel[shared], sel[~shared]
        ratio = sh["metric.mptcp_share_ratio"].astype("float64")
        best = (dj["metric.mptcp_goodput_mbit"].astype("float64")
                / dj["metric.tcp_max_goodput_mbit"].astype("float64"))
        jain = dj["metric.jain_index"].astype("float64")
        checks = [(ratio, lambda x: x <= 1.1), (best, lambda x: x >= 0.9), (jain, lambda x: x >= 0.95)]
        for (g, c, e, k), (vals, ok) in zip(FAIRNESS_GOALS, checks):
            ci = bootstrap_ci(vals) if vals.notna().any() else None
            if ci is None or ci.n == 0:
                rows.append(Row(source, subject, f"{c} ({g})", e, k,
                                f"not measured (no complete {c} runs with {which})", NOT_MEASURED))
                continue
            measured = f"median {ci.estimate:.2f}" + (
                f" [{ci.low:.2f}, {ci.high:.2f}]" if np.isfinite(ci.low) else "") + f" (n={ci.n})"
            rows.append(Row(source, subject, f"{c} ({g})", e, k, measured,
                            HOLDS if ok(ci.estimate) else FAILS))
    return rows


def table(res: Results) -> pd.DataFrame:
    """The expectation table: every row checked against the results."""
    E = Establishment(res)
    rows = _establishment_rows(E)
    lim = "physical limit"

    def add(source: str, subject: str, cond: str, expected: str, check: Check) -> None:
        crit, meas, verdict = check()
        rows.append(Row(source, subject, cond, expected, crit, meas, verdict))

    add(lim, "any strategy", "all conditions", "cannot beat one RTT of the fastest working path", lambda: fastest_working(E))
    add(lim, "TIMER", "broken (blackhole)", "cannot connect before the timer + one RTT of the next path",
        lambda: timer_floor(E, "blackhole", "timer"))
    add(lim + " (Linux SYN schedule)", "MPTCP", "broken (blackhole)",
        f"no connection (Linux gives up after ~{SYN_GIVEUP_S} s); SYNs at 0,1,2 s (MP_CAPABLE), 3,4,5,7,11,… s",
        lambda: syn_schedule(E, "mptcp"))
    add(lim + " (Linux SYN schedule)", "TCP", "broken (blackhole)", "SYNs at 0,1,2,3,4,5,7,11,… s",
        lambda: syn_schedule(E, "tcp"))
    add(lim + " (Linux SYN schedule)", "MPTCP", "MPTCP SYNs dropped (mptcp_drop)",
        "fallback to plain TCP after ~3 s", lambda: fallback(E))
    add("RFC 8684 / " + TARGET, "MPTCP", "healthy", "setup ≈ 1 RTT of the default path (MP_CAPABLE handshake)",
        lambda: setup_matches(E, "healthy", "mptcp", "default"))
    add(TARGET, "TCP", "healthy", "setup ≈ 1 RTT of the default path",
        lambda: setup_matches(E, "healthy", "tcp", "default"))
    add(TARGET, "IPS", "healthy, non-default path faster (slow_default)", "picks the faster path after warm-up",
        lambda: setup_matches(E, "slow_default", "ips", "fastest"))
    rows += _throughput_rows(res)
    rows += _failover_rows(res)
    rows += _fairness_rows(res)
    rows += [Row(*r[:6], NOT_MEASURED if r[6] is None else HOLDS if r[6] else FAILS)
             for r in privacy.expectation_rows(res)]
    rows += [Row(*r[:6], NOT_MEASURED if r[6] is None else HOLDS if r[6] else FAILS)
             for r in rate_limit.expectation_rows(res)]
    rows += [Row(*r[:6], NOT_MEASURED if r[6] is None else HOLDS if r[6] else FAILS)
             for r in inactivity.expectation_rows(res)]
    out = pd.DataFrame([asdict(r) for r in rows])
    return out.fillna("n/a").replace("", "n/a")
