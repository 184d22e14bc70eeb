"""Privacy: the linking attacks on what per-path observers saw, scored against
the ground truth, and their statistics (docs/privacy.md).

Input: the `observed_subflows` table of privacy runs (one row per observer and
subflow: keys, MP_JOIN token, spans of the two data-sequence spaces, first
and last time seen) and the run's `connection` column (the truth, from the
client's sockets; never read by an attack).

The task: each subflow seen on the second observed path (`b`) is to be linked
to the subflow of the same connection seen on the first (`a`). Each method
gives every candidate pair a score (lower = more alike) and a bound:

- `token`: MP_JOIN tokens against keys seen in MP_CAPABLE (token = top 32 bits
  of SHA-256(key), RFC 8684 §3.2) or against another MP_JOIN's token: score 0
  when they match, else 1; bound 0.
- `dsn`: the data-sequence spaces alone (the IETF 105 attack; needs no
  handshake): the gap between the pair's spans of the same space (client's
  data: its DSNs and the server's DATA_ACKs; likewise the server's), the
  smaller of the two spaces; bound 2**32 (ISDNs are uniform over 2**64, so
  two unrelated connections fall that close with probability ~2**-31).
- `timing`: when each subflow was first seen alone (a baseline): b's partner
  is the subflow first seen most recently before b (score: that lag; a later
  one scores infinity); bound TIMING_BOUND_S.

Decision (precision, recall): b is linked to its best-scoring candidate when
that score is within the bound. Forced choice (accuracy): b is linked to its
best-scoring candidate whatever the score; ties share the credit (1/ties if
the true partner is among them), so an uninformative method scores exactly
chance, 1/(number of candidates). Intervals: Wilson score intervals (95 %)
over the pooled subflows of a cell.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from testbed.harness.observers import from_i64
from testbed.stack.crypto import token_of

EXPERIMENT = "privacy"
METHODS = ("token", "dsn", "timing")
METHOD_LABELS = {"token": "MP_JOIN token vs MP_CAPABLE keys", "dsn": "DSN / DATA_ACK ranges",
                 "timing": "timing alone"}
DSN_BOUND = 1 << 32
TIMING_BOUND_S = 0.5
Z95 = 1.959963984540054


def wilson(successes: float, n: float, z: float = Z95) -> tuple[float, float, float]:
    """Wilson score interval of a proportion: (estimate, low, high); NaNs for n = 0."""
    if n <= 0:
        return math.nan, math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # min/max with p: at p = 0 or 1 rounding can leave the end a hair inside
    return p, min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


def _na(v: object) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and v != v)


@dataclass(frozen=True)
class Seen:
    """What an attack may use of one observed subflow (the truth is kept apart)."""
    tokens: frozenset[int]
    up: tuple[int, int] | None
    down: tuple[int, int] | None
    first_t: float


def seen(r: dict) -> Seen:
    """An observed_subflows row as an attack sees it."""
    tokens = {token_of(k) for k in (from_i64(r["key_client"]), from_i64(r["key_server"]))
              if k is not None}
    if not _na(r["join_token"]):
        tokens.add(int(r["join_token"]))

    def span(space: str) -> tuple[int, int] | None:
        lo, hi = from_i64(r[f"{space}_lo"]), from_i64(r[f"{space}_hi"])
        return None if lo is None or hi is None else (lo, hi)
    return Seen(frozenset(tokens), span("up"), span("down"), float(r["first_t"]))


def _gap(x: tuple[int, int] | None, y: tuple[int, int] | None) -> float:
    if x is None or y is None:
        return math.inf
    return float(max(0, y[0] - x[1], x[0] - y[1]))


def score(method: str, a: Seen, b: Seen) -> float:
    """How alike subflows a and b look to one method (lower = more alike)."""
    if method == "token":
        return 0.0 if a.tokens & b.tokens else 1.0
    if method == "dsn":
        return min(_gap(a.up, b.up), _gap(a.down, b.down))
    if method == "timing":  # a join follows its connection's start: the latest start before it
        lag = b.first_t - a.first_t
        return lag if lag >= 0 else math.inf
    raise ValueError(f"unknown method {method!r} (known: {', '.join(METHODS)})")


BOUNDS = {"token": 0.0, "dsn": float(DSN_BOUND), "timing": TIMING_BOUND_S}


@dataclass
class Score:
    """One method on one run: linked pairs and forced-choice credit."""
    method: str
    tp: int = 0            # b linked to its true partner
    fp: int = 0            # b linked to a subflow of another connection
    positives: int = 0     # b that has a true partner among the candidates
    credit: float = 0.0    # forced choice: Σ over those b of 1/ties when right
    chance: float = 0.0    # Σ over those b of 1/candidates


def attack(obs: pd.DataFrame, first: str, second: str) -> dict[str, Score]:
    """Every method on one run's observed subflows: link each subflow seen on
    `second` to one seen on `first`."""
    A = obs[obs["path"] == first].to_dict("records")
    B = obs[obs["path"] == second].to_dict("records")
    out = {m: Score(m) for m in METHODS}
    if not A or not B:
        return out
    seen_a = [seen(a) for a in A]
    truth_a = [None if _na(a["connection"]) else str(a["connection"]) for a in A]
    for b in B:
        conn = None if _na(b["connection"]) else str(b["connection"])
        has_partner = conn is not None and conn in truth_a
        sb = seen(b)
        for m in METHODS:
            s = np.array([score(m, sa, sb) for sa in seen_a])
            best = s.min()
            ties = np.flatnonzero(s == best)
            right = [i for i in ties if has_partner and truth_a[i] == conn]
            sc = out[m]
            if has_partner:
                sc.positives += 1
                sc.chance += 1 / len(A)
                sc.credit += len(right) / len(ties)
            if best <= BOUNDS[m] and len(ties) == 1:
                if right:
                    sc.tp += 1
                else:
                    sc.fp += 1
    return out


def run_scores(res, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per complete privacy run and method: the run's cell (K, pattern,
    start, countermeasure) and its Score."""
    runs = res.of(EXPERIMENT) if runs is None else runs
    if runs.empty:
        return pd.DataFrame()
    table = res.table("observed_subflows", runs)
    rows = []
    for d in runs.to_dict("records"):
        obs = table[table["run_id"] == d["run_id"]]
        observers = str(d.get("metric.observers") or "wifi,lte").split(",")
        for m, sc in attack(obs, observers[0], observers[1]).items():
            rows.append({"run_id": d["run_id"], "K": int(d["metric.connections"]),
                         "pattern": str(d["metric.pattern"]), "start": str(d["metric.start"]),
                         "stack": _text(d.get("metric.stack"), "kernel"),
                         "countermeasure": _text(d.get("metric.countermeasure"), "none"),
                         "joined": d.get("metric.connections_joined"),
                         "method": m, "tp": sc.tp, "fp": sc.fp, "positives": sc.positives,
                         "credit": sc.credit, "chance": sc.chance})
    return pd.DataFrame(rows)


