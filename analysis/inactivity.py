"""Inactivity: what the inactivity experiment's runs say about make-after-break and
about the room's question at IETF 105, "what does Linux do today with an inactive
connection?" (docs/inactivity.md).

Input: complete runs of `inactivity`. mode "resume": per run outage_s, variant,
resumed, resume_s, and when the server lost subflows and state
(server_subflows_gone_s, server_state_gone_s: seconds after every path went
down); mode "state": N idle connections, the server's connections held and
memory over time (timeseries server_connections / server_memory_bytes).
Each run belongs to an arm: kernel MPTCP, the user-space stack, or the
user-space stack with the inactivity-time option (ITO) at given values.
expectation_rows() gives the expectation table's rows (None: not measured,
saying which runs are missing).
"""
from __future__ import annotations

import pandas as pd

from analysis import Results

EXPERIMENT = "inactivity"
ITO = "draft-hoang-mptcp-inactivity-time-00"
IETF105 = ITO + ", the question at IETF 105"
GONE_SLACK_S = 1.0  # state is gone within X + this after the last subflow died


def _num(df: pd.DataFrame, col: str) -> pd.Series:
    return pd.to_numeric(df[col], errors="coerce") if col in df else pd.Series(float("nan"), index=df.index)


def _flag(df: pd.DataFrame, col: str) -> pd.Series:
    return df[col].map(lambda v: str(v).lower() == "true") if col in df else pd.Series(False, index=df.index)


def arm(row: pd.Series) -> str:
    """The run's arm: 'kernel', 'user stack', or 'user stack, ITO c/s' (the values each side asked for)."""
    if str(row.get("metric.client_stack")) == "kernel" and str(row.get("metric.server_stack")) == "kernel":
        return "kernel"
    c, s = row.get("metric.ito_client_s"), row.get("metric.ito_server_s")
    if pd.isna(c) and pd.isna(s):
        return "user stack"
    show = lambda v: "-" if pd.isna(v) else f"{float(v):g} s"  # noqa: E731
    return f"user stack, ITO client {show(c)} / server {show(s)}"


def timer_s(row: pd.Series) -> float | None:
    """How long the server keeps a connection with no subflow, as the run recorded it
    (metric ito_server_effective_s), else as the draft says: the peer's value adopted,
    bounded by the server's own maximum, its own value without one from the peer."""
    eff = row.get("metric.ito_server_effective_s")
    if eff is not None and not pd.isna(eff):
        return float(eff)
    c, s, mx = (row.get(f"metric.{k}") for k in ("ito_client_s", "ito_server_s", "ito_server_max_s"))
    v = c if c is not None and not pd.isna(c) else s
    if v is None or pd.isna(v):
        return None
    return float(min(v, mx)) if mx is not None and not pd.isna(mx) else float(v)


def window_s(row: pd.Series) -> float | None:
    """How long an outage the connection survives on both sides: the shorter of the timers
    the server and the client kept (each adopts the peer's value), as recorded, else as
    the draft says; None without ITO on either side."""
    server = timer_s(row)
    eff = row.get("metric.ito_client_effective_s")
    if eff is not None and not pd.isna(eff):
        client = float(eff)
    else:
        s, c = row.get("metric.ito_server_s"), row.get("metric.ito_client_s")
        v = s if s is not None and not pd.isna(s) else c
        client = None if v is None or pd.isna(v) else float(v)
    if str(row.get("metric.client_stack")) != "user":
        client = None   # a kernel client keeps its connection as kernel MPTCP does
    known = [v for v in (server, client) if v is not None]
    return min(known) if known else None


def runs(res: Results, mode: str) -> pd.DataFrame:
    """Complete runs of one mode with their arm (column 'arm'), the server's timer (column
    'timer_s') and the connection's (column 'window_s', the shorter of both sides')."""
    r = res.of(EXPERIMENT)
    if r.empty or "metric.mode" not in r:
        return pd.DataFrame()
    r = r[r["metric.mode"].astype(str) == mode].copy()
    if r.empty:
        return r
    r["arm"] = r.apply(arm, axis=1)
    r["timer_s"] = r.apply(timer_s, axis=1)
    r["window_s"] = r.apply(window_s, axis=1)
    return r


