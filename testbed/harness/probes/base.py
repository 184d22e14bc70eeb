"""Probes: observers started before the workload and stopped after it.

    probe = probes.get("subflows", interval_ms=50)
    probe.start(tb, run_dir, t0_ns); ...workload...; probe.stop()
    probe.tables()   # {"subflows": DataFrame}, columns/dtypes of docs/results.md
    probe.problems() # what it missed (the run is then invalid), [] when complete
    probe.summary()  # small dict for the manifest; probe.metrics() flat scalars

A new probe is one small module in testbed/harness/probes/ with a @register class.
`frame()` builds a table with exactly the documented columns and dtypes; the
workloads use it too.
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from testbed.base.registry import Parametrized, Registry
from testbed.base.strict import Strict
from testbed.harness.schema import TABLES


# The store's tables (docs/results.md), without the experiment/run_id keys the reader adds.
SCHEMAS = TABLES


def frame(table: str, rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """rows -> DataFrame with the documented columns (in order) and dtypes."""
    schema = SCHEMAS[table]
    rows = list(rows)
    data = {c: pd.Series([r.get(c) for r in rows], dtype="object") for c in schema}
    out = pd.DataFrame(data)
    for col, dtype in schema.items():
        if dtype == "Int64":
            # via Python ints: a float detour would round values above 2**53
            out[col] = pd.array([_int_or_na(v) for v in out[col]], dtype="Int64")
        elif dtype == "float64":
            out[col] = pd.to_numeric(out[col], errors="coerce").astype("float64")
        elif dtype == "boolean":
            out[col] = out[col].astype("boolean")
        else:
            out[col] = out[col].astype("string")
    return out


def _int_or_na(v: Any) -> int | None:
    if v is None or v is pd.NA or (isinstance(v, float) and v != v):
        return None
    return int(v)


def concat(frames: Iterable[pd.DataFrame], table: str) -> pd.DataFrame:
    """Concatenate a table's frames (an empty frame of the table when none)."""
    frames = [f for f in frames if not f.empty]
    if not frames:
        return frame(table, [])
    return pd.concat(frames, ignore_index=True).sort_values("t", kind="stable", ignore_index=True)


def rel_s(ns: int | None, t0_ns: int) -> float | None:
    """Monotonic ns -> seconds since t0 (the tables' clock)."""
    return None if ns is None else (ns - t0_ns) / 1e9


ProbeParams = Strict


class Probe(Parametrized, abc.ABC):
    """A measurement running alongside a run: started before the workload, stopped after it."""
    kind = "probe"

    @abc.abstractmethod
    def start(self, tb: Any, run_dir: Path, t0_ns: int) -> None:
        """Begin observing; t0_ns is the run's clock origin (may precede the workload).
        Returns only once the probe records (raises TestbedError if it cannot)."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop observing; idempotent, and must not raise for a probe that never started."""

    def tables(self) -> dict[str, pd.DataFrame]:
        """The probe's tables for the results store (none by default)."""
        return {}

    def summary(self) -> dict[str, Any]:
        """A JSON-able summary for the manifest (empty by default)."""
        return {}

    def metrics(self) -> dict[str, float | int | str | bool | None]:
        """Flat scalars for metrics.json (names prefixed by host where relevant)."""
        return {}

    def problems(self) -> list[str]:
        """What the probe missed after stop(), each naming the measured value and
        the bound it broke; the runner stores a run with any as `invalid`."""
        return []


PROBES: Registry[Probe] = Registry("probe", "testbed.harness.probes", skip={"base"})
register, get, available = PROBES.register, PROBES.get, PROBES.available
