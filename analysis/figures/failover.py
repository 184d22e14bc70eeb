"""Failover: per-path goodput over time around the fault, stall and recovery distributions.

Data: complete runs of `failover`. Variants are whatever grid parameters vary
(fault kind, backup mode, ...). Goodput per path comes from the `timeseries`
table (series `delivered_bytes`, key = path) and, when a run has none, from the
per-subflow `bytes_acked` counters in `subflows`.
"""
from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from analysis import Results
from analysis.figures import PATH_COLORS, Figure, Section, path_words, change_words, grid, setup_style, variant_label
from analysis.stats import summarize

EXPERIMENT = "failover"
SMOOTH_S = 0.1  # plotted goodput: mean over this window


def goodput(res: Results, run: pd.Series) -> pd.DataFrame:
    """Long frame t, path, mbit (per sampling interval) for one run; `total` included."""
    key = (run["experiment"], run["run_id"])
    ts = res.timeseries
    ts = ts[(ts["experiment"] == key[0]) & (ts["run_id"] == key[1]) & (ts["series"] == "delivered_bytes")]
    if not ts.empty:
        # several hosts may report; the receiver's view is what the application got
        host = ts["host"].mode().iloc[0]
        d = ts[ts["host"] == host][["t", "key", "value"]].rename(columns={"key": "path"})
        # several subflows on one path report separately: the path's goodput is their sum
        d = d.groupby(["t", "path"], observed=True, as_index=False)["value"].sum()
    else:
        sf = res.subflows
        sf = sf[(sf["experiment"] == key[0]) & (sf["run_id"] == key[1])]
        if sf.empty:
            return pd.DataFrame(columns=["t", "path", "mbit"])
        col = "bytes_acked" if sf["bytes_acked"].notna().any() else "bytes_received"
        per = (sf.groupby(["t", "path"], observed=True)[col].sum().astype("float64")
               .unstack("path").sort_index())
        d = per.diff().clip(lower=0).stack().rename("value").reset_index()
        d = pd.concat([d, d.groupby("t", as_index=False)["value"].sum().assign(path="total")])
    d = d.sort_values("t")
    # interval length per path: samples are "bytes in the interval ending at t"
    dt = d.groupby("path", observed=True)["t"].diff()
    dt = dt.fillna(dt.median() if dt.notna().any() else 1.0)
    d = d.assign(mbit=d["value"] * 8 / dt.to_numpy() / 1e6)[["t", "path", "mbit"]]
    # MPTCP reassembly hands data to the application in bursts (a hole on one
    # subflow holds back the other), so 10 ms bins swing between 0 and several
    # times the link rate; a centred SMOOTH_S window shows the rate a user sees.
    # The stall metric is computed from the raw bins, not from this curve.
    step = float(dt.median()) if len(dt) else 0.01
    n = max(1, round(SMOOTH_S / step)) if step > 0 else 1
    d["mbit"] = d.groupby("path", observed=True)["mbit"].transform(
        lambda x: x.rolling(n, center=True, min_periods=1).mean())
    return d


def faults(res: Results, run: pd.Series) -> pd.DataFrame:
    """t (applied, s since t0) and label (in words) of every change the run recorded.

    From the manifest's `applied_events` (when each change took effect); a store
    that did not record them falls back to the events table's fault rows."""
    man = res.manifests.get((run["experiment"], run["run_id"]), {})
    applied = man.get("applied_events")
    if applied is not None:
        rows = [(float(a["applied_s"]), change_words(a["action"], a["path"], a.get("changes")))
                for a in applied if a.get("ok", True)]
        return pd.DataFrame(rows, columns=["t", "label"])
    ev = res.events
    ev = ev[(ev["experiment"] == run["experiment"]) & (ev["run_id"] == run["run_id"])
            & (ev["source"] == "fault")]
    return pd.DataFrame({"t": ev["t"].to_numpy(), "label": ev["event"].astype(str).to_numpy()})


def _representative(g: pd.DataFrame) -> pd.Series:
    """The repetition whose stall is the median one: typical, not cherry-picked."""
    if "metric.stall_s" in g and g["metric.stall_s"].notna().any():
        s = g["metric.stall_s"].astype("float64")
        return g.loc[(s - s.median()).abs().idxmin()]
    return g.iloc[0]