def resume_summary(res: Results) -> pd.DataFrame:
    """One row per arm, variant and outage T: runs, resumed (fraction), median time to resume,
    median server_state_gone_s."""
    r = runs(res, "resume")
    if r.empty:
        return r
    df = pd.DataFrame({"arm": r["arm"], "variant": r.get("metric.variant", "n/a").astype(str),
                       "T": _num(r, "metric.outage_s"), "resumed": _flag(r, "metric.resumed").astype(float),
                       "resume_s": _num(r, "metric.resume_s"),
                       "state_gone_s": _num(r, "metric.server_state_gone_s")})
    g = df.groupby(["arm", "variant", "T"])
    out = g.agg(runs=("resumed", "size"), resumed=("resumed", "mean"), resume_s=("resume_s", "median"),
                state_gone_s=("state_gone_s", "median"))
    return out.reset_index().sort_values(["arm", "variant", "T"])


def state_summary(res: Results) -> pd.DataFrame:
    """One row per state run: arm, N, held at the outage and at the end, memory then, seconds observed."""
    r = runs(res, "state")
    if r.empty:
        return r
    cols = {"metric.connections": "N", "metric.held_at_down": "held at outage", "metric.held_at_end": "held at end",
            "metric.memory_at_down_bytes": "memory at outage, B", "metric.memory_at_end_bytes": "memory at end, B",
            "metric.observed_s": "observed s", "metric.server_subflows_gone_s": "subflows gone s",
            "metric.server_state_gone_s": "state gone s"}
    out = pd.DataFrame({"arm": r["arm"], **{v: _num(r, k) for k, v in cols.items()}})
    return out.sort_values(["arm", "N"]).reset_index(drop=True)


def _sentence_kernel(resume: pd.DataFrame, state: pd.DataFrame, r: pd.DataFrame) -> tuple[str, bool | None]:
    k = resume[resume["arm"] == "kernel"] if not resume.empty else pd.DataFrame(columns=["variant", "T", "resumed"])
    s = state[state["arm"] == "kernel"] if not state.empty else state
    if k.empty and s.empty:
        return "not measured (no complete kernel runs of inactivity)", None
    parts = []
    sysctl = r[r["arm"] == "kernel"] if not r.empty else r
    if not sysctl.empty and "metric.kernel_close_timeout" in sysctl:
        row = sysctl.iloc[0]
        parts.append(f"close_timeout {row['metric.kernel_close_timeout']:g} s, "
                     f"tcp_retries2 {row.get('metric.kernel_tcp_retries2', float('nan')):g}, "
                     f"keepalive {row.get('metric.kernel_tcp_keepalive_time', float('nan')):g} s")
    ok = True
    for variant, g in k.groupby("variant"):
        done = g[g["resumed"] >= 1]["T"].tolist()
        parts.append(f"{variant}: resumed after {len(done)} of {len(g)} outages "
                     f"(T = {', '.join(f'{t:g}' for t in g['T'])} s)")
    for _, x in s.iterrows():
        parts.append(f"{x['N']:.0f} idle connections: {x['held at end']:.0f} held {x['observed s']:.0f} s after "
                     f"every path went down (socket memory {x['memory at outage, B'] / 1e3:.0f} -> "
                     f"{x['memory at end, B'] / 1e3:.0f} kB)")
        ok = ok and x["held at end"] == x["N"]
    return "; ".join(parts), ok if not s.empty else None


