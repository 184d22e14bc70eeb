"""Load a results store (docs/results.md) into tidy pandas tables.

    from analysis import load
    res = load("results")           # or results/<experiment>, or one run directory
    res.runs                        # one row per run: param.* and metric.* columns
    res.events, res.timeseries, res.subflows, res.packets

Every table carries `experiment` and `run_id`. Columns and dtypes follow the
documented schema even when a table is absent from every run (an empty frame with
the right columns), so analysis code never has to special-case missing data.
Unreadable files do not abort the load: they are listed in `Results.problems`.
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
    root: Path
    runs: pd.DataFrame
    events: pd.DataFrame
    timeseries: pd.DataFrame
    subflows: pd.DataFrame
    packets: pd.DataFrame
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
    """The run's parameters: the experiment's own (scenario `params`, grid point
    applied) plus every grid key. Grid keys are dotted scenario paths; the
    experiment's own `params.` prefix is dropped so `params.strategy` becomes
    `param.strategy`, while `topology.params.rates` keeps its full name."""
    scenario = man.get("scenario") if isinstance(man.get("scenario"), dict) else {}
    out = flatten(scenario.get("params") or {})
    for k, v in (man.get("params") or {}).items():
        key = k.removeprefix("params.")
        out[key] = v
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
        # .tmp-* is a run still being written; raw/ holds tool output, never a run
        if any(p.startswith(".tmp-") or p == "raw" for p in rel):
            continue
        found.append(m.parent)
    return found


def load(results_dir: str | Path) -> Results:
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


def _find_topology(obj: Any, depth: int = 0) -> dict[str, Any] | None:
    """The first dict below obj holding a `paths` list of named dicts (a dumped TopologySpec)."""
    if depth > 4 or not isinstance(obj, dict):
        return None
    p = obj.get("paths")
    link_keys = {"delay_ms", "rate_mbit", "rtt_ms"}
    # testbed.paths lists addresses only; the topology's paths carry the link settings
    if isinstance(p, list) and p and all(isinstance(x, dict) and "name" in x and link_keys & set(x)
                                         for x in p):
        return obj
    if isinstance(obj.get("topology"), dict):
        found = _find_topology(obj["topology"], depth + 1)
        if found is not None:
            return found
    for v in obj.values():
        found = _find_topology(v, depth + 1)
        if found is not None:
            return found
    return None


def paths(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's paths as configured: name, rtt_s, rate_mbit, default (bool).

    RTT = up + down one-way delay (per-direction overrides applied) + the shared
    bottleneck's delay both ways; what the emulation was asked for, not measured.
    Looks in `testbed` first (what was built), then in `scenario`.
    """
    topo = _find_topology(manifest.get("testbed")) or _find_topology(manifest.get("scenario"))
    if topo is None:
        return []
    bott = topo.get("bottleneck") if isinstance(topo.get("bottleneck"), dict) else {}
    extra_ms = 2 * float(bott.get("delay_ms") or 0)
    default = topo.get("default_path") or topo["paths"][0]["name"]
    out = []
    for p in topo["paths"]:
        def one_way(direction: str) -> float:
            o = p.get(direction) if isinstance(p.get(direction), dict) else {}
            v = o.get("delay_ms")
            return float(v if v is not None else p.get("delay_ms") or 0)
        rtt_ms = float(p["rtt_ms"]) if p.get("rtt_ms") is not None else one_way("up") + one_way("down")
        out.append({"name": str(p["name"]), "rtt_s": (rtt_ms + extra_ms) / 1000,
                    "rate_mbit": float(p["rate_mbit"]) if p.get("rate_mbit") is not None else None,
                    "default": p["name"] == default})
    return out
