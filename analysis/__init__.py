"""Load a results store (docs/results.md) into tidy pandas tables; figures and
the report. Above the harness: may use testbed.harness (the results schema) and
the layers below it, never the experiments.

    from analysis import load
    res = load("results")           # or results/<experiment>, or one run directory
    res.runs                        # one row per run: param.* and metric.* columns
    res.events, res.timeseries, res.subflows, res.packets

Every table carries `experiment` and `run_id`. Columns and dtypes follow the
documented schema even when a table is absent from every run (an empty frame with
the right columns), so analysis code never has to special-case missing data.
Columns, dtypes and the store's version come from testbed.harness.schema: older
manifests are upgraded on load, a newer or unknown version is refused
(ResultsError, one line). Unreadable files do not abort the load: they are
listed in `Results.problems`.
"""
from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from testbed.base.errors import TestbedError
from testbed.harness.overrides import flatten
from testbed.harness.schema import RUN_COLUMNS, TABLES, SchemaError, conform, empty, keyed, upgrade

__all__ = ["Results", "load", "paths", "SCHEMAS", "RUN_COLUMNS", "ResultsError"]

# The store's format has one owner (testbed.harness.schema); the loader's tables
# are its tables with the experiment/run_id keys in front.
SCHEMAS: dict[str, dict[str, str]] = {name: keyed(name) for name in TABLES}


class ResultsError(TestbedError):
    """The directory is not a results store this code can read (missing, holds no
    run, or written in a schema version it cannot upgrade)."""


@dataclass
class Results:
    """A results store as loaded: runs, events and per-run tables, with selection helpers."""
    root: Path
    runs: pd.DataFrame
    events: pd.DataFrame
    timeseries: pd.DataFrame
    subflows: pd.DataFrame
    packets: pd.DataFrame
    observed_subflows: pd.DataFrame
    # (experiment, run_id) -> the manifest as written, for provenance and testbed details
    manifests: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    run_dirs: dict[tuple[str, str], Path] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def of(self, *experiments: str, status: str | None = "complete") -> pd.DataFrame:
        """Runs of the given experiments (all when none given), by default only the
        complete ones: failed and invalid runs must not enter the statistics."""
        r = self.runs
        if experiments:
            r = r[r["experiment"].isin(experiments)]
        if status is not None:
            r = r[r["status"] == status]
        return r

    def table(self, name: str, runs: pd.DataFrame) -> pd.DataFrame:
        """Rows of table `name` that belong to the given runs."""
        t = getattr(self, name)
        keys = set(zip(runs["experiment"], runs["run_id"]))
        if t.empty or not keys:
            return t.iloc[0:0]
        mask = [k in keys for k in zip(t["experiment"], t["run_id"])]
        return t[mask]


def _params(man: dict[str, Any]) -> dict[str, Any]:
    """The run's parameters as it ran them (the manifest's scenario has the grid
    point applied): the experiment's own `params` (prefix dropped, so
    `params.strategy` becomes `param.strategy`), the topology's parameters
    (`topology.params.lte_backup`), every field of every timed event
    (`events.1.action`, `events.1.path`), and every grid key."""
    scenario = man.get("scenario") if isinstance(man.get("scenario"), dict) else {}
    out = flatten(scenario.get("params") or {})
    topology = scenario.get("topology") if isinstance(scenario.get("topology"), dict) else {}
    out.update(flatten(topology.get("params") or {}, "topology.params."))
    events = scenario.get("events") if isinstance(scenario.get("events"), list) else []
    for i, event in enumerate(events):
        if isinstance(event, dict):
            out.update(flatten(event, f"events.{i}."))
    for k, v in (man.get("params") or {}).items():
        out[k.removeprefix("params.")] = v
    return out


def _column(values: list[Any]) -> pd.Series:
    """Pick the narrowest honest dtype: boolean, Int64, float64, else string."""
    present = [v for v in values if v is not None and not (isinstance(v, float) and v != v)]
    if present and all(isinstance(v, bool) for v in present):
        return pd.Series(values, dtype="boolean")
    if present and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in present):
        return pd.Series(values, dtype="Int64")
    if present and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in present):
        return pd.Series([float("nan") if v is None else float(v) for v in values], dtype="float64")
    as_text = [None if v is None else v if isinstance(v, str)
               else json.dumps(v) if isinstance(v, (list, dict)) else str(v) for v in values]
    return pd.Series(as_text, dtype="string")


def _read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: unreadable ({exc})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path}: not a JSON object")
        return None
    return data


def _run_dirs(root: Path) -> list[Path]:
    """Every completed run directory below root (root itself may be one)."""
    if (root / "manifest.json").is_file():
        return [root]
    found = []
    for m in sorted(root.rglob("manifest.json")):
        rel = m.parent.relative_to(root).parts
        # .tmp-* is a run still being written, .old-* one being replaced; raw/ holds
        # tool output, never a run
        if any(p.startswith((".tmp-", ".old-")) or p == "raw" for p in rel):
            continue
        found.append(m.parent)
    return found


