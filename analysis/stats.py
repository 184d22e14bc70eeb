"""Statistics across repetitions: bootstrap confidence intervals and ECDFs; binomial intervals.

Repetitions per cell are few (5 in a quick run, 20+ in a full one) and setup
times are far from normal (SYN retransmissions make them multi-modal), so
intervals come from the percentile bootstrap rather than from a t-distribution.
Resampling is seeded: the same data always gives the same report.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

Stat = str | Callable[[np.ndarray], np.ndarray]
_STATS: dict[str, Callable[..., np.ndarray]] = {
    "median": np.median, "mean": np.mean, "min": np.min, "max": np.max,
}


@dataclass(frozen=True)
class CI:
    """An estimate with its confidence interval and sample size."""
    estimate: float
    low: float
    high: float
    n: int
    level: float = 0.95

    def __str__(self) -> str:
        return self.format()

    def format(self, unit: str = "", scale: float = 1.0, digits: int = 3) -> str:
        """`0.021 s [0.020, 0.023]` — the interval is omitted when it says nothing."""
        if self.n == 0 or not np.isfinite(self.estimate):
            return "n/a"
        u = f" {unit}" if unit else ""
        e = _fmt(self.estimate * scale, digits)
        if self.n < 2 or not (np.isfinite(self.low) and np.isfinite(self.high)):
            return f"{e}{u} (n={self.n})"
        return f"{e}{u} [{_fmt(self.low * scale, digits)}, {_fmt(self.high * scale, digits)}] (n={self.n})"


def _fmt(x: float, digits: int) -> str:
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def _stat_fn(stat: Stat) -> Callable[[np.ndarray], np.ndarray]:
    if callable(stat):
        return stat
    if stat in _STATS:
        fn = _STATS[stat]
        return lambda a: fn(a, axis=-1)
    if stat.startswith("p") and stat[1:].replace(".", "", 1).isdigit():
        q = float(stat[1:])
        return lambda a: np.percentile(a, q, axis=-1)
    raise ValueError(f"unknown statistic {stat!r} (median, mean, min, max, pNN or a callable)")


def clean(values: Iterable[float] | pd.Series) -> np.ndarray:
    """Finite floats only: NaN / NA mean "not measured" and must not count."""
    a = pd.to_numeric(pd.Series(list(values) if not isinstance(values, pd.Series) else values),
                      errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    return a[np.isfinite(a)]


def bootstrap_ci(values: Iterable[float] | pd.Series, stat: Stat = "median",
                 level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> CI:
    """Percentile-bootstrap CI of `stat` over the finite values.

    A callable stat gets a 2-D array (resamples × values) and must reduce the last axis.
    """
    a = clean(values)
    fn = _stat_fn(stat)
    n = len(a)
    if n == 0:
        return CI(float("nan"), float("nan"), float("nan"), 0, level)
    est = float(fn(a[np.newaxis, :])[0])
    if n == 1 or np.all(a == a[0]):
        # no spread to resample: the interval degenerates (shown as such, not invented)
        return CI(est, est if n > 1 else float("nan"), est if n > 1 else float("nan"), n, level)
    rng = np.random.default_rng(seed)
    # memory guard: resample in chunks so 20k runs × 2000 resamples stays small
    chunk = max(1, 4_000_000 // n)
    boots = np.concatenate([fn(a[rng.integers(0, n, size=(min(chunk, n_boot - i), n))])
                            for i in range(0, n_boot, chunk)])
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boots, [alpha, 1 - alpha])
    return CI(est, float(lo), float(hi), n, level)


def summarize(df: pd.DataFrame, by: Sequence[str], value: str,
              stats: Sequence[str] = ("median", "mean"), level: float = 0.95,
              n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per group: n (finite values), n_total (rows), and estimate/low/high
    per statistic, e.g. `median`, `median_low`, `median_high`."""
    out = []
    groups = df.groupby(list(by), dropna=False, observed=True, sort=True) if by else [((), df)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, object] = dict(zip(by, key))
        vals = clean(g[value]) if value in g else np.array([])
        row.update(n=len(vals), n_total=len(g))
        for s in stats:
            ci = bootstrap_ci(vals, s, level=level, n_boot=n_boot, seed=seed)
            row.update({s: ci.estimate, f"{s}_low": ci.low, f"{s}_high": ci.high})
        out.append(row)
    cols = [*by, "n", "n_total", *[f"{s}{x}" for s in stats for x in ("", "_low", "_high")]]
    return pd.DataFrame(out, columns=cols)


def ecdf(values: Iterable[float] | pd.Series, n_total: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sorted x and the fraction of runs with a value ≤ x.

    With n_total larger than the number of finite values, the curve stops below 1:
    runs that never reached the event (failed connections) stay visible as the gap.
    """
    x = np.sort(clean(values))
    total = max(n_total or len(x), len(x))
    y = np.arange(1, len(x) + 1) / total if total else np.array([])
    return x, y


def share(df: pd.DataFrame, by: Sequence[str], col: str) -> pd.DataFrame:
    """Share of each value of `col` within each group (long format: by…, col, n, share)."""
    counts = (df.assign(**{col: df[col].astype("string").fillna("n/a")})
              .groupby([*by, col], observed=True).size().rename("n").reset_index())
    totals = counts.groupby(list(by), observed=True)["n"].transform("sum")
    return counts.assign(share=counts["n"] / totals)


def binomial_interval(n: int, p: float, level: float = 0.99) -> tuple[int, int]:
    """Central interval [lo, hi] of Binomial(n, p) holding `level` of the mass."""
    if p <= 0:
        return 0, 0
    if p >= 1:
        return n, n
    logp, logq = math.log(p), math.log1p(-p)
    lg = math.lgamma
    pmf = [math.exp(lg(n + 1) - lg(k + 1) - lg(n - k + 1) + k * logp + (n - k) * logq)
           for k in range(n + 1)]
    tail = (1 - level) / 2
    acc, lo = 0.0, 0
    for k, v in enumerate(pmf):
        acc += v
        if acc > tail:
            lo = k
            break
    acc, hi = 0.0, n
    for k in range(n, -1, -1):
        acc += pmf[k]
        if acc > tail:
            hi = k
            break
    return lo, hi
