"""Throughput: efficiency (goodput / Σ configured rates) and per-path shares.

Data: complete runs of `throughput`. The kernel's simult_flows selftest accepts
about 90 % of the sum of the link rates, so 0.9 is drawn as the reference bound;
1.0 is the physical limit (Σ rates).
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import MatplotlibDeprecationWarning
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from analysis import Results, paths
from analysis.figures import PATH_COLORS, Figure, Section, path_words, grid, pretty_value, setup_style, variant_label
from analysis.stats import summarize

EXPERIMENT = "throughput"
SIMULT_FLOWS_BOUND = 0.9


def _rates_param(runs: pd.DataFrame) -> str | None:
    cands = [c for c in runs.columns if c.startswith("param.") and "rate" in c.lower()
             and runs[c].nunique() > 1]
    return cands[0] if cands else None


def efficiency_figure(runs: pd.DataFrame) -> Figure:
    """Goodput as a fraction of the sum of configured rates, per rate and delay configuration."""
    rp = _rates_param(runs)
    sums = runs["metric.sum_rates_mbit"].astype("float64")
    # x: the rate configuration ordered by Σ rates; "10/10" and "15/5" share a sum
    if rp is not None:
        x = runs[rp].map(pretty_value).astype("string") + "\n(Σ " + sums.map("{:g}".format) + ")"
    else:
        x = "Σ " + sums.map("{:g}".format)
    x_order = list(dict.fromkeys(x.iloc[np.lexsort([x.to_numpy(dtype=str), sums.to_numpy()])]))
    hue = variant_label(runs, exclude=(rp,) if rp else ()).rename("variant")
    hues = list(dict.fromkeys(hue.sort_values()))
    df = pd.DataFrame({"x": x, "efficiency": runs["metric.efficiency"].astype("float64"),
                       "variant": hue}).dropna(subset=["efficiency"])
    fig, (ax,) = grid(1, panel=(max(5.5, 1.0 * len(x_order) * max(1, len(hues)) ** 0.5 + 2.5), 3.8))
    pal = dict(zip(hues, sns.color_palette("colorblind", len(hues))))
    with warnings.catch_warnings():  # seaborn 0.13 passes matplotlib 3.11's deprecated `vert`
        warnings.simplefilter("ignore", MatplotlibDeprecationWarning)
        sns.boxplot(df, x="x", y="efficiency", hue="variant", order=x_order, hue_order=hues,
                    palette=pal, ax=ax, showfliers=False, fill=False, legend=False, linewidth=1.0)
    sns.stripplot(df, x="x", y="efficiency", hue="variant", order=x_order, hue_order=hues,
                  palette=pal, dodge=True, ax=ax, size=4, alpha=0.85, legend=False, jitter=0.15)
    ax.axhline(1.0, color="0.2", lw=1.0)
    ax.axhline(SIMULT_FLOWS_BOUND, color="#d55e00", lw=1.0, ls="--")
    lo = min(0.5, float(df["efficiency"].min()) - 0.05) if not df.empty else 0.5
    ax.set_ylim(lo, 1.05)
    ax.set_xlabel("configured rates per path (Mbit/s), Σ rates" if rp else "Σ configured rates (Mbit/s)")
    ax.set_ylabel("efficiency = goodput / Σ rates")
    handles = [Patch(color=pal[h], label=h) for h in hues]
    handles += [Line2D([], [], color="0.2", lw=1.0, label="Σ rates (physical limit)"),
                Line2D([], [], color="#d55e00", lw=1.0, ls="--", label="0.9 (kernel simult_flows)")]
    fig.legend(handles=handles, loc="outside right upper", title="variant")
    return Figure("throughput_efficiency", "Efficiency vs sum of rates",
                  "Aggregate goodput divided by the sum of the configured path rates, per rate "
                  "configuration (x, ordered by Σ rates) and variant (colour); dots are runs, boxes "
                  "quartiles. Solid line: Σ rates; dashed: the 90 % bound of the kernel's "
                  "simult_flows selftest.", fig)


def path_bytes(res: Results, runs: pd.DataFrame) -> pd.DataFrame:
    """experiment, run_id, path, bytes delivered over the run (excluding the `total` key)."""
    ts = res.table("timeseries", runs)
    ts = ts[(ts["series"] == "delivered_bytes") & (ts["key"] != "total")]
    by_ts = ts.groupby(["experiment", "run_id", "key"], observed=True)["value"].sum()
    by_ts = by_ts.rename("bytes").reset_index().rename(columns={"key": "path"})
    sf = res.table("subflows", runs)
    if not sf.empty:  # runs without a time series: cumulative counters, last minus first
        sf = sf[~sf.set_index(["experiment", "run_id"]).index.isin(
            by_ts.set_index(["experiment", "run_id"]).index.unique())]
        g = sf.groupby(["experiment", "run_id", "path", "subflow"], observed=True)["bytes_acked"]
        per = (g.max() - g.min()).groupby(["experiment", "run_id", "path"], observed=True).sum()
        by_ts = pd.concat([by_ts, per.astype("float64").rename("bytes").reset_index()])
    return by_ts


def path_shares(res: Results, runs: pd.DataFrame) -> pd.DataFrame:
    """experiment, run_id, path, share. The experiment's own metric.share.<path>
    (bytes on the wire per path) when present, else delivered bytes per path."""
    cols = [c for c in runs.columns if c.startswith("metric.share.")]
    if cols:
        long = runs.melt(id_vars=["experiment", "run_id"], value_vars=cols, var_name="path",
                         value_name="share").dropna(subset=["share"])
        return long.assign(path=long["path"].str.removeprefix("metric.share."),
                           share=long["share"].astype("float64"))
    pb = path_bytes(res, runs)
    if pb.empty:
        return pb.assign(share=pd.Series(dtype="float64"))
    return pb.assign(share=pb["bytes"] / pb.groupby(["experiment", "run_id"])["bytes"].transform("sum"))


def shares_figure(res: Results, runs: pd.DataFrame) -> tuple[Figure, pd.DataFrame] | None:
    """Each path's share of the bytes against its share of the configured rate."""
    pb = path_shares(res, runs)
    if pb.empty:
        return None
    lab = runs.assign(variant=variant_label(runs))[["experiment", "run_id", "variant"]]
    pb = pb.merge(lab, on=["experiment", "run_id"])
    mean = pb.groupby(["variant", "path"], observed=True)["share"].mean().unstack("path").fillna(0)
    # configured rate share of each path, the share a rate-proportional split would give
    rate_share: dict[str, dict[str, float]] = {}
    for v, g in lab.groupby("variant"):
        man = res.manifests.get((g["experiment"].iloc[0], g["run_id"].iloc[0]), {})
        ps = [p for p in paths(man) if p["rate_mbit"]]
        tot = sum(p["rate_mbit"] for p in ps)
        rate_share[v] = {p["name"]: p["rate_mbit"] / tot for p in ps} if tot else {}
    order_paths = list(mean.columns)
    variants = list(mean.index)
    fig, (ax,) = grid(1, panel=(7.0, 0.42 * len(variants) + 1.3))
    left = np.zeros(len(variants))
    for i, p in enumerate(order_paths):
        w = mean[p].to_numpy()
        ax.barh(range(len(variants)), w, left=left, color=PATH_COLORS[i % len(PATH_COLORS)],
                height=0.7, edgecolor="white", lw=0.5)
        left += w
    first = order_paths[0]
    for y, v in enumerate(variants):  # where the first path's bar would end if split by rate
        if first in rate_share.get(v, {}):
            ax.plot([rate_share[v][first]] * 2, [y - 0.4, y + 0.4], color="0.1", lw=1.6)
    ax.set_yticks(range(len(variants)), variants)
    ax.set_ylim(len(variants) - 0.5, -0.5)
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(lambda x, _p: f"{x:.0%}")
    ax.set_xlabel("share of bytes per path (mean over repetitions)")
    handles = [Patch(color=PATH_COLORS[i % len(PATH_COLORS)], label=path_words(p)) for i, p in enumerate(order_paths)]
    handles.append(Line2D([], [], color="0.1", lw=1.6, label=f"{path_words(first)}: rate share"))
    fig.legend(handles=handles, loc="outside right upper", title="path")
    fig_ = Figure("throughput_shares", "Per-path share of the delivered bytes",
                  f"Mean share of the bytes carried by each path per variant. Black tick: "
                  f"the share of {first} if traffic were split in proportion to the configured rates.",
                  fig)
    return fig_, mean.reset_index()


