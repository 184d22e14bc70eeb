"""Figure families of the report. Part of analysis: may use what analysis may.
Each module has `build(res: Results) -> Section`.

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

STRATEGIES = ["tcp", "mptcp", "timer", "sim", "esim", "ips", "sim+ips", "timer+ips"]
_CB = sns.color_palette("colorblind", 10)
# fixed so that "sim" is the same colour in every figure and every report
STRATEGY_COLORS = {
    "tcp": _CB[7], "mptcp": _CB[0], "timer": _CB[1], "sim": _CB[2], "ips": _CB[4],
    "sim+ips": _CB[8], "timer+ips": _CB[5], "esim": _CB[6],
}
# dash patterns on top of colours: identical ECDFs of several strategies stay distinguishable
STRATEGY_DASHES = {
    "tcp": (0, (1, 1)), "mptcp": "-", "timer": "--", "sim": "-", "ips": "-.",
    "sim+ips": (0, (5, 1, 1, 1)), "timer+ips": (0, (3, 1, 1, 1, 1, 1)), "esim": (0, (4, 1)),
}
OUTCOMES = ["mptcp", "fallback", "tcp", "failed"]
OUTCOME_COLORS = {"mptcp": _CB[2], "fallback": _CB[1], "tcp": _CB[7], "failed": _CB[3], "n/a": "#dddddd"}
PATH_COLORS = ["#0173b2", "#de8f05", "#029e73", "#cc78bc", "#ca9161", "#56b4e9", "#949494", "#ece133"]


@dataclass
class Figure:
    """A report figure: the matplotlib figure with its file stem, title and caption."""
    name: str  # file stem: <name>.png / .pdf
    title: str
    caption: str
    fig: plt.Figure


@dataclass
class Section:
    """A report section: title, introduction, figures and tables."""
    key: str
    title: str
    intro: str
    figures: list[Figure] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # written as <name>.csv
    inline: list[str] = field(default_factory=list)  # of those tables, the ones shown in the page
    notes: list[str] = field(default_factory=list)  # why something is missing


def setup_style() -> None:
    """Apply the report's seaborn/matplotlib style."""
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.15,
                  rc={"figure.dpi": 110, "savefig.dpi": 150, "axes.titleweight": "bold",
                      "legend.frameon": False, "figure.constrained_layout.use": True})


def strategy_color(s: str) -> tuple:
    """The report's colour for a strategy (grey for an unknown one)."""
    return STRATEGY_COLORS.get(s, (0.3, 0.3, 0.3))


def strategy_dash(s: str) -> object:
    """The report's line style for a strategy."""
    return STRATEGY_DASHES.get(s, "-")


def order(values: pd.Series, preferred: list[str]) -> list[str]:
    """Known values in the documented order, unknown ones after, sorted."""
    present = [str(v) for v in values.dropna().unique()]
    return [p for p in preferred if p in present] + sorted(v for v in present if v not in preferred)


def variant_label(runs: pd.DataFrame, exclude: tuple[str, ...] = ()) -> pd.Series:
    """A grid point in words, from the parameters that vary in `runs`
    ("WiFi blackholed, LTE backup"; "cubic, 0/0 ms one way").

    Experiments name their parameters as they like; taking only the varying ones
    keeps labels short without hard-coding an experiment. A varying field of a
    timed event brings the whole event into the label, said as what it does.
    """
    params = [c for c in runs.columns if c.startswith("param.") and c not in exclude
              and runs[c].nunique(dropna=True) > 1]
    if not params:
        return pd.Series("all runs", index=runs.index, dtype="string")
    events = sorted({int(c.split(".")[2]) for c in params
                     if c.startswith("param.events.") and c.split(".")[2].isdigit()})
    first = {"rates": 0, "delays": 1}  # the link settings lead, as people describe a setup
    others = sorted((c for c in params if not c.startswith("param.events.")),
                    key=lambda c: first.get(c.rsplit(".", 1)[-1], 2))

    def words(row: pd.Series) -> str:
        parts = [event_words(row, i) for i in events]
        parts += [value_words(c.removeprefix("param."), row[c]) for c in others]
        return ", ".join(p for p in parts if p)

    return runs.apply(words, axis=1).astype("string") if len(runs) else \
        pd.Series([], dtype="string", index=runs.index)


