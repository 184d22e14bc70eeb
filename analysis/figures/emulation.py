"""Emulation fidelity: configured vs measured RTT, rate and loss.

Two sources, each optional:
- the emulation benchmark CSV(s): any `*bench*.csv` below the results directory
  (or given explicitly), one row per (backend, rate, delay, loss) point with
  columns like rtt_cfg_ms, rtt_idle_ms, rtt_load_ms, goodput_mbit, loss_cfg_pct,
  loss_meas_pct, cpu_pct — whatever subset is present is plotted;
- every run manifest's `emulation.calibration` (testbed.core.emulation.calibrate):
  per path the configured and the measured RTT and single-flow goodput.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import seaborn as sns

from analysis import Results
from analysis.figures import Figure, Section, grid, setup_style

TCP_MAX_GOODPUT = 1448 / 1514  # HTB counts Ethernet frames; one MSS of payload per frame
RATE_OK = (0.90, 1.01)  # calibrate()'s default acceptance band


def find_benchmarks(root: Path) -> list[Path]:
    """The emulation benchmark CSV files below root."""
    return sorted(p for p in root.rglob("*bench*.csv") if not any(x.startswith(".tmp-") for x in p.parts))


def load_benchmarks(files: Iterable[Path]) -> pd.DataFrame:
    """The benchmark CSV files as one frame (unreadable files skipped)."""
    frames = []
    for f in files:
        try:
            df = pd.read_csv(f)
        except (OSError, ValueError, pd.errors.ParserError):
            continue
        frames.append(df.assign(source=f.name))
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    if "rtt_cfg_ms" not in df and "delay_ms" in df:
        df["rtt_cfg_ms"] = 2 * pd.to_numeric(df["delay_ms"], errors="coerce")
    if "backend" not in df:
        df["backend"] = "unknown"
    df["backend"] = df["backend"].astype("string")
    return df


def _first(d: dict[str, Any], *keys: str) -> float | None:
    for k in keys:
        v = d.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def calibration_table(res: Results) -> pd.DataFrame:
    """One row per (run, path, quantity): configured, measured, ok."""
    rows = []
    for (exp, rid), man in res.manifests.items():
        emu = man.get("emulation") if isinstance(man.get("emulation"), dict) else {}
        cal = emu.get("calibration")
        if not isinstance(cal, dict) or not isinstance(cal.get("paths"), dict):
            continue
        # A reused testbed's runs between full calibrations carry the drift check
        # (RTT only, verdict per path in `ok`); stores before reuse: every one full.
        base = {"experiment": exp, "run_id": rid, "status": man.get("status"),
                "backend": cal.get("backend") or emu.get("backend"),
                "kind": cal.get("kind", "full")}
        for path, e in cal["paths"].items():
            if not isinstance(e, dict):
                continue
            cfg = _first(e, "rtt_configured_ms", "rtt_cfg_ms")
            meas = _first(e, "rtt_mean_ms", "rtt_meas_ms", "rtt_p50_ms", "rtt_idle_ms")
            if cfg is not None and meas is not None:
                rows.append({**base, "path": path, "quantity": "rtt_ms", "configured": cfg,
                             "measured": meas, "ok": e.get("rtt_ok", e.get("ok"))})
            for key, sub in e.items():  # rate_up / rate_down: {configured_mbit, goodput_mbit, ok}
                if key.startswith("rate") and isinstance(sub, dict):
                    c, m = _first(sub, "configured_mbit"), _first(sub, "goodput_mbit")
                    if c and m is not None:
                        rows.append({**base, "path": f"{path} {key.removeprefix('rate_')}",
                                     "quantity": "rate_mbit", "configured": c, "measured": m,
                                     "ok": sub.get("ok")})
            c, m = _first(e, "rate_cfg_mbit"), _first(e, "rate_meas_mbit")
            if c and m is not None:
                rows.append({**base, "path": path, "quantity": "rate_mbit", "configured": c,
                             "measured": m, "ok": None})
            c, m = _first(e, "loss_cfg_pct"), _first(e, "loss_meas_pct")
            if c is not None and m is not None:
                rows.append({**base, "path": path, "quantity": "loss_pct", "configured": c,
                             "measured": m, "ok": None})
    cols = ["experiment", "run_id", "status", "backend", "kind", "path", "quantity", "configured",
            "measured", "ok"]
    return pd.DataFrame(rows, columns=cols)


def _identity(ax, lo: float, hi: float, label: str = "measured = configured") -> None:
    ax.plot([lo, hi], [lo, hi], color="0.3", lw=0.9, ls="--", label=label, zorder=0)


def benchmark_figure(df: pd.DataFrame) -> Figure | None:
    """Configured vs measured RTT, rate and loss per backend from the benchmarks."""
    backends = sorted(df["backend"].dropna().unique())
    pal = dict(zip(backends, sns.color_palette("colorblind", len(backends))))
    panels = []
    if "rtt_cfg_ms" in df and ({"rtt_idle_ms", "rtt_load_ms"} & set(df.columns)):
        panels.append("rtt")
    if {"rate_mbit", "goodput_mbit"} <= set(df.columns):
        panels.append("rate")
    if {"loss_cfg_pct", "loss_meas_pct"} <= set(df.columns):
        panels.append("loss")
    if {"rate_mbit", "cpu_pct"} <= set(df.columns):
        panels.append("cpu")
    if not panels:
        return None
    fig, axes = grid(len(panels), max_cols=2, panel=(4.3, 3.3), sharex=False, sharey=False)
    for ax, kind in zip(axes, panels):
        if kind == "rtt":
            hi = float(pd.to_numeric(df["rtt_cfg_ms"], errors="coerce").max() or 1) * 1.1 + 1
            _identity(ax, 0, hi)
            for col, marker in (("rtt_idle_ms", "o"), ("rtt_load_ms", "^")):
                if col in df:
                    for b in backends:
                        d = df[df["backend"] == b]
                        ax.scatter(d["rtt_cfg_ms"], d[col], marker=marker, s=22, color=pal[b], alpha=0.8,
                                   label=f"{b}, {col.split('_')[1]}")
            ax.set_xlabel("configured RTT (ms)")
            ax.set_ylabel("measured RTT (ms)")
            ax.set_title("RTT (idle ○, under load △)")
        elif kind == "rate":
            rates = pd.to_numeric(df["rate_mbit"], errors="coerce")
            lo, hi = float(rates.min()) * 0.8, float(rates.max()) * 1.25
            _identity(ax, lo, hi, "goodput = rate")
            ax.plot([lo, hi], [lo * TCP_MAX_GOODPUT, hi * TCP_MAX_GOODPUT], color="0.5", lw=0.8, ls=":",
                    label="TCP max (95.6 %)")
            for b in backends:
                d = df[df["backend"] == b]
                ax.scatter(d["rate_mbit"], d["goodput_mbit"], s=22, color=pal[b], alpha=0.8, label=b)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("configured rate (Mbit/s)")
            ax.set_ylabel("measured goodput (Mbit/s)")
            ax.set_title("Rate")
        elif kind == "loss":
            hi = float(pd.to_numeric(df["loss_cfg_pct"], errors="coerce").max() or 1) * 1.15 + 0.5
            _identity(ax, 0, hi)
            for b in backends:
                d = df[df["backend"] == b]
                ax.scatter(d["loss_cfg_pct"], d["loss_meas_pct"], s=22, color=pal[b], alpha=0.8, label=b)
            ax.set_xlabel("configured loss (%)")
            ax.set_ylabel("measured loss (%)")
            ax.set_title("Loss")
        else:
            for b in backends:
                d = df[df["backend"] == b].groupby("rate_mbit", as_index=False)["cpu_pct"].max()
                ax.plot(d["rate_mbit"], d["cpu_pct"], marker="o", color=pal[b], label=b)
            ax.set_xscale("log")
            ax.set_ylim(0, 105)
            ax.set_xlabel("configured rate (Mbit/s)")
            ax.set_ylabel("CPU of the emulator (% of a core, max)")
            ax.set_title("Cost")
        ax.legend(fontsize=7.5, loc="best")
    return Figure("emulation_benchmark", "Emulation benchmark: configured vs measured",
                  "Link-emulation benchmark per backend: measured RTT idle and under load against "
                  "the configured RTT, goodput of one TCP flow against the configured rate (dotted: "
                  "the 95.6 % a TCP payload can reach through HTB), measured against configured "
                  "loss, and the emulator's CPU cost. Dashed: measured = configured.", fig)


def calibration_figure(cal: pd.DataFrame) -> Figure | None:
    """Measured vs configured values from the runs' calibrations."""
    kinds = [q for q in ("rtt_ms", "rate_mbit", "loss_pct") if (cal["quantity"] == q).any()]
    if not kinds:
        return None
    fig, axes = grid(len(kinds), max_cols=3, panel=(4.2, 3.2), sharex=False, sharey=False)
    colors = {True: "#029e73", False: "#d55e00", None: "#0173b2"}
    rng = np.random.default_rng(0)
    for ax, q in zip(axes, kinds):
        d = cal[cal["quantity"] == q]
        cfg = d["configured"].astype(float)
        meas = d["measured"].astype(float)
        jitter = 1 + rng.uniform(-0.03, 0.03, len(d))  # many runs share one configured value
        ok = d["ok"].map(lambda v: v if isinstance(v, bool) else None)
        if q == "rtt_ms":
            y, ylabel = meas - cfg, "measured − configured RTT (ms)"
            ax.axhline(0, color="0.3", lw=0.9, ls="--")
            ax.set_title("RTT (ping, idle)")
            xlabel = "configured RTT (ms)"
        elif q == "rate_mbit":
            y, ylabel = meas / cfg, "goodput / configured rate"
            ax.axhspan(*RATE_OK, color="#029e73", alpha=0.08, label="accepted band")
            ax.axhline(TCP_MAX_GOODPUT, color="0.5", lw=0.8, ls=":", label="TCP max (95.6 %)")
            ax.set_title("Rate (one TCP flow)")
            xlabel = "configured rate (Mbit/s)"
        else:
            y, ylabel = meas - cfg, "measured − configured loss (pp)"
            ax.axhline(0, color="0.3", lw=0.9, ls="--")
            ax.set_title("Loss")
            xlabel = "configured loss (%)"
        for verdict, c in colors.items():
            m = ok.map(lambda v, t=verdict: v is t).to_numpy(dtype=bool)
            if m.any():
                lbl = {True: "within tolerance", False: "out of tolerance", None: "no verdict"}[verdict]
                ax.scatter((cfg * jitter)[m], y[m], s=16, color=c, alpha=0.7, lw=0, label=lbl)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7.5, loc="best")
    return Figure("emulation_calibration", "Per-run calibration",
                  "Calibration of each run's testbed (runs with calibration enabled: full when "
                  "a testbed is built and every calibrate_every runs, the drift check's RTT in "
                  "between): per path, the idle ping RTT minus the configured RTT, and one TCP "
                  "flow's goodput relative to the configured rate (shaded: the accepted 90–101 % "
                  "band). Red points made their run invalid.", fig)


def build(res: Results, bench_csv: Iterable[Path] | None = None) -> Section:
    """The emulation-fidelity section of the report."""
    setup_style()
    sec = Section("emulation", "Emulation fidelity",
                  "Does the link emulation deliver what was configured? From the emulation "
                  "benchmark and from the calibration stored with each run.")
    files = list(bench_csv) if bench_csv is not None else find_benchmarks(res.root)
    bench = load_benchmarks(files)
    if bench.empty:
        sec.notes.append("No emulation benchmark CSV (*bench*.csv) found below the results directory.")
    else:
        f = benchmark_figure(bench)
        if f is None:
            sec.notes.append("Benchmark CSV has none of the expected column pairs: not plotted.")
        else:
            sec.figures.append(f)
        sec.tables["emulation_benchmark"] = bench
    cal = calibration_table(res)
    if cal.empty:
        sec.notes.append("No run carries an emulation calibration (calibrate = false or no runs).")
    else:
        f = calibration_figure(cal)
        if f is not None:
            sec.figures.append(f)
        sec.tables["emulation_calibration"] = cal
    return sec
