"""RobE_eSIM's column of the draft's Table 1, and RobE over the user-space stack
next to RobE over kernel sockets: criteria and tables for analysis.expectations
and the report.

Each criterion reads one explicit pair of stacks (`Establishment(res,
client_stack, server_stack)`): eSIM's cells are user-stack client against the
user-space stack's server (the only server that accepts eSIM,
experiments/robe-esim.toml); its fallback is the user-stack client against the
kernel server; the kernel-socket cells of the draft's other columns stay
kernel/kernel. No run is counted in two kinds of cell.

Multipath is judged on `metric.multipath_client_s`: the moment the client could
use its join, stamped alike for both clients (kernel sockets: the
sub_established event, fired when the join's SYN/ACK arrived; user stack: when
it sent the join's final ACK, MP_JOIN's third ACK or eSIM's MP_JOIN_CAP).
`metric.multipath_s` of the user stack is the server's fourth ACK, one RTT of
the joined path later (docs/robe.md). Runs from before the metric have none and
fall back to multipath_s for kernel clients, where the two are the same moment.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis import Results
from analysis.establishment_checks import (EARLY_S, FAILS, HOLDS, MIN_RUNS_RANDOM, NOT_MEASURED, TOL_S,
                                           Establishment, _connected, _failed_str, ci_text, fmt_s, guaranteed, pct95)
from analysis.stats import clean

ESIM_CONDITIONS = ["healthy", "lossy10", "blackhole", "slow_default", "mptcp_drop"]
COMPARED = ["sim", "timer", "mptcp"]  # the strategies run over both clients (experiments/robe-user.toml)
SAME_S = 0.001  # user-stack and kernel-socket RobE: medians within 1 ms


def multipath_client(cell: pd.DataFrame) -> pd.Series:
    """The comparable multipath stamp (s since connect()); NaN where no join was usable."""
    if "metric.multipath_client_s" in cell:
        v = cell["metric.multipath_client_s"].astype("float64")
        if "metric.multipath_s" in cell:  # stores from before the metric: kernel clients only
            kernel = cell.get("param.client_stack", pd.Series("kernel", index=cell.index)).fillna("kernel")
            v = v.where(v.notna() | (kernel != "kernel"), cell["metric.multipath_s"].astype("float64"))
        return v
    if "metric.multipath_s" in cell:
        return cell["metric.multipath_s"].astype("float64")
    return pd.Series(np.nan, index=cell.index, dtype="float64")


def _usable(p: dict, strategy: str) -> bool:
    """The path carries this strategy's handshakes: not blackholed, no middlebox dropping its MPTCP SYNs."""
    return not p.get("blackholed") and not (p.get("middlebox") == "mptcp_drop" and strategy != "tcp")


def working_rtts(E: Establishment, cell: pd.DataFrame, strategy: str) -> tuple[list[dict], list[dict]]:
    """(usable paths, usable paths without loss) of the cell, as its first run left them."""
    ps = [p for p in E.paths(cell) if _usable(p, strategy)]
    return ps, [p for p in ps if not p.get("loss_pct")]


def setup_fastest(E: Establishment, sc: str, st: str) -> tuple[str, str, str]:
    """No impact: setup within one RTT of the fastest working (usable, loss-free) path + 5 ms, every run connected."""
    cell = E.cell(sc, st)
    crit = "p95 setup ≤ RTT of the fastest working path + 5 ms; every run connected"
    if cell.empty:
        return crit, E.missing(sc, st) + f" ({E.stacks()})", NOT_MEASURED
    usable, clean_paths = working_rtts(E, cell, st)
    if not usable:
        return crit, "not measured (path RTTs not in the manifests)", NOT_MEASURED
    # A lossy handshake may wait for a SYN retransmission; what SIM and eSIM promise is
    # that the loss-free path does not: the bound is the fastest path without loss.
    best = min(clean_paths or usable, key=lambda p: p["rtt_s"])
    bound = best["rtt_s"] + TOL_S
    crit = (f"p95 setup ≤ RTT of the fastest working path ({best['name']}: {fmt_s(best['rtt_s'])}"
            f"{', loss-free' if len(clean_paths) < len(usable) else ''}) + 5 ms = {fmt_s(bound)}; "
            "every run connected")
    p95 = pct95(cell["metric.setup_s"])
    meas = f"p95 {fmt_s(p95)}, {ci_text(cell['metric.setup_s'])}; {_failed_str(cell)}"
    return crit, meas, HOLDS if bool(_connected(cell).all()) and p95 <= bound else FAILS