def expectation_rows(res: Results) -> list[tuple[str, str, str, str, str, str, bool | None]]:
    """(source, subject, condition, expected, criterion, measured, holds) per row; holds None = not measured."""
    rows: list[tuple[str, str, str, str, str, str, bool | None]] = []
    resume, state = resume_summary(res), state_summary(res)
    r_all = pd.concat([runs(res, "resume"), runs(res, "state")], ignore_index=True)
    cond = "every path down for T s, then one path (same or new address) back; the client resumes"

    ito = r_all[r_all["timer_s"].notna()] if not r_all.empty else r_all
    resumed_runs = runs(res, "resume")
    resumed_ito = resumed_runs[resumed_runs["window_s"].notna()] if not resumed_runs.empty else resumed_runs
    crit = (f"every run with measured T < X resumed (sha256 equal) and none with T > X + {GONE_SLACK_S:g} s; "
            "at least one run on each side")
    claim = f"outages shorter than X resume, longer than X + {GONE_SLACK_S:g} s do not"
    if resumed_ito.empty:
        rows.append((ITO, "user-space stack with ITO", cond,
                     f"{claim} (X: the shorter of the timers both sides kept)",
                     crit, "not measured (no complete resume runs with ITO)", None))
    else:
        for x, g in resumed_ito.groupby("window_s"):
            # the outage the run measured (link down -> up applied), not the one it asked for
            t = _num(g, "metric.outage_measured_s").fillna(_num(g, "metric.outage_s"))
            short, long = g[t < x], g[t > x + GONE_SLACK_S]
            ok_short, bad_long = _flag(short, "metric.resumed"), _flag(long, "metric.resumed")
            text = (f"X = {x:g} s: {int(ok_short.sum())} of {len(short)} outages shorter than X resumed; "
                    f"{int((~bad_long).sum())} of {len(long)} longer than X + {GONE_SLACK_S:g} s did not")
            failed = bool((~ok_short).any() or bad_long.any())  # a counter-example fails the row on its own
            holds = False if failed else (None if short.empty or long.empty else True)
            if holds is None:
                text += f" (not judged: no run {'shorter than X' if short.empty else 'longer than X + 1 s'})"
            rows.append((ITO, "user-space stack with ITO", cond, f"{claim} (X = {x:g} s)", crit, text, holds))
    crit = f"server state gone - last subflow gone <= X + {GONE_SLACK_S:g} s in every run"
    if ito.empty:
        rows.append((ITO, "user-space stack with ITO", "no subflow left (all paths down)",
                     f"state is gone within X + {GONE_SLACK_S:g} s after the last subflow died", crit,
                     "not measured (no complete runs with ITO)", None))
    else:
        for x, g in ito.groupby("timer_s"):
            sf, gone = _num(g, "metric.server_subflows_gone_s"), _num(g, "metric.server_state_gone_s")
            # A run whose connection resumed before the timer ran out says nothing here.
            lost = sf.notna() & ~_flag(g, "metric.resumed")
            judged = g[lost]
            d = (gone - sf)[lost]
            alive = g[sf.isna() & ~_flag(g, "metric.resumed")]
            kept = [f"{h:.0f} of {n:.0f}" for h, n in zip(_num(alive, "metric.held_at_end"),
                                                         _num(alive, "metric.connections")) if not pd.isna(h)]
            if judged.empty:
                text, ok = "not measured (no run in which the server lost every subflow)", None
                if kept:  # say why: subflows the server never found dead keep their connections
                    text += f"; subflows never all found dead, connections still held at the end: {', '.join(kept)}"
            else:
                late = d.isna() | (d > x + GONE_SLACK_S)
                text = (f"X = {x:g} s: {int((~late).sum())} of {len(judged)} runs; state gone "
                        f"{', '.join('never' if pd.isna(v) else f'{v:.1f}' for v in d)} s after the last subflow")
                ok = bool(not late.any())
            rows.append((ITO, "user-space stack with ITO", "no subflow left (all paths down)",
                         f"state is gone within X + {GONE_SLACK_S:g} s after the last subflow died (X = {x:g} s)",
                         crit, text, ok))
    text, ok = _sentence_kernel(resume, state, r_all)
    rows.append((IETF105, "kernel MPTCP (Linux as it is)", "idle connections, every path down",
                 "keeps the connection's state (the room: forever unless memory is short)",
                 "every idle connection still held at the end of the observation", text, ok))
    u = state[state["arm"] == "user stack"] if not state.empty else state
    ur = resume[resume["arm"] == "user stack"] if not resume.empty else pd.DataFrame(columns=["variant", "resumed"])
    if u.empty and ur.empty:
        rows.append((ITO, "user-space stack without ITO", "idle connections, every path down",
                     "keeps the state (no timer)", "every idle connection still held at the end",
                     "not measured (no complete user-stack runs without ITO)", None))
    else:
        parts = [f"{x['N']:.0f} idle: {x['held at end']:.0f} held after {x['observed s']:.0f} s" for _, x in u.iterrows()]
        parts += [f"{v}: resumed after {int((g['resumed'] >= 1).sum())} of {len(g)} outages"
                  for v, g in ur.groupby("variant")]
        rows.append((ITO, "user-space stack without ITO", "idle connections, every path down",
                     "keeps the state (no timer)", "every idle connection still held at the end",
                     "; ".join(parts), bool((u["held at end"] == u["N"]).all()) if not u.empty else None))
    return rows


__all__ = ["EXPERIMENT", "arm", "timer_s", "window_s", "runs", "resume_summary", "state_summary", "expectation_rows"]
