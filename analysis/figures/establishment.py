"""Establishment: setup time, multipath availability and outcome per strategy × default-path condition.

Data: complete runs of `establishment` (baseline: tcp, mptcp) and
`robe_establishment` (all strategies), pooled per (condition, strategy) — both run
the same conditions against the same unmodified kernel server.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from analysis import Results
from analysis.figures import (OUTCOME_COLORS, OUTCOMES, STRATEGIES, Figure, Section, change_words, grid,
                              order, setup_style, strategy_color, strategy_dash)
from analysis.stats import ecdf, share, summarize
from testbed.mptcp.linux import MPTCP_SYNS_BEFORE_FALLBACK, SYN_SCHEDULE_S

EXPERIMENTS = ("establishment", "robe_establishment")
CONDITIONS = ["healthy", "lossy10", "lossy30", "lossy50", "blackhole", "slow_default", "mptcp_drop"]
# The SYN+MP_CAPABLE retransmissions and the first plain-TCP SYN (Linux).
SYN_TIMES_S = SYN_SCHEDULE_S[1:MPTCP_SYNS_BEFORE_FALLBACK + 1]


def seconds_label(x: float, _pos: object = None) -> str:
    """Log-axis tick labels people read at a glance: 10 ms, 1 s, 30 s."""
    if x <= 0:
        return ""
    if x < 1:
        return f"{x * 1000:g} ms"
    return f"{x:g} s"


def log_time_axis(ax, lo: float, hi: float) -> None:
    """A log time axis from lo to hi seconds, ticks at 1 and 3 per decade read as ms or s."""
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 3.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(seconds_label))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="x", labelrotation=35)


# the workload says fallback_tcp, the RobE report connected: one vocabulary for figures
OUTCOME_ALIASES = {"connected": "mptcp", "fallback_tcp": "fallback", "timeout": "failed",
                   "error": "failed"}


def normalize_outcome(s: pd.Series) -> pd.Series:
    """Outcome names in one spelling (lower case, aliases merged)."""
    return s.astype("string").str.lower().replace(OUTCOME_ALIASES)


def data(res: Results) -> pd.DataFrame:
    """The establishment runs with a condition and a strategy, outcomes normalised."""
    runs = res.of(*EXPERIMENTS)
    need = {"param.condition", "param.strategy"}
    if runs.empty or not need <= set(runs.columns):
        return runs.iloc[0:0]
    runs = runs[runs["param.condition"].notna() & runs["param.strategy"].notna()]
    if "metric.outcome" in runs:
        runs = runs.assign(**{"metric.outcome": normalize_outcome(runs["metric.outcome"])})
    return runs.assign(condition_words=[condition_words(res.manifests.get(k, {}))
                                        for k in zip(runs["experiment"], runs["run_id"])])


def stack_pair(df: pd.DataFrame, client_stack: str = "kernel", server_stack: str = "kernel") -> pd.DataFrame:
    """The runs of one pair of stacks (param.client_stack / param.server_stack; runs from
    before those parameters are kernel runs): kernel/kernel is the draft's cells and these
    figures, a user-space stack on either side another comparison (docs/robe.md)."""
    for side, want in (("param.client_stack", client_stack), ("param.server_stack", server_stack)):
        if df.empty:
            break
        have = df[side].fillna("kernel").astype(str) if side in df else \
            pd.Series("kernel", index=df.index, dtype="string")
        df = df[have == want]
    return df


def condition_words(manifest: dict) -> str | None:
    """The default path's condition in words, from the changes the run recorded
    ("WiFi 30 % loss", "WiFi blackholed"); "healthy" when nothing was changed;
    None when the run recorded no changes at all (an older store)."""
    applied = manifest.get("applied_events")
    if applied is None:
        return None
    said = [change_words(a["action"], a["path"], a.get("changes")) for a in applied if a.get("ok", True)]
    return ", ".join(said) or "healthy"


def _title(d: pd.DataFrame, condition: str) -> str:
    """A panel's title: the condition in words when every run recorded the same."""
    said = set(d["condition_words"].dropna()) if "condition_words" in d else set()
    return said.pop() if len(said) == 1 else condition


def _limits(df: pd.DataFrame, cols: list[str]) -> tuple[float, float]:
    vals = pd.concat([pd.to_numeric(df[c], errors="coerce") for c in cols if c in df]).dropna()
    vals = vals[vals > 0]
    if vals.empty:
        return 1e-3, 10.0
    timeout = pd.to_numeric(df.get("param.timeout_s", pd.Series(dtype=float)), errors="coerce").max()
    hi = max(vals.max(), timeout if np.isfinite(timeout) else 0)
    return 10 ** np.floor(np.log10(vals.min() * 0.8)), hi * 1.5


def _strategy_legend(fig, strategies: list[str], extra: list = ()) -> None:
    handles = [Line2D([], [], color=strategy_color(s), ls=strategy_dash(s), lw=2.2, label=s)
               for s in strategies]
    fig.legend(handles=[*handles, *extra], loc="outside right upper", title="strategy")


