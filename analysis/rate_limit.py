"""Rate limit: what the rate-limit experiment's runs say about the room's question
at IETF 105, "if the server clamps the window, can that achieve more or less the
same as the subflow rate-limit option?" (docs/rate-limit.md).

Input: complete runs of `rate-limit` (metrics per run: the limited path's rate
after the request, accuracy = median |rate-R|/R, convergence, total goodput and
each path's rate before and after, queueing delay per path). summary() gives one
row per mode and R (medians over the repetitions); expectation_rows() gives the
expectation table's rows, each with its measured value and whether it holds
(None: not measured, saying which runs are missing).
"""
from __future__ import annotations

import pandas as pd

from analysis import Results

EXPERIMENT = "rate-limit"
MODES = ("srl", "window", "window_start", "shaping", "none")
MODE_LABELS = {"srl": "SRL option (sender paces)", "window": "receive-window clamp at the request",
               "window_start": "receive-window clamp from the start",
               "shaping": "client shapes its LTE interface", "none": "no limit"}
SRL = "draft-hoang-mptcp-sub-rate-limit-00"
IETF105 = SRL + ", the question at IETF 105"
TARGET = "this testbed's target"
ACCURATE = 0.15        # a limit holds the path within 15 % of R (median over the bins after settling)
UNTOUCHED = 0.85       # the other path keeps >= 85 % of its rate before the request

COLUMNS = {"metric.limited_after_mbit": "limited path after, Mbit/s", "metric.accuracy": "accuracy |rate-R|/R",
           "metric.convergence_s": "convergence s", "metric.total_after_mbit": "total after, Mbit/s",
           "metric.total_ratio": "total after / before"}


def _num(df: pd.DataFrame, col: str) -> pd.Series:
    return pd.to_numeric(df[col], errors="coerce") if col in df else pd.Series(float("nan"), index=df.index)


def summary(res: Results) -> pd.DataFrame:
    """One row per mode and R: medians over the complete runs of the limited path's
    rate after the request, accuracy, convergence, each path's rate before and after,
    total goodput after and its ratio to before, queueing delay per path; runs = how many."""
    runs = res.of(EXPERIMENT)
    if runs.empty or "metric.mode" not in runs:
        return pd.DataFrame()
    path = runs["param.path"].astype(str) if "param.path" in runs else pd.Series("lte", index=runs.index)
    df = pd.DataFrame({"mode": runs["metric.mode"].astype(str), "R": _num(runs, "metric.rate_mbit"),
                       "limited": path})
    other = [c.split(".", 2)[2] for c in runs.columns if c.startswith("metric.before_mbit.")
             and c.split(".", 2)[2] not in ("total", *set(path))]
    for col in (*COLUMNS, "metric.before_mbit.total", "metric.last_data_s"):
        df[col] = _num(runs, col)
    df["stalled"] = (runs["metric.stalled"].astype("boolean").fillna(False).astype(float)
                     if "metric.stalled" in runs else 0.0)  # share of the cell's runs
    # the limited path's and the other path's rates before/after (first other path: two-path runs)
    df["limited_before"] = [_num(runs, f"metric.before_mbit.{p}").loc[i] for i, p in zip(runs.index, path)]
    o = other[0] if other else None
    df["other"] = o
    df["other_before"] = _num(runs, f"metric.before_mbit.{o}") if o else float("nan")
    df["other_after"] = _num(runs, f"metric.after_mbit.{o}") if o else float("nan")
    for key in sorted({*path, *other}):
        df[f"queueing {key} ms"] = _num(runs, f"metric.queueing_after_ms.{key}")
    g = df.groupby(["mode", "R"], dropna=False)
    out = g.median(numeric_only=True)
    out["runs"] = g.size()
    out["other"] = g["other"].first()
    return out.reset_index()