def build(res: Results) -> Section:
    """The throughput section of the report."""
    setup_style()
    sec = Section("throughput", "Throughput",
                  "Bulk transfers over 1..N paths with equal and unbalanced rates and delays "
                  "(experiment: throughput).")
    runs = res.of(EXPERIMENT)
    if runs.empty:
        sec.notes.append("No complete runs of throughput: nothing to plot.")
        return sec
    if {"metric.efficiency", "metric.sum_rates_mbit"} <= set(runs.columns):
        sec.figures.append(efficiency_figure(runs))
    else:
        sec.notes.append("metric.efficiency or metric.sum_rates_mbit missing: efficiency figure skipped.")
    sh = shares_figure(res, runs)
    if sh is None:
        sec.notes.append("No per-path delivered bytes (timeseries or subflows): shares skipped.")
    else:
        sec.figures.append(sh[0])
        sec.tables["throughput_shares"] = sh[1]
    v = runs.assign(variant=variant_label(runs))
    out = None
    for col in ("metric.efficiency", "metric.goodput_mbit"):
        if col in v:
            s = summarize(v, ["variant"], col).rename(columns=lambda c, n=col[7:]: c if c == "variant" else f"{n}.{c}")
            out = s if out is None else out.merge(s, on="variant")
    if out is not None:
        sec.tables["throughput_summary"] = out
    return sec