def setup_ecdf(df: pd.DataFrame) -> Figure:
    """ECDF of setup time per condition, one line per strategy."""
    conditions = order(df["param.condition"], CONDITIONS)
    strategies = order(df["param.strategy"], STRATEGIES)
    fig, axes = grid(len(conditions), max_cols=4, panel=(3.3, 2.6))
    lo, hi = _limits(df, ["metric.setup_s"])
    for ax, sc in zip(axes, conditions):
        d = df[df["param.condition"] == sc]
        for i, st in enumerate(strategies):
            g = d[d["param.strategy"] == st]
            if g.empty:
                continue
            x, y = ecdf(g["metric.setup_s"], n_total=len(g))
            # extend each step curve to the right edge so a plateau < 1 reads as "never"
            xs = np.concatenate([[lo], x, [hi]])
            ys = np.concatenate([[0.0], y, [y[-1] if len(y) else 0.0]])
            # earlier strategies drawn thicker: coinciding curves still show both colours
            ax.step(xs, ys, where="post", color=strategy_color(st), ls=strategy_dash(st),
                    lw=3.0 - 1.6 * i / max(len(strategies) - 1, 1), alpha=0.9)
        for t in SYN_TIMES_S:
            ax.axvline(t, color="0.55", lw=0.7, ls=":", zorder=0)
        log_time_axis(ax, lo, hi)
        ax.set_ylim(-0.02, 1.04)
        ax.set_title(_title(d, sc))
    for ax in axes:
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel("fraction of runs connected")
        if ax.get_subplotspec().is_last_row() or ax is axes[-1]:
            ax.set_xlabel("setup time (connect → established)")
    syn = Line2D([], [], color="0.55", lw=0.7, ls=":", label="SYN retransmit\n(1, 2, 3 s)")
    _strategy_legend(fig, strategies, [syn])
    return Figure("establishment_setup_ecdf", "Setup time per default-path condition (ECDF)",
                  "ECDF of the time from connect() to established, one panel per initial-path "
                  "condition, one line per strategy (log time axis). Runs that never connected "
                  "within the experiment timeout keep a curve below 1. Dotted: the kernel's "
                  "SYN+MP_CAPABLE retransmissions at 1 and 2 s and the first plain-TCP SYN at 3 s.", fig)


def multipath_strip(df: pd.DataFrame) -> Figure:
    """Setup time and time to multipath per condition and strategy."""
    conditions = order(df["param.condition"], CONDITIONS)
    strategies = order(df["param.strategy"], STRATEGIES)
    fig, axes = grid(len(conditions), max_cols=4, panel=(3.3, 2.9), sharey=True)
    lo, hi = _limits(df, ["metric.setup_s", "metric.multipath_s"])
    hi *= 4  # room on the right for the "k/n never" labels, clear of the data
    ypos = {s: i for i, s in enumerate(strategies)}
    rng = np.random.default_rng(0)  # jitter only, fixed for identical redraws
    for ax, sc in zip(axes, conditions):
        d = df[df["param.condition"] == sc]
        for st in strategies:
            g = d[d["param.strategy"] == st]
            if g.empty:
                continue
            y = ypos[st]
            for col, dy, marker in (("metric.setup_s", -0.17, "o"), ("metric.multipath_s", 0.17, "D")):
                v = pd.to_numeric(g.get(col, pd.Series(dtype=float)), errors="coerce").dropna()
                v = v[v > 0]
                if v.empty:
                    continue
                ax.boxplot([v], positions=[y + dy], orientation="horizontal", widths=0.28,
                           showfliers=False, patch_artist=True, manage_ticks=False,
                           boxprops=dict(facecolor=(*strategy_color(st), 0.25), edgecolor="0.3", lw=0.8),
                           medianprops=dict(color="0.1", lw=1.2), whiskerprops=dict(color="0.4"),
                           capprops=dict(color="0.4"))
                ax.scatter(v, y + dy + rng.uniform(-0.08, 0.08, len(v)), s=9, marker=marker,
                           color=strategy_color(st), alpha=0.8, lw=0, zorder=3)
            never = int(g["metric.multipath_s"].isna().sum()) if "metric.multipath_s" in g else len(g)
            if never:
                # axes fraction of the diamond row (the y axis is inverted: first strategy on top)
                ax.text(0.995, 1 - (y + 0.5) / len(strategies), f"{never}/{len(g)} never",
                        transform=ax.transAxes, ha="right", va="center", fontsize=7.5, color="0.3",
                        bbox=dict(facecolor="white", edgecolor="none", alpha=0.85, pad=0.5))
        log_time_axis(ax, lo, hi)
        ax.set_yticks(range(len(strategies)), strategies)
        ax.set_ylim(len(strategies) - 0.5, -0.5)
        ax.set_title(_title(d, sc))
    for ax in axes:
        if ax.get_subplotspec().is_last_row() or ax is axes[-1]:
            ax.set_xlabel("time since connect()")
    marks = [Line2D([], [], marker="o", color="0.3", ls="", label="setup (established)"),
             Line2D([], [], marker="D", color="0.3", ls="", label="multipath available\n(2nd subflow up)")]
    fig.legend(handles=marks, loc="outside right upper", title="event")
    return Figure("establishment_multipath", "Setup and multipath-availability time",
                  "Per condition and strategy: setup time (circles, lower box) and the time until a "
                  "second subflow was established (diamonds, upper box), log axis; boxes span the "
                  "quartiles. 'k/n never': runs in which no second subflow came up (a broken or "
                  "MPTCP-dropping path cannot be joined; plain TCP never has one).", fig)