def _text(v: object, default: str) -> str:
    return default if _na(v) or v == "" else str(v)


def summary(scores: pd.DataFrame, by: tuple[str, ...] = ("stack", "countermeasure", "method", "pattern",
                                                         "start", "K")) -> pd.DataFrame:
    """Pooled precision, recall and forced-choice accuracy with Wilson intervals per cell."""
    if scores.empty:
        return pd.DataFrame()
    rows = []
    for key, g in scores.groupby(list(by), observed=True, sort=True):
        tp, fp, pos = g["tp"].sum(), g["fp"].sum(), g["positives"].sum()
        p, plo, phi = wilson(tp, tp + fp)
        r, rlo, rhi = wilson(tp, pos)
        a, alo, ahi = wilson(g["credit"].sum(), pos)
        rows.append({**dict(zip(by, key)), "runs": len(g), "subflows": int(pos),
                     "precision": p, "precision_low": plo, "precision_high": phi,
                     "recall": r, "recall_low": rlo, "recall_high": rhi,
                     "accuracy": a, "accuracy_low": alo, "accuracy_high": ahi,
                     "chance": g["chance"].sum() / pos if pos else math.nan})
    return pd.DataFrame(rows)


# ---- expectation rows ------------------------------------------------------------
RFC8684 = "RFC 8684, sections 3.1-3.2 (keys sent in the clear)"
IETF105 = "draft-bagnulo-mptcp-privacy-00, the attack raised at IETF 105"
TARGET = "this testbed's target"
LINKED = 0.9  # the Wilson lower bound a "links every subflow" claim needs


def _pooled(scores: pd.DataFrame, method: str) -> tuple[str, bool | None]:
    """(measured text, holds?) for 'links (almost) every subflow' over all cells."""
    g = scores[scores["method"] == method]
    if g.empty or g["positives"].sum() == 0:
        return "not measured (no complete privacy runs)", None
    tp, fp, pos = g["tp"].sum(), g["fp"].sum(), g["positives"].sum()
    p, plo, phi = wilson(tp, tp + fp)
    r, rlo, rhi = wilson(tp, pos)
    ks = sorted(g["K"].unique())
    text = (f"precision {p:.2f} [{plo:.2f}, {phi:.2f}], recall {r:.2f} [{rlo:.2f}, {rhi:.2f}] "
            f"({int(pos)} subflows, K = {', '.join(map(str, ks))})")
    return text, bool(tp + fp) and plo >= LINKED and rlo >= LINKED


OFFSET_GOODPUT = 0.9  # the share of plain MPTCP's bulk goodput DSN offsets must keep at every K