PATH_WORDS = {"wifi": "WiFi", "lte": "LTE"}
ACTION_WORDS = {
    "link_down": "{path} link down", "link_up": "{path} link up",
    "blackhole": "{path} blackholed", "unblackhole": "{path} no longer blackholed",
    "backup_on": "{path} stays backup", "backup_off": "{path} backup flag cleared (MP_PRIO)",
    "mptcp_drop": "{path} drops MPTCP SYNs", "syn_pass": "{path} middlebox passes SYNs",
    "middlebox_off": "{path} middlebox removed", "set_link": "{path} {changes}",
}
CHANGE_WORDS = {"loss_pct": "{:g} % loss", "delay_ms": "{:g} ms one-way delay", "rate_mbit": "{:g} Mbit/s",
                "jitter_ms": "{:g} ms jitter", "queue_pkts": "{:g}-packet queue"}


def path_words(name: object) -> str:
    """wifi -> WiFi, lte -> LTE; other path names as they are."""
    return PATH_WORDS.get(str(name), str(name))


def event_words(row: pd.Series, i: int) -> str:
    """Timed event i of the run's grid point, as what it does ("WiFi blackholed")."""
    prefix = f"param.events.{i}."
    action = row.get(prefix + "action")
    if action is None or action is pd.NA or (isinstance(action, float) and np.isnan(action)):
        return ""  # this grid point has no such event: nothing to say
    changes = {key: row.get(prefix + "changes." + key) for key in CHANGE_WORDS}
    changes = {k: v for k, v in changes.items()
               if v is not None and v is not pd.NA and not (isinstance(v, float) and np.isnan(v))}
    return change_words(str(action), str(row.get(prefix + "path", "")), changes)


def change_words(action: str, path: str, changes: dict | None = None) -> str:
    """A recorded change (action, path, set_link changes) in words ("WiFi 100 % loss")."""
    text = ACTION_WORDS.get(action, "{path} " + action.replace("_", " "))
    said = [fmt.format(float(changes[k])) for k, fmt in CHANGE_WORDS.items() if (changes or {}).get(k) is not None]
    return text.format(path=path_words(path), changes=", ".join(said)).strip()


def value_words(name: str, v: object) -> str:
    """One parameter's value in words: flags said as what they mean, lists as a/b with units."""
    last = name.rsplit(".", 1)[-1]
    if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)):
        return f"{last.replace('_', ' ')} not set"
    value = pretty_value(v)
    if last.endswith("_backup") and isinstance(v, (bool, np.bool_)):
        return f"{path_words(last.removesuffix('_backup'))} {'backup' if v else 'regular'}"
    if last == "rates":
        return f"{value} Mbit/s"
    if last == "delays":
        return f"{value} ms one way"
    if last == "direction":
        return {"up": "upload", "down": "download"}.get(value, value)
    if last in ("congestion_control", "strategy", "scenario", "condition", "cc"):
        return value
    if isinstance(v, (bool, np.bool_)):
        return last.replace("_", " ") if v else f"no {last.replace('_', ' ')}"
    return f"{last.replace('_', ' ')} {value}"


def pretty_value(v: object) -> str:
    """Grid values as people write them: [10, 10] -> 10/10, True -> true."""
    if isinstance(v, str) and v.startswith("[") and v.endswith("]"):
        try:
            items = json.loads(v)
            return "/".join(f"{x:g}" if isinstance(x, (int, float)) else str(x) for x in items)
        except ValueError:
            return v
    if isinstance(v, (list, tuple)):
        return "/".join(f"{x:g}" if isinstance(x, (int, float)) else str(x) for x in v)
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v)).lower()
    return str(v)


def save(fig: Figure, out_dir: Path) -> list[Path]:
    """Write the figure as PNG and PDF into out_dir; returns the files."""
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