def multipath_slowest(E: Establishment, sc: str, st: str = "esim") -> tuple[str, str, str]:
    """eSIM: multipath available after the slowest path's MP_CAPABLE handshake (+ 5 ms), where every path works."""
    cell = E.cell(sc, st)
    crit = ("multipath (client's stamp) ≤ RTT of the slowest path (its MP_CAPABLE handshake) + 5 ms; "
            "every run had a second subflow")
    if cell.empty:
        return crit, E.missing(sc, st) + f" ({E.stacks()})", NOT_MEASURED
    usable, clean_paths = working_rtts(E, cell, st)
    if not usable:
        return crit, "not measured (path RTTs not in the manifests)", NOT_MEASURED
    slow = max(usable, key=lambda p: p["rtt_s"])
    bound = slow["rtt_s"] + TOL_S
    mp = multipath_client(cell)
    never = int(mp.isna().sum())
    # Loss hits some handshakes, not all (a lost SYN waits 1 s): judge the median, and only on
    # enough runs; without loss every run is bounded (p95).
    lossy = len(clean_paths) < len(usable)
    stat, value = ("median", float(np.median(clean(mp)))) if lossy and len(clean(mp)) else ("p95", pct95(mp))
    crit = (f"{stat} multipath (client's stamp) ≤ RTT of the slowest path ({slow['name']}: "
            f"{fmt_s(slow['rtt_s'])}, its MP_CAPABLE handshake) + 5 ms = {fmt_s(bound)}; "
            + ("at least half the runs had a second subflow" if lossy else "every run had a second subflow"))
    gain = ""
    sim = E.cell(sc, "sim")
    if st != "sim" and not sim.empty and len(clean(multipath_client(sim))):
        gain = f"; SIM on the same stacks: median {fmt_s(float(np.median(clean(multipath_client(sim)))))}"
    meas = (f"p95 {fmt_s(value)}, " if stat == "p95" else "") + f"{ci_text(mp)}; {never}/{len(cell)} never{gain}"
    if lossy and len(cell) < MIN_RUNS_RANDOM:
        return crit, f"not measured (too few runs to judge a random effect: n={len(cell)} < {MIN_RUNS_RANDOM}); " \
            + meas, NOT_MEASURED
    ok = np.isfinite(value) and value <= bound and (never * 2 <= len(cell) if lossy else never == 0)
    return crit, meas, HOLDS if ok else FAILS


def multipath_rfc8684(E: Establishment, sc: str, st: str = "sim") -> tuple[str, str, str]:
    """SIM over RFC 8684: multipath after setup + one RTT of the winner (the join waits for the
    handshake's third ACK to be processed) + one MP_JOIN handshake on the joined path."""
    cell = E.cell(sc, st)
    crit = ("median of multipath (client's stamp) − setup − RTT(winner) − RTT(joined) within [−1 ms, +5 ms]; "
            "every run had a second subflow")
    if cell.empty:
        return crit, E.missing(sc, st) + f" ({E.stacks()})", NOT_MEASURED
    usable, clean_paths = working_rtts(E, cell, st)
    lossy = len(clean_paths) < len(usable)
    if lossy:  # loss hits some joins, not all
        crit = crit.replace("every run had", "at least half the runs had")
    rtt, _ = E.rtts(cell)
    if not rtt or "metric.winner_path" not in cell:
        return crit, "not measured (no path RTTs or metric.winner_path)", NOT_MEASURED
    winner = cell["metric.winner_path"].astype("string")
    w_rtt = winner.map(lambda w: rtt.get(str(w), np.nan) if pd.notna(w) else np.nan).astype("float64")
    j_rtt = winner.map(lambda w: max((v for k, v in rtt.items() if k != w), default=np.nan)
                       if pd.notna(w) else np.nan).astype("float64")
    mp = multipath_client(cell)
    excess = (mp - cell["metric.setup_s"].astype("float64") - w_rtt - j_rtt).dropna()
    never = int(mp.isna().sum())
    if excess.empty:
        return crit, f"no run had a second subflow ({never}/{len(cell)} never)", FAILS
    med = float(np.median(excess))
    meas = (f"multipath − setup − RTT(winner) − RTT(joined): median {fmt_s(med)} (min {fmt_s(float(excess.min()))}, "
            f"p95 {fmt_s(pct95(excess))}); "
            f"multipath {ci_text(mp)}; {never}/{len(cell)} never")
    if "metric.ttfb_s" in cell:
        # the join starts when the server's first DSS arrives (its response, at the latest)
        answer = clean(cell["metric.ttfb_s"].astype("float64") - cell["metric.setup_s"].astype("float64") - w_rtt)
        if len(answer):
            meas += f"; the server's response came RTT(winner) + {fmt_s(float(np.median(answer)))} after setup (median)"
    enough = never * 2 <= len(cell) if lossy else never == 0
    return crit, meas, HOLDS if -EARLY_S <= med <= TOL_S and enough else FAILS


