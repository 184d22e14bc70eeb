"""Fairness: MPTCP's share of the bottleneck against M TCP flows, and Jain's index,
per layout and per MPTCP implementation (kernel, user-space stack LIA/OLIA/CUBIC).

Data: complete runs of `fairness`. Reference lines: 1/(M+1), one flow's fair
share (RFC 6356's "do no harm" at a shared bottleneck), and 2/(M+2), what two
uncoupled subflows take when every flow gets the same (the kernel's MPTCP,
which has no coupled congestion control, and the user stack's CUBIC).
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


def implementation(runs: pd.DataFrame) -> pd.Series:
    """Who the MPTCP connection was, per run: 'kernel MPTCP (cubic)', 'user stack, LIA', ...
    (runs from before the stack choice are kernel runs)."""
    stack = (runs["metric.stack"].astype("string").fillna("kernel") if "metric.stack" in runs
             else pd.Series("kernel", index=runs.index, dtype="string"))
    cc = runs["metric.cc"].astype("string").fillna("?") if "metric.cc" in runs else \
        pd.Series("?", index=runs.index, dtype="string")
    label = ["kernel MPTCP (" + c + ")" if s == "kernel" else "user stack, " + c.upper()
             for s, c in zip(stack, cc)]
    return pd.Series(label, index=runs.index, dtype="string")


def _order(names: set[str]) -> list[str]:
    """Kernel first, then the user stack's coupled controllers, then its uncoupled ones."""
    rank = {"LIA": 0, "OLIA": 1}
    return sorted(names, key=lambda n: (not n.startswith("kernel"), rank.get(n.rsplit(" ", 1)[-1], 2), n))


def share_figure(runs: pd.DataFrame) -> Figure:
    """MPTCP's share of the goodput and Jain's index against M TCP flows, per layout and implementation."""
    df = pd.DataFrame({"M": runs["metric.tcp_flows"].astype(int), "layout": layout(runs),
                       "who": implementation(runs),
                       "share": runs["metric.mptcp_share"].astype("float64"),
                       "jain": runs["metric.jain_index"].astype("float64")})
    layouts = [v for v in ("shared bottleneck", "disjoint paths") if v in set(df["layout"])]
    who = _order(set(df["who"]))
    pal = dict(zip(who, sns.color_palette("colorblind", len(who))))
    ms = sorted(df["M"].unique())
    xs = np.arange(len(ms))
    fig, axes = grid(2 * len(layouts), max_cols=2, panel=(4.2, 3.2), sharey=False)
    for row, lay in enumerate(layouts):
        part = df[df["layout"] == lay]
        for col, (metric, label) in enumerate((("share", "MPTCP's share of the goodput"),
                                               ("jain", "Jain's fairness index"))):
            axis = axes[2 * row + col]
            sns.stripplot(part, x="M", y=metric, hue="who", hue_order=who, order=ms, palette=pal,
                          dodge=True, ax=axis, size=5, alpha=0.85, legend=False, jitter=0.12)
            axis.set_title(lay)
            axis.set_xlabel("TCP flows M")
            axis.set_ylabel(label)
            axis.set_ylim(0, 1.05)
            if metric == "share":
                axis.plot(xs, [1 / (m + 1) for m in ms], color="0.1", lw=1.2, marker="_", ms=18, ls="none")
                axis.plot(xs, [2 / (m + 2) for m in ms], color="0.6", lw=1.2, marker="_", ms=18,
                          ls="none")
                axis.yaxis.set_major_formatter(lambda y, _p: f"{y:.0%}")
            else:
                axis.axhline(1.0, color="0.1", lw=1.0)
    handles = [Patch(color=pal[v], label=v) for v in who]
    handles += [Line2D([], [], color="0.1", marker="_", ms=12, ls="none", label="1/(M+1): one flow's share"),
                Line2D([], [], color="0.6", marker="_", ms=12, ls="none",
                       label="2/(M+2): two uncoupled flows")]
    fig.legend(handles=handles, loc="outside right upper", title="MPTCP connection")
    return Figure("fairness_share", "MPTCP against M TCP flows",
                  "MPTCP's share of all flows' goodput (left) and Jain's fairness index over all flows "
                  "(right, 1 = equal goodput) per number of TCP flows M; top: one bottleneck shared by "
                  "both subflows and the TCP flows, bottom: one bottleneck per subflow. Dots are runs, "
                  "colour is the MPTCP connection: kernel MPTCP (no coupled congestion control) or the "
                  "user-space stack with LIA or OLIA (coupled, RFC 6356) or CUBIC (uncoupled). Black: "
                  "1/(M+1), a single flow's fair share (RFC 6356: do no harm); grey: 2/(M+2), what two "
                  "uncoupled subflows take at one bottleneck.", fig)


def build(res: Results) -> Section:
    """The fairness section of the report."""
    setup_style()
    sec = Section("fairness", "Fairness",
                  "One MPTCP connection (two subflows) and M TCP flows through one shared bottleneck "
                  "or two disjoint ones (experiment: fairness, topology: dumbbell). The MPTCP "
                  "connection is kernel MPTCP or the user-space stack with coupled (LIA, OLIA) or "
                  "uncoupled (CUBIC) congestion control.")
    runs = res.of(EXPERIMENT)
    if runs.empty:
        sec.notes.append("No complete runs of fairness: nothing to plot.")
        return sec
    missing = NEEDS - set(runs.columns)
    if missing:
        sec.notes.append(f"{', '.join(sorted(missing))} missing: fairness figure skipped.")
        return sec
    sec.figures.append(share_figure(runs))
    v = runs.assign(variant=implementation(runs) + ", " + layout(runs) + ", M="
                    + runs["metric.tcp_flows"].astype(int).astype(str))
    out = None
    for col in ("metric.mptcp_share", "metric.jain_index", "metric.utilisation"):
        if col in v:
            s = summarize(v, ["variant"], col).rename(
                columns=lambda c, n=col[7:]: c if c == "variant" else f"{n}.{c}")
            out = s if out is None else out.merge(s, on="variant")
    if out is not None:
        sec.tables["fairness_summary"] = out
    return sec