def timeline(res: Results, runs: pd.DataFrame) -> Figure | None:
    """Goodput over time around the failure, one representative run per variant."""
    variants = list(dict.fromkeys(runs["variant"]))
    picks = [(v, _representative(runs[runs["variant"] == v])) for v in variants]
    series = [(v, r, goodput(res, r)) for v, r in picks]
    series = [s for s in series if not s[2].empty]
    if not series:
        return None
    paths = sorted({p for _, _, d in series for p in d["path"].unique() if p != "total"})
    colors = {p: PATH_COLORS[i % len(PATH_COLORS)] for i, p in enumerate(paths)}
    fig, axes = grid(len(series), max_cols=2, panel=(5.2, 2.8), sharex=True, sharey=True)
    fault_names: set[str] = set()
    for ax, (v, r, d) in zip(axes, series):
        for p in paths:
            dp = d[d["path"] == p]
            ax.plot(dp["t"], dp["mbit"], color=colors[p], lw=1.6, drawstyle="steps-pre")
        tot = d[d["path"] == "total"]
        if not tot.empty:
            ax.plot(tot["t"], tot["mbit"], color="0.15", lw=1.0, ls="--", drawstyle="steps-pre")
        for i, f in enumerate(faults(res, r).sort_values("t").itertuples()):
            ax.axvline(f.t, color="#d55e00", lw=1.4)
            # one line each, stacked downwards: changes close in time never overprint
            ax.annotate(f.label, (f.t, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(3, -3 - 11 * i), textcoords="offset points", ha="left", va="top",
                        fontsize=8.5, color="#d55e00",
                        bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.8))
            fault_names.add(f.label)
        stall = r.get("metric.stall_s")
        name = textwrap.fill(str(v), 52)  # a long grid point wraps instead of running into the next panel
        ax.set_title(f"{name}\n(run {r['run_id']}, stall {float(stall):.2f} s)" if pd.notna(stall)
                     else f"{name}\n(run {r['run_id']})", fontsize=9.5)
    # One limit from every panel's data: set_ylim(bottom=0) on a shared axis
    # would freeze the top at the first panel's maximum and clip the others.
    top = max(float(d["mbit"].max()) for _, _, d in series)
    axes[0].set_ylim(0, top * 1.08 if top > 0 else 1)
    for ax in axes:
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel(f"goodput (Mbit/s, {SMOOTH_S * 1000:.0f} ms mean)")
        if ax.get_subplotspec().is_last_row() or ax is axes[-1]:
            ax.set_xlabel("time since transfer start (s)")
    handles = [Line2D([], [], color=colors[p], lw=1.8, label=path_words(p)) for p in paths]
    handles.append(Line2D([], [], color="0.15", lw=1.0, ls="--", label="total"))
    handles.append(Line2D([], [], color="#d55e00", lw=1.4, label="fault injected"))
    fig.legend(handles=handles, loc="outside right upper", title="path")
    return Figure("failover_timeline", "Goodput per path around the fault",
                  "Goodput delivered per path (receiver side, per sampling interval) for one "
                  "representative repetition of each variant (the one with the median stall); "
                  "dashed: total; vertical line: the injected fault.", fig)


def distributions(runs: pd.DataFrame) -> Figure | None:
    """Stall and recovery times per failover variant."""
    metrics = [(c, lbl) for c, lbl in (("metric.stall_s", "longest stall (s)"),
                                       ("metric.recovery_s", "recovery to ≥ 90 % (s)"))
               if c in runs and runs[c].notna().any()]
    if not metrics:
        return None
    variants = list(dict.fromkeys(runs["variant"]))
    fig, axes = grid(len(metrics), max_cols=2, panel=(4.6, 0.55 * len(variants) + 1.4),
                     sharex=False, sharey=True)
    rng = np.random.default_rng(0)
    for ax, (col, lbl) in zip(axes, metrics):
        vals = [runs[runs["variant"] == v][col].astype("float64").dropna().to_numpy() for v in variants]
        ax.boxplot(vals, positions=range(len(variants)), orientation="horizontal", widths=0.5,
                   showfliers=False, patch_artist=True,
                   boxprops=dict(facecolor="#cfe3f3", edgecolor="0.3"), medianprops=dict(color="0.1"))
        for i, v in enumerate(vals):
            ax.scatter(v, i + rng.uniform(-0.12, 0.12, len(v)), s=14, color="#0173b2", zorder=3, lw=0)
        ax.set_yticks(range(len(variants)), variants)
        ax.set_ylim(len(variants) - 0.5, -0.5)
        ax.set_xlim(left=0)
        ax.set_xlabel(lbl)
    return Figure("failover_distributions", "Stall and recovery over repetitions",
                  "Per variant, over repetitions: the longest interval without delivered bytes "
                  "after the fault, and the time from the fault until goodput is back to ≥ 90 % "
                  "of what the remaining path can carry. Boxes: quartiles; dots: runs.", fig)


def summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Per failover variant: medians with confidence intervals of stall, recovery and goodput."""
    out = None
    for col in ("metric.stall_s", "metric.recovery_s", "metric.goodput_mbit", "metric.bytes_delivered"):
        if col not in runs:
            continue
        s = summarize(runs, ["variant"], col, stats=("median", "mean"))
        s = s.rename(columns={c: f"{col[7:]}.{c}" for c in s.columns if c != "variant"})
        out = s if out is None else out.merge(s, on="variant")
    integ = [c for c in runs.columns if c.startswith("metric.") and ("integrity" in c or "sha256" in c)]
    if integ:
        ok = runs.groupby("variant", observed=True)[integ[0]].agg(
            lambda s: f"{int(s.astype('boolean').fillna(False).sum())}/{len(s)}")
        ok = ok.rename("integrity_ok").reset_index()
        out = ok if out is None else out.merge(ok, on="variant")
    return out if out is not None else pd.DataFrame({"variant": runs["variant"].unique()})


def build(res: Results) -> Section:
    """The failover section of the report."""
    setup_style()
    sec = Section("failover", "Failover",
                  "Bulk transfer over two paths; the primary path fails during the transfer "
                  "(experiment: failover).")
    runs = res.of(EXPERIMENT)
    if runs.empty:
        sec.notes.append("No complete runs of failover: nothing to plot.")
        return sec
    runs = runs.assign(variant=variant_label(runs))
    tl = timeline(res, runs)
    if tl is None:
        sec.notes.append("No delivered_bytes time series or subflow samples: goodput timeline skipped.")
    else:
        sec.figures.append(tl)
    dist = distributions(runs)
    if dist is None:
        sec.notes.append("metric.stall_s / metric.recovery_s missing: distributions skipped.")
    else:
        sec.figures.append(dist)
    sec.tables["failover_summary"] = summary(runs)
    return sec