def table(summ: pd.DataFrame) -> pd.DataFrame:
    """The report's table: per mode and R, the limited path and the total after the request."""
    if summ.empty:
        return summ
    cols = ["mode", "R", "runs", "stalled", *COLUMNS, "other_after",
            *[c for c in summ.columns if c.startswith("queueing ")]]
    out = summ[[c for c in cols if c in summ]].copy()
    out["mode"] = pd.Categorical(out["mode"], [m for m in MODES if m in set(out["mode"])] +
                                 sorted(set(out["mode"]) - set(MODES)))
    out = out.sort_values(["mode", "R"]).rename(columns={**COLUMNS, "R": "R Mbit/s", "stalled": "stalled (share of runs)",
                                                          "other_after": "other path after, Mbit/s"})
    return out.round(3)


def _cells(summ: pd.DataFrame, mode: str) -> pd.DataFrame:
    return summ[summ["mode"] == mode].sort_values("R") if not summ.empty else summ


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def expectation_rows(res) -> list[tuple[str, str, str, str, str, str, bool | None]]:
    """(source, subject, condition, expected, criterion, measured, holds) per row; holds None = not measured."""
    summ = summary(res)
    rows: list[tuple[str, str, str, str, str, str, bool | None]] = []
    missing = "not measured (no complete rate-limit runs of mode {m})"
    cond = "two-path download, the client asks for LTE <= R mid-transfer"

    def accuracy_row(mode: str, source: str, subject: str, expected: str) -> None:
        c = _cells(summ, mode)
        if c.empty or c["metric.accuracy"].isna().all():
            rows.append((source, subject, cond, expected, f"median |rate-R|/R <= {ACCURATE:g} at every R",
                         missing.format(m=mode), None))
            return
        worst = float(c["metric.accuracy"].max())
        rows.append((source, subject, cond, expected, f"median |rate-R|/R <= {ACCURATE:g} at every R",
                     "; ".join(f"R = {r:g}: LTE {l:.2f} Mbit/s ({_pct(a)} off)" for r, l, a in
                               zip(c["R"], c["metric.limited_after_mbit"], c["metric.accuracy"])),
                     bool(worst <= ACCURATE)))

    def other_row(mode: str, source: str, subject: str, expected: str) -> None:
        """The other path's rate after the request against its rate before, at every R."""
        c = _cells(summ, mode)
        crit = f"the other path after >= {UNTOUCHED:g} x before, at every R"
        if c.empty or c["other_before"].isna().all():
            rows.append((source, subject, cond, expected, crit, missing.format(m=mode), None))
            return
        ok = bool((c["other_after"] >= UNTOUCHED * c["other_before"]).all())
        rows.append((source, subject, cond, expected, crit,
                     "; ".join(f"R = {r:g}: {o} {b:.1f} -> {a:.1f} Mbit/s, total {t:.1f} Mbit/s"
                               for r, o, b, a, t in zip(c["R"], c["other"], c["other_before"],
                                                         c["other_after"], c["metric.total_after_mbit"])),
                     ok))

    def same_row(mode: str, subject: str, reference: str | None) -> None:
        """Whether a window clamp does what the option does at some R: LTE within ACCURATE
        of R and the other path at >= UNTOUCHED of its rate (before, or in mode reference)."""
        c = _cells(summ, mode).copy()
        expected = "the connection-level window cannot cap LTE alone (it is not the option's effect)"
        crit = (f"at no R: LTE within {_pct(ACCURATE)} of R and the other path >= {UNTOUCHED:g} x its rate "
                + (f"in mode {reference}" if reference else "before the request"))
        if reference and not c.empty:
            c["other_before"] = c["R"].map(_cells(summ, reference).set_index("R")["other_after"])
        if c.empty or c["other_before"].isna().all():
            rows.append((IETF105, subject, cond, expected, crit,
                         missing.format(m=mode + (f" and {reference}" if reference else "")), None))
            return
        end = summ["metric.last_data_s"].max()  # where runs that did not stall stopped
        same = (c["metric.accuracy"] <= ACCURATE) & (c["other_after"] >= UNTOUCHED * c["other_before"])
        text = "; ".join(
            f"R = {r:g}: LTE {l:.2f} Mbit/s ({_pct(a)} off), {o} {b:.1f} -> {x:.1f}, total {t:.1f} Mbit/s"
            + (f", stalled at {d:g} s" if st >= 0.5 and d < end - 1 else "")
            for r, l, a, o, b, x, t, st, d in zip(c["R"], c["metric.limited_after_mbit"], c["metric.accuracy"],
                                                   c["other"], c["other_before"], c["other_after"],
                                                   c["metric.total_after_mbit"], c["stalled"],
                                                   c["metric.last_data_s"]))
        rows.append((IETF105, subject, cond, expected, crit, text, not bool(same.any())))

    accuracy_row("srl", SRL, "SRL (user-space stack)", "the sender holds the subflow at the requested rate")
    other_row("srl", SRL, "SRL (user-space stack)", "the other path keeps its rate")
    same_row("window", "receive-window clamp at the request (kernel MPTCP receiver)", None)
    same_row("window_start", "receive-window clamp from the start (kernel MPTCP receiver)", "none")
    accuracy_row("shaping", TARGET, "client shapes its LTE interface (kernel MPTCP client)",
                 "egress + ingress shaping holds LTE at R")
    other_row("shaping", TARGET, "client shapes its LTE interface (kernel MPTCP client)",
              "the other path keeps its rate")
    rows.append(answer_row(summ))
    return rows


