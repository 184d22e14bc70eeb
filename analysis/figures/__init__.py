"""Figure families. Each module has `build(res: Results) -> Section`.

Shared here: the Section/Figure records the report consumes, one colour per
strategy across every figure, and the helpers that keep figures readable.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: the report runs on headless machines and in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

STRATEGIES = ["tcp", "mptcp", "timer", "sim", "ips", "sim+ips", "timer+ips"]
_CB = sns.color_palette("colorblind", 10)
# fixed so that "sim" is the same colour in every figure and every report
STRATEGY_COLORS = {
    "tcp": _CB[7], "mptcp": _CB[0], "timer": _CB[1], "sim": _CB[2], "ips": _CB[4],
    "sim+ips": _CB[8], "timer+ips": _CB[5],
}
# dash patterns on top of colours: identical ECDFs of several strategies stay distinguishable
STRATEGY_DASHES = {
    "tcp": (0, (1, 1)), "mptcp": "-", "timer": "--", "sim": "-", "ips": "-.",
    "sim+ips": (0, (5, 1, 1, 1)), "timer+ips": (0, (3, 1, 1, 1, 1, 1)),
}
OUTCOMES = ["mptcp", "fallback", "tcp", "failed"]
OUTCOME_COLORS = {"mptcp": _CB[2], "fallback": _CB[1], "tcp": _CB[7], "failed": _CB[3], "n/a": "#dddddd"}
PATH_COLORS = ["#0173b2", "#de8f05", "#029e73", "#cc78bc", "#ca9161", "#56b4e9", "#949494", "#ece133"]


@dataclass
class Figure:
    name: str  # file stem: <name>.png / .pdf
    title: str
    caption: str
    fig: plt.Figure


@dataclass
class Section:
    key: str
    title: str
    intro: str
    figures: list[Figure] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # written as <name>.csv
    notes: list[str] = field(default_factory=list)  # why something is missing


def setup_style() -> None:
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.15,
                  rc={"figure.dpi": 110, "savefig.dpi": 150, "axes.titleweight": "bold",
                      "legend.frameon": False, "figure.constrained_layout.use": True})


def strategy_color(s: str) -> tuple:
    return STRATEGY_COLORS.get(s, (0.3, 0.3, 0.3))


def strategy_dash(s: str) -> object:
    return STRATEGY_DASHES.get(s, "-")


def order(values: pd.Series, preferred: list[str]) -> list[str]:
    """Known values in the documented order, unknown ones after, sorted."""
    present = [str(v) for v in values.dropna().unique()]
    return [p for p in preferred if p in present] + sorted(v for v in present if v not in preferred)


def variant_label(runs: pd.DataFrame, exclude: tuple[str, ...] = ()) -> pd.Series:
    """A short label from the grid parameters that vary in `runs` ("fault=blackhole, mode=backup").

    Experiments name their parameters as they like; taking only the varying ones
    keeps labels short without hard-coding names.
    """
    params = [c for c in runs.columns if c.startswith("param.") and c not in exclude
              and runs[c].nunique(dropna=True) > 1]
    if not params:
        return pd.Series("all runs", index=runs.index, dtype="string")
    parts = [runs[c].map(pretty_value, na_action="ignore").astype("string").fillna("–")
             .radd(f"{short_name(c, params)}=") for c in params]
    label = parts[0]
    for p in parts[1:]:
        label = label + ", " + p
    return label


def short_name(col: str, among: list[str]) -> str:
    """`param.topology.params.rates` -> `rates` unless another column ends the same way."""
    full = col.removeprefix("param.")
    last = full.rsplit(".", 1)[-1]
    clash = sum(c.rsplit(".", 1)[-1] == last for c in among) > 1
    return full if clash or last.isdigit() else last


def pretty_value(v: object) -> str:
    """Grid values as people write them: [10, 10] -> 10/10, True -> true."""
    if isinstance(v, str) and v.startswith("[") and v.endswith("]"):
        try:
            items = json.loads(v)
            return "/".join(f"{x:g}" if isinstance(x, (int, float)) else str(x) for x in items)
        except ValueError:
            return v
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v)).lower()
    return str(v)


def save(fig: Figure, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        p = out_dir / f"{fig.name}.{ext}"
        fig.fig.savefig(p, bbox_inches="tight")
        paths.append(p)
    return paths


def grid(n: int, max_cols: int = 4, panel: tuple[float, float] = (3.6, 2.8),
         sharex: bool = True, sharey: bool = True) -> tuple[plt.Figure, list[plt.Axes]]:
    """n panels in a wrapped grid; unused axes removed."""
    cols = min(n, max_cols)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel[0] * cols, panel[1] * rows),
                             sharex=sharex, sharey=sharey, squeeze=False, layout="constrained")
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.remove()
    return fig, flat[:n]