def falls_back(E: Establishment, st: str = "esim") -> tuple[str, str, str]:
    """eSIM against a server that never echoes ROBE_eSIM_EN behaves as SIM, in every run."""
    crit = "every run: eSIM not echoed (esim_fallback), no eSIM subflow, connected as SIM connects"
    d = E.df[E.df["param.strategy"] == st] if not E.df.empty else E.df
    if d.empty:
        return crit, f"not measured (no complete runs of establishment, strategy {st}, {E.stacks()})", NOT_MEASURED
    if "metric.esim_fallback" not in d:
        return crit, "not measured (metric.esim_fallback missing)", NOT_MEASURED
    fb = d["metric.esim_fallback"].astype("boolean").fillna(False)
    subs = pd.to_numeric(d.get("metric.esim_subflows", pd.Series(0, index=d.index)), errors="coerce").fillna(0)
    ok = fb & (subs == 0) & _connected(d)
    sim = E.df[E.df["param.strategy"] == "sim"]
    same = ""
    if not sim.empty:
        same = (f"; setup median {fmt_s(float(np.median(clean(d['metric.setup_s']))) if len(clean(d['metric.setup_s'])) else np.nan)}"
                f" vs SIM's {fmt_s(float(np.median(clean(sim['metric.setup_s']))) if len(clean(sim['metric.setup_s'])) else np.nan)}"
                " on the same stacks")
    meas = f"{int(ok.sum())}/{len(d)} runs fell back to SIM; {int(subs.sum())} eSIM subflows; {_failed_str(d)}{same}"
    return crit, meas, HOLDS if bool(ok.all()) else FAILS


# ---- user-space stack vs kernel sockets ---------------------------------------
def _median(v: pd.Series) -> float:
    a = clean(v)
    return float(np.median(a)) if len(a) else np.nan


def _fallbacks(cell: pd.DataFrame) -> int:
    """Runs that connected by falling back to plain TCP."""
    return int((cell["metric.outcome"] == "fallback").sum()) if "metric.outcome" in cell else 0


def stack_comparison(res: Results) -> pd.DataFrame:
    """Per condition and strategy (SIM, TIMER, MPTCP) against the kernel server: the median
    setup and multipath (client's stamp) of RobE over kernel sockets and over the user-space
    stack, their differences, run counts and connected shares."""
    K, U = Establishment(res), Establishment(res, "user", "kernel")
    rows = []
    conditions = sorted(set(K.df.get("param.condition", pd.Series(dtype=str)).astype(str))
                        & set(U.df.get("param.condition", pd.Series(dtype=str)).astype(str)),
                        key=lambda c: ESIM_CONDITIONS.index(c) if c in ESIM_CONDITIONS else 99)
    for sc in conditions:
        for st in COMPARED:
            k, u = K.cell(sc, st), U.cell(sc, st)
            if k.empty or u.empty:
                continue
            row = {"condition": sc, "strategy": st, "n_kernel": len(k), "n_user": len(u),
                   "connected_kernel": float(_connected(k).mean()), "connected_user": float(_connected(u).mean()),
                   "fallback_kernel": _fallbacks(k), "fallback_user": _fallbacks(u)}
            for what, get in (("setup", lambda c: c["metric.setup_s"]), ("multipath", multipath_client)):
                a, b = _median(get(k)), _median(get(u))
                row[f"{what}_kernel_ms"], row[f"{what}_user_ms"] = a * 1e3, b * 1e3
                row[f"{what}_diff_ms"] = (b - a) * 1e3
            rows.append(row)
    return pd.DataFrame(rows)


def fmt_ms(ms: float) -> str:
    """Milliseconds as fmt_s writes seconds ('n/a' when missing)."""
    return fmt_s(ms / 1e3)


