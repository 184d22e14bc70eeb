"""Privacy: how well observers on separate paths link the subflows of one
connection, per method, against the number K of concurrent connections.

Data: complete runs of `privacy`, scored by analysis.privacy (forced-choice
accuracy with Wilson 95 % intervals pooled over repetitions; the dashed line
is chance, 1/K of the subflows seen on the first path).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns

from analysis import Results
from analysis import privacy as P
from analysis.figures import Figure, Section, grid, setup_style

METHOD_COLORS = dict(zip(P.METHODS, sns.color_palette("colorblind", 3)))
METHOD_MARKERS = {"token": "o", "dsn": "s", "timing": "^"}


def accuracy_figure(summ: pd.DataFrame, stack: str = "kernel", countermeasure: str = "none") -> Figure:
    """Forced-choice accuracy vs K per method, one panel per traffic pattern and start."""
    df = summ[(summ["stack"] == stack) & (summ["countermeasure"] == countermeasure)]
    cells = sorted({(p, s) for p, s in zip(df["pattern"], df["start"])})
    fig, axes = grid(len(cells), max_cols=2, panel=(4.2, 3.0))
    for ax, (pattern, start) in zip(axes, cells):
        g = df[(df["pattern"] == pattern) & (df["start"] == start)]
        for j, m in enumerate(P.METHODS):
            h = g[g["method"] == m].sort_values("K")
            if h.empty:
                continue
            # methods side by side around each K (equal values would hide each other)
            ax.errorbar(h["K"] * 2.0 ** (0.12 * (j - 1)), h["accuracy"], yerr=[h["accuracy"] - h["accuracy_low"],
                                                     h["accuracy_high"] - h["accuracy"]],
                        color=METHOD_COLORS[m], marker=METHOD_MARKERS[m], ms=5, capsize=3,
                        label=P.METHOD_LABELS[m], lw=1.4)
        ks = np.array(sorted(g["K"].unique()))
        chance = g.groupby("K")["chance"].mean().reindex(ks)
        ax.plot(ks, chance.values, color="0.3", ls="--", lw=1, label="chance (1/candidates)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_ylim(-0.03, 1.05)
        ax.set_title(f"{pattern}, {start}")
        ax.set_xlabel("concurrent connections K")
        ax.set_ylabel("subflows linked correctly")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2)
    what = {"kernel": "kernel MPTCP", "user": "user-space stack"}.get(stack, stack) + (
        "" if countermeasure == "none" else f", countermeasure {countermeasure}")
    suffix = "" if (stack, countermeasure) == ("kernel", "none") else f"_{stack}_{countermeasure}"
    return Figure(f"privacy_accuracy{suffix}",
                  f"Linking subflows across per-path observers ({what})",
                  "Share of the subflows seen on the LTE path that an observer pair links to the "
                  "right subflow on the WiFi path (forced choice; ties share the credit), per "
                  "method, against the number of concurrent connections K (several per client "
                  "host; the methods are drawn side by side around each K); bars are Wilson 95 % intervals over the pooled subflows of the "
                  "repetitions. Dashed: chance, 1/(subflows seen on WiFi). Panels: bulk or "
                  "request/response traffic, connections starting together or staggered.", fig)


def table(summ: pd.DataFrame) -> pd.DataFrame:
    """The report's table: precision, recall and accuracy with intervals per cell."""
    def ci(est: pd.Series, lo: pd.Series, hi: pd.Series) -> pd.Series:
        return [("n/a" if pd.isna(e) else f"{e:.2f} [{a:.2f}, {b:.2f}]")
                for e, a, b in zip(est, lo, hi)]
    return pd.DataFrame({
        "stack": summ["stack"], "countermeasure": summ["countermeasure"],
        "method": summ["method"].map(P.METHOD_LABELS),
        "pattern": summ["pattern"], "start": summ["start"], "K": summ["K"],
        "subflows": summ["subflows"],
        "precision": ci(summ["precision"], summ["precision_low"], summ["precision_high"]),
        "recall": ci(summ["recall"], summ["recall_low"], summ["recall_high"]),
        "accuracy": ci(summ["accuracy"], summ["accuracy_low"], summ["accuracy_high"]),
        "chance": summ["chance"].round(3)})


COST = {"metric.setup_ms_median": "setup ms (median of runs' medians)",
        "metric.goodput_mbit": "bulk: goodput Mbit/s, all connections (median)",
        "metric.answers_per_s": "request/response: answers per s (median)"}