def load(results_dir: str | Path) -> Results:
    """Load the results store at results_dir (upgraded to the current schema) into a Results."""
    root = Path(results_dir)
    if not root.is_dir():
        raise ResultsError(f"{root} is not a directory")
    problems: list[str] = []
    rows: list[dict[str, Any]] = []
    manifests: dict[tuple[str, str], dict[str, Any]] = {}
    run_dirs: dict[tuple[str, str], Path] = {}
    parts: dict[str, list[pd.DataFrame]] = {name: [] for name in SCHEMAS}

    for run_dir in _run_dirs(root):
        man = _read_json(run_dir / "manifest.json", problems)
        if man is None:
            continue
        try:
            man = upgrade(man, where=str(run_dir))
        except SchemaError as exc:  # never "load anyway": numbers read in the wrong schema lie
            raise ResultsError(str(exc)) from None
        exp = str(man.get("experiment") or run_dir.parent.name)
        rid = str(man.get("run_id") or run_dir.name)
        if (exp, rid) in manifests:
            problems.append(f"{run_dir}: duplicate run {exp}/{rid}, skipped")
            continue
        manifests[(exp, rid)] = man
        run_dirs[(exp, rid)] = run_dir
        metrics = _read_json(run_dir / "metrics.json", problems) or {}
        emulation = man.get("emulation") if isinstance(man.get("emulation"), dict) else {}
        row: dict[str, Any] = {
            "experiment": exp, "run_id": rid,
            "status": man.get("status"), "reason": man.get("reason"),
            "repetition": man.get("repetition"), "seed": man.get("seed"),
            "backend": emulation.get("backend"),
            "start": man.get("start"), "end": man.get("end"),
        }
        row.update({f"param.{k}": v for k, v in _params(man).items()})
        row.update({f"metric.{k}": v for k, v in flatten(metrics if isinstance(metrics, dict) else {}).items()})
        rows.append(row)

        for name, schema in SCHEMAS.items():
            f = run_dir / f"{name}.parquet"
            if not f.is_file():
                continue
            try:
                df = pd.read_parquet(f)
            except Exception as exc:  # noqa: BLE001 - any corrupt file: note it, go on
                problems.append(f"{f}: unreadable ({type(exc).__name__}: {exc})")
                continue
            df = df.drop(columns=[c for c in ("experiment", "run_id") if c in df.columns])
            df.insert(0, "run_id", rid)
            df.insert(0, "experiment", exp)
            parts[name].append(conform(df, schema))

    cols: list[str] = list(dict.fromkeys(c for r in rows for c in r))
    extra = sorted(c for c in cols if c not in RUN_COLUMNS)
    extra.sort(key=lambda c: (not c.startswith("param."), c))  # params before metrics
    runs = pd.DataFrame({c: _column([r.get(c) for r in rows]) for c in [*RUN_COLUMNS, *extra]})
    runs = conform(runs, RUN_COLUMNS).reset_index(drop=True)

    tables = {}
    for name, schema in SCHEMAS.items():
        frames = [p for p in parts[name] if not p.empty]
        df = pd.concat(frames, ignore_index=True) if frames else empty(schema)
        tables[name] = conform(df, schema)
    return Results(root=root, runs=runs, manifests=manifests, run_dirs=run_dirs,
                   problems=problems, **tables)


def paths(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's paths as they were when its workload ended: name, rtt_s, rate_mbit,
    default (bool), and the faults in force (blackholed, middlebox, carrier, loss_pct:
    the larger of the two directions' configured loss).

    Read from what the runner recorded (`links_at_end`: each link's parameters per
    direction after every change of the run, the experiment's own included, and
    `testbed.topology.default_path`), never recomputed from the scenario. RTT =
    both directions' delay plus the shared bottleneck's, as configured (what the
    emulation was asked for, not measured). No record, no paths: [].
    """
    links = manifest.get("links_at_end")
    if not isinstance(links, dict) or not links:
        return []
    bottleneck = links.get("bottleneck") or {}
    extra_ms = sum(float((bottleneck.get(d) or {}).get("delay_ms") or 0) for d in ("up", "down"))
    topo = (manifest.get("testbed") or {}).get("topology") or {}
    names = [n for n in links if n != "bottleneck"]
    default = topo.get("default_path") or names[0]
    out = []
    for name in names:
        st = links[name]
        up, down = st.get("up") or {}, st.get("down") or {}
        rtt_ms = float(up.get("delay_ms") or 0) + float(down.get("delay_ms") or 0) + extra_ms
        rate = up.get("rate_mbit")
        out.append({"name": str(name), "rtt_s": rtt_ms / 1000,
                    "rate_mbit": float(rate) if rate is not None else None,
                    "default": name == default, "blackholed": st.get("blackholed"),
                    "middlebox": st.get("middlebox"), "carrier": st.get("carrier"),
                    "loss_pct": max(float(up.get("loss_pct") or 0), float(down.get("loss_pct") or 0))})
    return out
