"""Rate limit: the limited path's rate over time per mode, and total goodput per mode vs R.

Data: complete runs of `rate-limit`: their `rate_mbit` series (the receiver's
delivered bytes per bin, key = path or total) and metrics, read through
analysis.rate_limit (docs/rate-limit.md).
"""
from __future__ import annotations

import pandas as pd
import seaborn as sns

from analysis import Results
from analysis import rate_limit as RL
from analysis.figures import Figure, Section, grid, setup_style

_CB = sns.color_palette("colorblind", 10)
MODE_COLORS = {"srl": _CB[0], "window": _CB[1], "window_start": _CB[2], "shaping": _CB[4], "none": _CB[7]}


def _series(res: Results, runs: pd.DataFrame, key: str) -> pd.DataFrame:
    """The rate_mbit series of one key, with each run's mode and R; mean over repetitions per bin."""
    ts = res.table("timeseries", runs)
    ts = ts[(ts["series"] == "rate_mbit") & (ts["key"] == key)]
    if ts.empty:
        return ts
    meta = runs[["run_id", "metric.mode", "metric.rate_mbit"]].rename(
        columns={"metric.mode": "mode", "metric.rate_mbit": "R"})
    d = ts.merge(meta, on="run_id")
    return d.groupby(["mode", "R", "t"], as_index=False)["value"].mean()


def rate_figure(res: Results, runs: pd.DataFrame, summ: pd.DataFrame) -> Figure | None:
    """One panel per R: the limited path's rate over time per mode; a last panel: total goodput after the request vs R."""
    path = str(runs["param.path"].iloc[0]) if "param.path" in runs else "lte"
    d = _series(res, runs, path)
    if d.empty:
        return None
    rs = sorted(d["R"].unique())
    at = float(pd.to_numeric(runs["metric.request_at_s"], errors="coerce").median())
    fig, axes = grid(len(rs) + 1, max_cols=4, panel=(3.8, 2.9), sharex=False, sharey=False)
    for ax, r in zip(axes, rs):
        for mode in RL.MODES:
            g = d[(d["mode"] == mode) & (d["R"] == r)]
            if not g.empty:
                ax.step(g["t"], g["value"], where="post", color=MODE_COLORS.get(mode, "0.3"), lw=1.4,
                        label=RL.MODE_LABELS[mode])
        ax.axhline(r, color="0.3", ls="--", lw=1, label="R (requested)")
        ax.axvline(at, color="0.5", ls=":", lw=1, label="request")
        ax.set_yscale("symlog", linthresh=1)  # R = 1 and 20 Mbit/s both readable
        ax.set_ylim(bottom=-0.15)  # a path at 0 stays visible above the axis
        ax.set_title(f"R = {r:g} Mbit/s")
        ax.set_xlabel("time since start, s")
        ax.set_ylabel(f"{path} rate, Mbit/s")
    ax = axes[-1]
    for mode in RL.MODES:
        g = summ[summ["mode"] == mode].sort_values("R")
        if not g.empty:
            ax.plot(g["R"], g["metric.total_after_mbit"], marker="o", color=MODE_COLORS.get(mode, "0.3"),
                    lw=1.4, label=RL.MODE_LABELS[mode])
    ax.set_xlabel("R, Mbit/s")
    ax.set_ylabel("total after request, Mbit/s")
    ax.set_ylim(bottom=-1)  # a stalled mode's 0 stays visible
    ax.set_title("total goodput")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3)
    return Figure("rate_limit", f"Capping {path} at R: the option, the window clamp, shaping",
                  f"Left: the {path} path's delivered rate at the client over time (bins of "
                  f"{runs['param.bin_s'].iloc[0] if 'param.bin_s' in runs else 0.5} s, mean over the "
                  "repetitions), per mode, one panel per requested rate R (dashed; dotted: the "
                  "request). Right: total goodput after the request (medians over the repetitions, "
                  "after the settle time) against R. The receive-window clamp is connection-level: "
                  "it slows both paths.", fig)


def build(res: Results) -> Section:
    """The rate-limit section of the report."""
    setup_style()
    sec = Section("rate_limit", "Subflow rate limit: the option vs clamping the window",
                  "A two-path download (2 x 20 Mbit/s) in which the client asks, mid-transfer, for "
                  "the LTE path to carry at most R: by the subflow rate limit option (SRL, user-space "
                  "stacks, the sender paces the subflow), by clamping its receive window to R x LTE's "
                  "RTT (kernel MPTCP, SO_RCVBUF), by shaping its own LTE interface both ways (kernel "
                  "MPTCP; HTB, IFB + HTB), or not at all (experiment: rate-limit).")
    runs = res.of(RL.EXPERIMENT)
    if runs.empty:
        sec.notes.append("No complete runs of rate-limit: nothing to plot.")
        return sec
    summ = RL.summary(res)
    fig = rate_figure(res, runs, summ)
    if fig is None:
        sec.notes.append("The rate-limit runs hold no rate_mbit series: nothing to plot.")
    else:
        sec.figures.append(fig)
    sec.tables["rate_limit"] = RL.table(summ)
    sec.inline.append("rate_limit")
    return sec