def stacks_agree(cmp: pd.DataFrame, st: str) -> tuple[str, str, str]:
    """RobE over the user-space stack and over kernel sockets: medians within 1 ms per condition,
    and the same share of runs connected."""
    crit = ("per condition against the kernel server: |median setup (user stack) − median setup "
            "(kernel sockets)| ≤ 1 ms and the same share of runs connected; multipath (client's stamp) shown")
    d = cmp[cmp["strategy"] == st] if not cmp.empty else cmp
    if d.empty:
        return crit, (f"not measured (no condition with complete runs of strategy {st} over both "
                      "the user-space stack and kernel sockets against a kernel server)"), NOT_MEASURED
    parts, ok = [], True
    for _, r in d.iterrows():
        both = np.isfinite(r["setup_diff_ms"])
        same_conn = r["connected_kernel"] == r["connected_user"]
        ok &= same_conn and (not both or abs(r["setup_diff_ms"]) <= SAME_S * 1e3)
        if not both and not np.isfinite(r["setup_kernel_ms"]) and not np.isfinite(r["setup_user_ms"]):
            parts.append(f"{r['condition']}: neither connected (n={r['n_kernel']}/{r['n_user']})")
            continue
        mp = (f", multipath {r['multipath_diff_ms']:+.1f} ms" if np.isfinite(r["multipath_diff_ms"]) else "")
        fb = "".join(f", {r[f'fallback_{who}']} fell back to TCP on {who}"
                     for who in ("kernel", "user") if r[f"fallback_{who}"])
        diff = f" ({r['setup_diff_ms']:+.1f} ms)" if both else ""
        parts.append(f"{r['condition']}: setup {fmt_ms(r['setup_kernel_ms'])} vs {fmt_ms(r['setup_user_ms'])}"
                     f"{diff}{mp}; connected {r['connected_kernel']:.0%}/{r['connected_user']:.0%} "
                     f"(n={r['n_kernel']}/{r['n_user']}{fb})")
    return crit, "; ".join(parts), HOLDS if ok else FAILS


# ---- the rows ------------------------------------------------------------------
DRAFT_T1 = "draft-amend-tcpm-mptcp-robe-02, Table 1"
TARGET = "this testbed's target"
NOTE_STAMP = ("the client's stamp: when it sent MP_JOIN_CAP (eSIM) or its MP_JOIN's third ACK (SIM), "
              "as the kernel's sub_established; the server's confirming ACK comes one RTT later")


def expectation_rows(res: Results) -> list[tuple[str, str, str, str, str, str, str]]:
    """The eSIM column (user-stack client and server), eSIM's fallback against a kernel server,
    SIM's RFC 8684 multipath on the same stacks, and user-stack vs kernel-socket RobE:
    (source, subject, condition, expected, criterion, measured, verdict) each."""
    EU, EK = Establishment(res, "user", "user"), Establishment(res, "user", "kernel")
    rows = []

    def add(source: str, subject: str, cond: str, expected: str, check) -> None:
        rows.append((source, subject, cond, expected, *check()))

    present = set(EU.df["param.condition"].astype(str)) if not EU.df.empty else set()
    lossy = sorted(c for c in present if c.startswith("lossy")) or ["lossy10"]
    conditions = ["healthy", *lossy, "blackhole", "slow_default", "mptcp_drop"]
    words = {"healthy": "healthy", "blackhole": "broken (blackhole)", "slow_default": "slow default path (slow_default)",
             "mptcp_drop": "MPTCP SYNs dropped (mptcp_drop)"}
    subject = "eSIM (user-space stack, both sides)"
    for sc in conditions:
        cond = words.get(sc, f"packet loss ({sc})")
        expected = "fastest path" if sc == "slow_default" else "no impact"
        add(DRAFT_T1 + " / " + TARGET, subject, cond, f"setup: {expected}", lambda sc=sc: setup_fastest(EU, sc, "esim"))
    for sc in conditions:
        if sc in ("blackhole", "mptcp_drop"):
            continue  # one path is gone: there is nothing to join
        add(DRAFT_T1 + " / " + TARGET, subject, f"multipath available after ({sc})",
            f"max over MP_CAPABLE HS ({NOTE_STAMP})", lambda sc=sc: multipath_slowest(EU, sc, "esim"))
        for E, who in ((EU, "SIM (user-space stack, both sides)"), (EK, "SIM (user-space client, kernel server)")):
            add("RFC 8684 / " + TARGET, who, f"multipath available after ({sc})",
                "setup + RTT(winner) + MP_JOIN HS: the join waits for the third ACK's processing "
                f"({NOTE_STAMP})", lambda sc=sc, E=E: multipath_rfc8684(E, sc, "sim"))
    add(DRAFT_T1, subject, "session setup guaranteed (all conditions)", "yes",
        lambda: _guaranteed(EU, "esim"))
    add(TARGET, "eSIM (user-space client, kernel server)", "all conditions",
        "falls back to SIM: the kernel never echoes ROBE_eSIM_EN", lambda: falls_back(EK, "esim"))
    cmp = stack_comparison(res)
    for st in COMPARED:
        add(TARGET, f"{st.upper()}: user-space stack vs kernel sockets", "all conditions (kernel server)",
            "the same strategy code: medians within 1 ms", lambda st=st: stacks_agree(cmp, st))
    return rows


def _guaranteed(E: Establishment, st: str) -> tuple[str, str, str]:
    crit, meas, verdict = guaranteed(E, st, "yes")
    return crit, meas if verdict != NOT_MEASURED else meas + f" ({E.stacks()})", verdict
