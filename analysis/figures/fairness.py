"""Fairness: MPTCP's share of the bottleneck against M TCP flows, and Jain's index.

Data: complete runs of `fairness`. Reference lines: 1/(M+1), one flow's fair
share (RFC 6356's "do no harm" at a shared bottleneck), and 2/(M+2), what two
uncoupled subflows take when every flow gets the same (the kernel's MPTCP,
which has no coupled congestion control).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from analysis import Results
from analysis.figures import Figure, Section, grid, setup_style
from analysis.stats import summarize

EXPERIMENT = "fairness"
NEEDS = {"metric.tcp_flows", "metric.mptcp_share", "metric.jain_index", "metric.shared_bottleneck"}


def layout(runs: pd.DataFrame) -> pd.Series:
    """'shared bottleneck' or 'disjoint paths', per run."""
    shared = runs["metric.shared_bottleneck"].astype("boolean").fillna(False)
    return shared.map({True: "shared bottleneck", False: "disjoint paths"}).astype("string")


def share_figure(runs: pd.DataFrame) -> Figure:
    """The MPTCP connection's share of the bottleneck and Jain's index against M TCP flows."""
    df = pd.DataFrame({"M": runs["metric.tcp_flows"].astype(int), "layout": layout(runs),
                       "share": runs["metric.mptcp_share"].astype("float64"),
                       "jain": runs["metric.jain_index"].astype("float64")})
    layouts = [v for v in ("shared bottleneck", "disjoint paths") if v in set(df["layout"])]
    pal = dict(zip(("shared bottleneck", "disjoint paths"), sns.color_palette("colorblind", 2)))
    ms = sorted(df["M"].unique())
    fig, (ax, bx) = grid(2, panel=(4.2, 3.4), sharey=False)
    for i, (col, axis, label) in enumerate((("share", ax, "MPTCP's share of the goodput"),
                                            ("jain", bx, "Jain's fairness index"))):
        sns.stripplot(df, x="M", y=col, hue="layout", hue_order=layouts, order=ms, palette=pal,
                      dodge=True, ax=axis, size=5, alpha=0.85, legend=False, jitter=0.12)
        axis.set_xlabel("TCP flows M")
        axis.set_ylabel(label)
        axis.set_ylim(0, 1.05)
    xs = np.arange(len(ms))
    ax.plot(xs, [1 / (m + 1) for m in ms], color="0.1", lw=1.2, marker="_", ms=18, ls="none")
    ax.plot(xs, [2 / (m + 2) for m in ms], color="#d55e00", lw=1.2, marker="_", ms=18, ls="none")
    ax.yaxis.set_major_formatter(lambda y, _p: f"{y:.0%}")
    bx.axhline(1.0, color="0.1", lw=1.0)
    handles = [Patch(color=pal[v], label=v) for v in layouts]
    handles += [Line2D([], [], color="0.1", marker="_", ms=12, ls="none", label="1/(M+1): one flow's share"),
                Line2D([], [], color="#d55e00", marker="_", ms=12, ls="none",
                       label="2/(M+2): two uncoupled flows")]
    fig.legend(handles=handles, loc="outside right upper", title="layout")
    return Figure("fairness_share", "MPTCP against M TCP flows",
                  "Left: the MPTCP connection's share of all flows' goodput per number of TCP "
                  "flows M (dots are runs; colour: one shared bottleneck or one bottleneck per "
                  "subflow). Black: 1/(M+1), a single flow's fair share (RFC 6356: do no harm); "
                  "orange: 2/(M+2), what two uncoupled subflows take at one bottleneck. Right: "
                  "Jain's fairness index over all flows (1 = equal goodput).", fig)


def build(res: Results) -> Section:
    """The fairness section of the report."""
    setup_style()
    sec = Section("fairness", "Fairness",
                  "One MPTCP connection (two subflows) and M TCP flows through one shared bottleneck "
                  "or two disjoint ones (experiment: fairness, topology: dumbbell).")
    runs = res.of(EXPERIMENT)
    if runs.empty:
        sec.notes.append("No complete runs of fairness: nothing to plot.")
        return sec
    missing = NEEDS - set(runs.columns)
    if missing:
        sec.notes.append(f"{', '.join(sorted(missing))} missing: fairness figure skipped.")
        return sec
    sec.figures.append(share_figure(runs))
    v = runs.assign(variant=layout(runs) + ", M=" + runs["metric.tcp_flows"].astype(int).astype(str))
    out = None
    for col in ("metric.mptcp_share", "metric.jain_index", "metric.utilisation"):
        if col in v:
            s = summarize(v, ["variant"], col).rename(
                columns=lambda c, n=col[7:]: c if c == "variant" else f"{n}.{c}")
            out = s if out is None else out.merge(s, on="variant")
    if out is not None:
        sec.tables["fairness_summary"] = out
    return sec