def cost_rows(runs: pd.DataFrame) -> list[tuple[str, str, str, str, str, str, bool | None]]:
    """The cost expectation: DSN offsets (arithmetic on two option fields) keep the
    user-space stack's bulk goodput of no countermeasure, per K (median of runs)."""
    subject, cond = "user-space stack, per-subflow DSN offsets", "bulk, same topology and K"
    expected = "DSN offsets cost no measurable throughput"
    crit = f"median bulk goodput ≥ {OFFSET_GOODPUT} × no countermeasure's, at every K"
    need = {"metric.stack", "metric.pattern", "metric.countermeasure", "metric.connections",
            "metric.goodput_mbit"}
    ratios = {}
    if need <= set(runs.columns):
        bulk = runs[(runs["metric.stack"] == "user") & (runs["metric.pattern"] == "bulk")]
        med = (bulk.assign(g=pd.to_numeric(bulk["metric.goodput_mbit"], errors="coerce"))
               .groupby(["metric.countermeasure", "metric.connections"])["g"].median())
        for k in sorted({k for _, k in med.index}):
            if ("none", k) in med.index and ("dsn-offset", k) in med.index and med["none", k] > 0:
                ratios[k] = med["dsn-offset", k] / med["none", k]
    if not ratios:
        return [(TARGET, subject, cond, expected, crit,
                 "not measured (no bulk goodput of the user stack with and without offsets)", None)]
    text = "goodput ratio " + ", ".join(f"K = {k}: {r:.2f}" for k, r in ratios.items())
    return [(TARGET, subject, cond, expected, crit, text, all(r >= OFFSET_GOODPUT for r in ratios.values()))]


def expectation_rows(res) -> list[tuple[str, str, str, str, str, str, bool | None]]:
    """(source, subject, condition, expected, criterion, measured, holds) per row;
    holds None = not measured."""
    runs = res.of(EXPERIMENT)
    scores = run_scores(res, runs) if not runs.empty else pd.DataFrame()
    base = (scores[(scores["countermeasure"] == "none") & (scores["stack"] == "kernel")]
            if not scores.empty else scores)
    crit = f"pooled precision and recall, Wilson 95 % lower bounds ≥ {LINKED}"
    rows = []
    text, ok = _pooled(base, "token") if not base.empty else ("not measured (no complete privacy runs)", None)
    rows.append((RFC8684, "kernel MPTCP", "observers on both paths, K concurrent connections",
                 "MP_JOIN tokens link every join to the keys seen in its MP_CAPABLE", crit, text, ok))
    text, ok = _pooled(base, "dsn") if not base.empty else ("not measured (no complete privacy runs)", None)
    rows.append((IETF105, "kernel MPTCP", "observers who missed the handshakes",
                 "DSN and DATA_ACK ranges alone link the subflows of a connection", crit, text, ok))
    if base.empty:
        rows.append((TARGET, "kernel MPTCP", "connections starting together, largest K",
                     "timing alone is a weaker linker than the data-sequence ranges",
                     "forced-choice accuracy: timing < DSN", "not measured (no complete privacy runs)", None))
    else:
        together = base[base["start"] == "together"]
        kmax = together["K"].max() if not together.empty else None
        if kmax is None or kmax < 2:
            rows.append((TARGET, "kernel MPTCP", "connections starting together, largest K",
                         "timing alone is a weaker linker than the data-sequence ranges",
                         "forced-choice accuracy: timing < DSN",
                         "not measured (no runs with K ≥ 2 starting together)", None))
        else:
            cell = summary(together[together["K"] == kmax], by=("method",)).set_index("method")
            t, d = cell.loc["timing"], cell.loc["dsn"]
            rows.append((TARGET, "kernel MPTCP", f"connections starting together, K = {kmax}",
                         "timing alone is a weaker linker than the data-sequence ranges",
                         "forced-choice accuracy: timing < DSN (intervals apart)",
                         f"timing {t['accuracy']:.2f} [{t['accuracy_low']:.2f}, {t['accuracy_high']:.2f}], "
                         f"DSN {d['accuracy']:.2f} [{d['accuracy_low']:.2f}, {d['accuracy_high']:.2f}], "
                         f"chance {t['chance']:.3f}", bool(t["accuracy_high"] < d["accuracy_low"])))
    for cm, method, what in (("dsn-offset", "dsn", "per-subflow DSN offsets"),
                             ("tls-keys", "token", "MPTCP keys from a TLS exporter"),
                             ("dsn-offset+tls-keys", "dsn", "DSN offsets and TLS-exporter keys"),
                             ("dsn-offset+tls-keys", "token", "DSN offsets and TLS-exporter keys")):
        g = scores[(scores["countermeasure"] == cm) & (scores["method"] == method)] if not scores.empty else scores
        expected = f"the {METHOD_LABELS[method]} method links no better than chance"
        critc = "forced-choice accuracy's Wilson 95 % interval contains chance"
        if g.empty:
            rows.append((TARGET, f"user-space stack, {what}", "same attack, same topology", expected, critc,
                         "not measured (no complete privacy runs with this countermeasure)", None))
            continue
        a, lo, hi = wilson(g["credit"].sum(), g["positives"].sum())
        chance = g["chance"].sum() / g["positives"].sum()
        rows.append((TARGET, f"user-space stack, {what}", "same attack, same topology", expected, critc,
                     f"accuracy {a:.2f} [{lo:.2f}, {hi:.2f}], chance {chance:.3f}", lo <= chance <= hi))
    rows.extend(cost_rows(runs))
    return rows