def outcome_bars(df: pd.DataFrame) -> Figure:
    """Share of each outcome per condition and strategy."""
    conditions = order(df["param.condition"], CONDITIONS)
    strategies = order(df["param.strategy"], STRATEGIES)
    sh = share(df, ["param.condition", "param.strategy"], "metric.outcome")
    outcomes = order(sh["metric.outcome"], OUTCOMES)
    fig, axes = grid(len(conditions), max_cols=4, panel=(3.1, 2.5), sharex=True, sharey=True)
    for ax, sc in zip(axes, conditions):
        d = sh[sh["param.condition"] == sc]
        left = np.zeros(len(strategies))
        for oc in outcomes:
            w = [float(d[(d["param.strategy"] == st) & (d["metric.outcome"] == oc)]["share"].sum())
                 for st in strategies]
            ax.barh(range(len(strategies)), w, left=left, color=OUTCOME_COLORS.get(oc, "0.6"),
                    height=0.7, edgecolor="white", lw=0.5)
            left += np.array(w)
        ax.set_yticks(range(len(strategies)), strategies)
        ax.set_ylim(len(strategies) - 0.5, -0.5)
        ax.set_xlim(0, 1)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _p: f"{x:.0%}"))
        ax.set_title(_title(df[df["param.condition"] == sc], sc))
    for ax in axes:
        if ax.get_subplotspec().is_last_row() or ax is axes[-1]:
            ax.set_xlabel("share of runs")
    fig.legend(handles=[Patch(color=OUTCOME_COLORS.get(o, "0.6"), label=o) for o in outcomes],
               loc="outside right upper", title="outcome")
    return Figure("establishment_outcomes", "Connection outcome shares",
                  "Share of runs per outcome: MPTCP connection, fallback to plain TCP (e.g. MPTCP "
                  "SYNs dropped by a middlebox), plain TCP (the tcp strategy), or no connection "
                  "within the experiment timeout.", fig)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per (condition, strategy): medians with confidence intervals of the timing metrics and outcome shares."""
    keys = ["param.condition", "param.strategy"]
    out = None
    for col, name in (("metric.setup_s", "setup_s"), ("metric.ttfb_s", "ttfb_s"),
                      ("metric.multipath_s", "multipath_s")):
        if col not in df:
            continue
        s = summarize(df, keys, col, stats=("median", "mean"))
        s = s.rename(columns={c: f"{name}.{c}" for c in s.columns if c not in keys})
        out = s if out is None else out.merge(s, on=keys, how="outer")
    if "metric.outcome" in df:
        oc = share(df, keys, "metric.outcome").pivot_table(
            index=keys, columns="metric.outcome", values="share", fill_value=0.0, observed=True)
        oc.columns = [f"share.{c}" for c in oc.columns]
        out = oc.reset_index() if out is None else out.merge(oc.reset_index(), on=keys, how="left")
    out = out.rename(columns={"param.condition": "condition", "param.strategy": "strategy"})
    rank_sc = {s: i for i, s in enumerate(CONDITIONS)}
    rank_st = {s: i for i, s in enumerate(STRATEGIES)}
    return out.sort_values(["condition", "strategy"], key=lambda c: c.map(
        rank_sc if c.name == "condition" else rank_st).fillna(99)).reset_index(drop=True)


def build(res: Results) -> Section:
    """The establishment section of the report."""
    setup_style()
    sec = Section("establishment", "Establishment",
                  "Time from connect() to an established connection, until multipath is available, "
                  "and the outcome, per initial-path condition and strategy "
                  "(experiments: establishment, robe_establishment).")
    # RobE over kernel sockets against a kernel server; the user-space stack's runs are in
    # the RobE_eSIM section (analysis.figures.esim)
    df = stack_pair(data(res))
    if df.empty:
        sec.notes.append("No complete runs of establishment or robe_establishment "
                         "(with param.condition and param.strategy): nothing to plot.")
        return sec
    if "metric.setup_s" in df:
        sec.figures.append(setup_ecdf(df))
    else:
        sec.notes.append("metric.setup_s missing: setup-time ECDF skipped.")
    if "metric.multipath_s" in df or "metric.setup_s" in df:
        sec.figures.append(multipath_strip(df))
    if "metric.outcome" in df:
        sec.figures.append(outcome_bars(df))
    else:
        sec.notes.append("metric.outcome missing: outcome shares skipped.")
    sec.tables["establishment_summary"] = summary(df)
    return sec