def answer_row(summ: pd.DataFrame) -> tuple[str, str, str, str, str, str, bool | None]:
    """The room's question answered in one sentence with numbers, at an R that srl and a
    window mode share (the middle one): SRL's LTE and total against each window clamp's."""
    expected = "no: clamping the window is not the same as the option"
    crit = "every window clamp's total goodput < 0.5 x SRL's at the same R"
    s = _cells(summ, "srl")
    ws = {m: _cells(summ, m) for m in ("window", "window_start")}
    shared = sorted(set(s["R"]) & set().union(*(set(w["R"]) for w in ws.values()))) if not s.empty else []
    if not shared:
        return (IETF105, "SRL vs receive-window clamp", "same R, same topology", expected, crit,
                "not measured (needs complete srl and window runs at a common R)", None)
    r = shared[len(shared) // 2]
    a = s[s["R"] == r].iloc[0]
    text = (f"At R = {r:g} Mbit/s, SRL holds LTE within {_pct(a['metric.accuracy'])} of R "
            f"({a['metric.limited_after_mbit']:.2f} Mbit/s) while total goodput stays "
            f"{a['metric.total_after_mbit']:.1f} Mbit/s ({a['other']} {a['other_after']:.1f})")
    ok = True
    for mode, when in (("window", "set at the request"), ("window_start", "set from the start")):
        w = ws[mode]
        if w.empty or r not in set(w["R"]):
            continue
        b = w[w["R"] == r].iloc[0]
        stall = (f" (the connection stalled at {b['metric.last_data_s']:g} s)"
                 if b["stalled"] >= 0.5 and b["metric.last_data_s"] < a["metric.last_data_s"] - 1 else "")
        text += (f"; the window clamp {when} cuts both paths to {b['metric.total_after_mbit']:.1f} Mbit/s "
                 f"in total (LTE {b['metric.limited_after_mbit']:.2f}, {b['other']} {b['other_after']:.1f}){stall}")
        ok = ok and bool(b["metric.total_after_mbit"] < 0.5 * a["metric.total_after_mbit"])
    return (IETF105, "SRL vs receive-window clamp", "same R, same topology", expected, crit, text, ok)


__all__ = ["EXPERIMENT", "MODES", "MODE_LABELS", "summary", "table", "expectation_rows", "answer_row"]
