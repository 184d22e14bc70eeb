"""Inactivity: resumed vs outage length per arm (kernel, user-space stack, with ITO),
and the server's held connections and memory over time for N idle connections.

Data: complete runs of `inactivity` (metrics, and the timeseries
server_connections / server_memory_bytes of mode "state"), read through
analysis.inactivity (docs/inactivity.md).
"""
from __future__ import annotations

import pandas as pd
import seaborn as sns

from analysis import Results
from analysis import inactivity as IN
from analysis.figures import Figure, Section, grid, setup_style


def _colors(arms: list[str]) -> dict[str, tuple]:
    return dict(zip(arms, sns.color_palette("colorblind", max(len(arms), 3))))


def _state_series(res: Results, runs: pd.DataFrame, series: str) -> pd.DataFrame:
    """One series of the state runs, t relative to when every path went down, with the run's arm and N."""
    ts = res.table("timeseries", runs)
    ts = ts[ts["series"] == series]
    if ts.empty:
        return ts
    ev = res.table("events", runs)
    down = ev[ev["event"] == "outage_start"].groupby("run_id")["t"].min().rename("t_down")
    meta = runs[["run_id", "arm", "metric.connections"]].rename(columns={"metric.connections": "N"})
    d = ts.merge(meta, on="run_id").merge(down, on="run_id", how="left")
    d["since_down"] = d["t"] - d["t_down"].fillna(0)
    return d


def figure(res: Results) -> Figure | None:
    """Left: fraction of outages after which the connection resumed, vs T, per arm (solid: same
    address, dashed: new address). Middle/right: held connections and memory after the outage."""
    summ = IN.resume_summary(res)
    state = IN.runs(res, "state")
    if summ.empty and state.empty:
        return None
    arms = sorted(set(summ["arm"]) if not summ.empty else set()) + sorted(
        set(state["arm"]) - set(summ["arm"] if not summ.empty else []) if not state.empty else set())
    colors = _colors(arms)
    fig, axes = grid(3, max_cols=3, panel=(4.0, 3.0), sharex=False, sharey=False)
    ax = axes[0]
    for (a, v), g in (summ.groupby(["arm", "variant"]) if not summ.empty else []):
        ax.plot(g["T"], g["resumed"], marker="o", color=colors[a], ls="-" if v == "same_address" else "--",
                lw=1.4, label=f"{a} ({v.replace('_', ' ')})")
    for x in sorted(set(IN.runs(res, "resume")["window_s"].dropna())) if not summ.empty else []:
        ax.axvline(x, color="0.5", ls=":", lw=1)
    ax.set_xlabel("outage T, s")
    ax.set_ylabel("resumed (fraction of runs)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("make-after-break")
    ax.legend(fontsize="x-small", loc="lower left")
    for ax, series, label, scale in ((axes[1], "server_connections", "connections held", 1.0),
                                     (axes[2], "server_memory_bytes", "server memory, MB", 1e6)):
        d = _state_series(res, state, series) if not state.empty else pd.DataFrame()
        for (a, n), g in (d.groupby(["arm", "N"]) if not d.empty else []):
            g = g.sort_values("since_down")
            ax.step(g["since_down"], g["value"] / scale, where="post", color=colors[a], lw=1.4,
                    label=f"{a}, N = {n:g}")
        ax.axvline(0, color="0.5", ls=":", lw=1)
        ax.set_xlabel("time since every path went down, s")
        ax.set_ylabel(label)
        ax.set_title(label + " (idle connections)")
        if series == "server_memory_bytes" and not d.empty:
            ax.set_yscale("log")  # kernel socket buffers (kB) next to a process RSS (tens of MB)
        if not d.empty:
            ax.legend(fontsize="x-small")
    return Figure("inactivity", "Make-after-break and the server's state without subflows",
                  "Left: the fraction of runs in which the client resumed its connection after every "
                  "path was down for T s (solid: the same path and address came back; dashed: a path "
                  "with an address new to the connection), per arm; dotted: X of the ITO arms, the "
                  "shorter of the inactivity timers the two sides kept. Middle and right: N idle "
                  "connections, every path down at 0: connections the server still holds and its memory (kernel: socket memory of the "
                  "server namespace's subflows; user-space stack: the server process's RSS).", fig)


def build(res: Results) -> Section:
    """The inactivity section of the report."""
    setup_style()
    sec = Section("inactivity", "Inactivity: make-after-break and server state",
                  "Every path of a connection goes down for T seconds, then one path comes back "
                  "(the same address, or one new to the connection) and the client sends more on the "
                  "same connection; and N idle connections whose paths all went down, sampled at the "
                  "server. Kernel MPTCP as it is, the user-space stack without and with the "
                  "inactivity-time option (experiment: inactivity).")
    if IN.runs(res, "resume").empty and IN.runs(res, "state").empty:
        sec.notes.append("No complete runs of inactivity: nothing to plot.")
        return sec
    fig = figure(res)
    if fig is not None:
        sec.figures.append(fig)
    summ = IN.resume_summary(res)
    if not summ.empty:
        sec.tables["inactivity_resume"] = summ.round(3)
        sec.inline.append("inactivity_resume")
    state = IN.state_summary(res)
    if not state.empty:
        sec.tables["inactivity_state"] = state.round(3)
        sec.inline.append("inactivity_state")
    return sec
