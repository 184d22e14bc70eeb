"""RobE_eSIM and RobE over the user-space stack: when multipath is available
with SIM and with eSIM, per default-path condition, and the user-stack vs
kernel-socket comparison of the same strategies.

Data: complete establishment runs with client_stack "user" (experiments/
robe-esim.toml, robe-user.toml), one explicit pair of stacks per panel
(analysis.figures.establishment.stack_pair); the multipath stamp is the
client's (analysis.esim_checks.multipath_client).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from analysis import Results, paths
from analysis.esim_checks import ESIM_CONDITIONS, multipath_client, stack_comparison
from analysis.esim_security import FORGERY_FILE, forgery_table, invalid_reason, load_forgery
from analysis.figures import Figure, Section, grid, order, setup_style, strategy_color
from analysis.figures.establishment import data, log_time_axis, stack_pair

SIDE_BY_SIDE = ["sim", "esim"]


def _slowest_rtt(res: Results, d: pd.DataFrame) -> float | None:
    """RTT of the slowest usable path of the panel's first run (eSIM's bound), None if unknown."""
    if d.empty:
        return None
    r = d.iloc[0]
    ps = [p for p in paths(res.manifests.get((r["experiment"], r["run_id"]), {}))
          if not p.get("blackholed") and p.get("middlebox") != "mptcp_drop"]
    return max((p["rtt_s"] for p in ps), default=None) if len(ps) > 1 else None


def multipath_side_by_side(res: Results, df: pd.DataFrame) -> Figure:
    """Multipath available after (the client's stamp), SIM and eSIM side by side per condition."""
    conditions = order(df["param.condition"], ESIM_CONDITIONS)
    fig, axes = grid(len(conditions), max_cols=3, panel=(3.8, 2.1), sharey=True)
    v_all = multipath_client(df).dropna()
    v_all = v_all[v_all > 0]
    lo = 10 ** np.floor(np.log10(v_all.min() * 0.8)) if len(v_all) else 1e-2
    hi = (v_all.max() * 2.5) if len(v_all) else 10.0
    rng = np.random.default_rng(0)  # jitter only, fixed for identical redraws
    for ax, sc in zip(axes, conditions):
        d = df[df["param.condition"] == sc]
        for y, st in enumerate(SIDE_BY_SIDE):
            g = d[d["param.strategy"] == st]
            v = multipath_client(g).dropna()
            v = v[v > 0]
            if len(v):
                ax.boxplot([v], positions=[y], orientation="horizontal", widths=0.5, showfliers=False,
                           patch_artist=True, manage_ticks=False,
                           boxprops=dict(facecolor=(*strategy_color(st), 0.25), edgecolor="0.3", lw=0.8),
                           medianprops=dict(color="0.1", lw=1.2), whiskerprops=dict(color="0.4"),
                           capprops=dict(color="0.4"))
                ax.scatter(v, y + rng.uniform(-0.15, 0.15, len(v)), s=16, marker="D",
                           color=strategy_color(st), alpha=0.9, edgecolor="0.2", lw=0.3, zorder=3)
            never = len(g) - len(v)
            if len(g) and never:
                ax.text(0.99, 1 - (y + 0.5) / len(SIDE_BY_SIDE), f"{never}/{len(g)} never", transform=ax.transAxes,
                        ha="right", va="center", fontsize=7.5, color="0.3",
                        bbox=dict(facecolor="white", edgecolor="none", alpha=0.85, pad=0.5))
        bound = _slowest_rtt(res, d)
        if bound:
            ax.axvline(bound, color="0.25", lw=1.1, ls="--", zorder=2)
        log_time_axis(ax, lo, hi)
        ax.set_yticks(range(len(SIDE_BY_SIDE)), [s.upper() if s == "sim" else "eSIM" for s in SIDE_BY_SIDE])
        ax.set_ylim(len(SIDE_BY_SIDE) - 0.5, -0.5)
        ax.set_title(sc)
    for ax in axes:
        if ax.get_subplotspec().is_last_row() or ax is axes[-1]:
            ax.set_xlabel("multipath available after")
    fig.legend(handles=[Line2D([], [], color="0.45", lw=0.9, ls="--",
                               label="slowest path's RTT\n(its MP_CAPABLE HS)")], loc="outside right upper")
    return Figure("esim_multipath", "Multipath available after: SIM vs eSIM",
                  "User-space stack on both sides (the server accepts eSIM), per default-path condition: "
                  "the time from connect() until the client could use a second subflow — when it sent "
                  "MP_JOIN_CAP (eSIM) or its MP_JOIN's third ACK (SIM), the moment the kernel stamps as "
                  "sub_established. Dashed: the slowest path's RTT, where eSIM should be; SIM needs setup "
                  "+ one RTT of the winner + the MP_JOIN handshake. 'k/n never': no second subflow "
                  "(a blackholed or MPTCP-dropping path cannot be joined).", fig)


def esim_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per condition, strategy and server: runs, median setup and multipath (client's stamp) in ms,
    runs without a second subflow, eSIM subflows and fallbacks to SIM."""
    d = df.assign(multipath=multipath_client(df),
                  server=df.get("param.server_stack", pd.Series("kernel", index=df.index)).fillna("kernel").astype(str),
                  setup=df["metric.setup_s"].astype("float64"))
    for col in ("metric.esim_subflows", "metric.esim_fallback"):
        d[col] = pd.to_numeric(d[col].astype("float64"), errors="coerce") if col in d else np.nan
    out = d.groupby(["param.condition", "param.strategy", "server"], observed=True).agg(
        runs=("setup", "size"), setup_median_ms=("setup", "median"), multipath_median_ms=("multipath", "median"),
        no_multipath=("multipath", lambda v: int(v.isna().sum())),
        esim_subflows=("metric.esim_subflows", "sum"), fell_back_to_sim=("metric.esim_fallback", "sum")).reset_index()
    out[["setup_median_ms", "multipath_median_ms"]] *= 1e3
    out = out.rename(columns={"param.condition": "condition", "param.strategy": "strategy"})
    rank = {c: i for i, c in enumerate(ESIM_CONDITIONS)}
    return out.sort_values(["condition", "strategy", "server"], key=lambda c: c.map(rank).fillna(99)
                           if c.name == "condition" else c).round(1).reset_index(drop=True)


def build(res: Results) -> Section:
    """The RobE_eSIM section of the report."""
    setup_style()
    sec = Section("esim", "RobE_eSIM and RobE over the user-space stack",
                  "RobE_eSIM keeps SIM's losing attempts and turns them into subflows (user-space stack on "
                  "both sides; against the kernel server it falls back to SIM), and the same strategy code "
                  "run over the user-space stack next to kernel sockets (experiments: robe-esim, robe-user). "
                  "Multipath is the client's stamp (when it could use its join) for both clients. Tables: "
                  "the user-space-stack client's medians per condition, strategy and server (esim_summary; "
                  "fell_back_to_sim and esim_subflows count runs); SIM, TIMER and MPTCP over kernel sockets "
                  "and over the user-space stack against the kernel server, medians in ms (robe_stacks).")
    all_runs = data(res)
    uu = stack_pair(all_runs, "user", "user")
    side = uu[uu["param.strategy"].isin(SIDE_BY_SIDE)] if not uu.empty else uu
    if side.empty:
        sec.notes.append("No complete establishment runs of SIM or eSIM with the user-space stack on both "
                         "sides (experiments/robe-esim.toml): no SIM-vs-eSIM figure.")
    else:
        sec.figures.append(multipath_side_by_side(res, side))
    user = pd.concat([stack_pair(all_runs, "user", "user"), stack_pair(all_runs, "user", "kernel")])
    if not user.empty:
        sec.tables["esim_summary"] = esim_summary(user)
        sec.inline.append("esim_summary")
    cmp = stack_comparison(res)
    if cmp.empty:
        sec.notes.append("No condition with runs of SIM, TIMER or MPTCP over both the user-space stack and "
                         "kernel sockets against the kernel server (experiments/robe-user.toml): no comparison.")
    else:
        sec.tables["robe_stacks"] = cmp.round(2)
        sec.inline.append("robe_stacks")
    forgery = res.root / FORGERY_FILE
    doc = load_forgery(forgery) if forgery.is_file() else None
    why = invalid_reason(doc) if doc is not None else None
    if doc is None:
        sec.notes.append(f"No forged-MP_JOIN_CAP measurement in this results directory ({FORGERY_FILE}, "
                         "written by ./tb paper or ./tb bench.esim-forgery --out DIR): no security table.")
    elif why:
        sec.notes.append(f"The forged-MP_JOIN_CAP measurement in this results directory is invalid: {why}. "
                         "No security table (./tb paper measures again).")
    else:
        sec.tables["esim_forgery"] = forgery_table(doc)
        sec.inline.append("esim_forgery")
        after = doc["victim_after"]
        sec.notes.append(f"After the forgeries the victim connection had {after['subflows']} subflow(s) and "
                         f"carried {after['bytes_sent']} bytes {'intact' if after['bytes_intact'] else 'NOT intact'}.")
    return sec