def cost_table(runs: pd.DataFrame) -> pd.DataFrame:
    """What each implementation and countermeasure costs: setup time (connect()
    until usable; the user-space stack's includes its joins and TLS) and
    throughput, per traffic pattern and K (runs before these metrics: none)."""
    have = [c for c in COST if c in runs.columns]
    if "metric.setup_ms_median" not in have:
        return pd.DataFrame()
    df = runs.assign(stack=runs.get("metric.stack", pd.Series("kernel", index=runs.index)).fillna("kernel"),
                     countermeasure=runs.get("metric.countermeasure",
                                             pd.Series("none", index=runs.index)).fillna("none"))
    keys = ["stack", "countermeasure", "metric.pattern", "metric.connections"]
    # a metric no run of the store has (e.g. goodput without bulk runs) loads as strings
    spread = [c for c in ("metric.setup_ms_p25", "metric.setup_ms_p75") if c in runs.columns]
    df[have + spread] = df[have + spread].apply(pd.to_numeric, errors="coerce")
    g = df.groupby(keys, dropna=False)
    out = g[have + spread].median().reset_index()
    out["runs"] = g.size().values
    if len(spread) == 2:  # the connections' setup quartiles (runs before them: none)
        out["setup ms, connections' quartiles"] = [
            "" if pd.isna(a) else f"{a:.0f}-{b:.0f}" for a, b in zip(out[spread[0]], out[spread[1]])]
    out = out.drop(columns=spread)
    base = out[out["countermeasure"] == "none"].set_index(["stack", "metric.pattern", "metric.connections"])
    at = pd.MultiIndex.from_frame(out[["stack", "metric.pattern", "metric.connections"]])

    def against_none(col: str, with_ms: bool = False) -> list[str]:
        ref = base[col].reindex(at).to_numpy() if col in base else [np.nan] * len(out)
        return ["" if pd.isna(v) or pd.isna(r) or not r else
                (f"{round(v - r) + 0:+.0f} ms ({round(100 * (v / r - 1)) + 0:+.0f} %)" if with_ms
                 else f"{round(100 * (v / r - 1)) + 0:+.0f} %")  # + 0: no "-0"
                for v, r in zip(out[col], ref)]
    out["setup vs none"] = against_none("metric.setup_ms_median", with_ms=True)
    if "metric.goodput_mbit" in have:
        lo, hi = g["metric.goodput_mbit"].min().to_numpy(), g["metric.goodput_mbit"].max().to_numpy()
        out["goodput, runs' range"] = ["" if pd.isna(a) else f"{a:.1f}-{b:.1f}" for a, b in zip(lo, hi)]
        out["goodput vs none"] = against_none("metric.goodput_mbit")
    if "metric.answers_per_s" in have:
        out["answers vs none"] = against_none("metric.answers_per_s")
    return out.rename(columns={"metric.pattern": "pattern", "metric.connections": "K", **COST}).round(2)


def build(res: Results) -> Section:
    """The privacy section of the report."""
    setup_style()
    sec = Section("privacy", "Privacy: linking subflows across paths",
                  "K MPTCP connections from 16 client hosts share a WiFi-like and an LTE-like path; "
                  "one passive observer per path (on the access router's side) sees only its own "
                  "path. Each subflow seen on LTE is linked to one seen on WiFi by the MP_JOIN "
                  "token against the keys of MP_CAPABLE (RFC 8684 sends them in the clear), by "
                  "the data-sequence numbers and DATA_ACKs alone (no handshake needed), or by "
                  "timing alone (experiment: privacy, topology: multi-client).")
    runs = res.of(P.EXPERIMENT)
    if runs.empty:
        sec.notes.append("No complete runs of privacy: nothing to plot.")
        return sec
    summ = P.summary(P.run_scores(res, runs))
    if summ.empty:
        sec.notes.append("The privacy runs hold no observed subflows: nothing to plot.")
        return sec
    variants = sorted(set(zip(summ["stack"], summ["countermeasure"])),
                      key=lambda v: (v != ("kernel", "none"), v))
    for stack, cm in variants:
        sec.figures.append(accuracy_figure(summ, stack, cm))
    sec.tables["privacy_linking"] = table(summ)
    sec.inline.append("privacy_linking")
    cost = cost_table(runs)
    if not cost.empty:
        sec.tables["privacy_cost"] = cost
        sec.inline.append("privacy_cost")
    return sec
