"""Probes: observers started before the workload and stopped after it.

    probe = probes.get("subflows", interval_ms=50)
    probe.start(tb, run_dir, t0_ns); ...workload...; probe.stop()
    probe.tables()   # {"subflows": DataFrame}, columns/dtypes of docs/results.md
    probe.summary()  # small dict for the manifest; probe.metrics() flat scalars

A new probe is one small module in testbed/probes/ with a @register class.
`frame()` builds a table with exactly the documented columns and dtypes; the
workloads use it too.
"""
from __future__ import annotations

import abc
import importlib
import pkgutil
from pathlib import Path
from typing import Any, ClassVar, Iterable

import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError

from testbed.errors import TestbedError, format_validation_error

# docs/results.md, without the experiment/run_id keys the store adds.
SCHEMAS: dict[str, dict[str, str]] = {
    "events": {"t": "float64", "source": "string", "host": "string", "event": "string",
               "token": "Int64", "detail": "string"},
    "timeseries": {"t": "float64", "host": "string", "series": "string", "key": "string",
                   "value": "float64"},
    "subflows": {"t": "float64", "host": "string", "subflow": "string", "path": "string",
                 "cwnd": "Int64", "srtt_us": "Int64", "bytes_acked": "Int64",
                 "bytes_received": "Int64", "retrans": "Int64", "state": "string"},
    "packets": {"t": "float64", "path": "string", "src": "string", "dst": "string",
                "sport": "Int64", "dport": "Int64", "flags": "string", "subtype": "Int64",
                "token": "Int64", "dsn": "Int64", "data_ack": "Int64", "addr_id": "Int64",
                "mp_flags": "string"},
}


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
        else:
            out[col] = out[col].astype("string")
    return out


def _int_or_na(v: Any) -> int | None:
    if v is None or v is pd.NA or (isinstance(v, float) and v != v):
        return None
    return int(v)


def concat(frames: Iterable[pd.DataFrame], table: str) -> pd.DataFrame:
    frames = [f for f in frames if not f.empty]
    if not frames:
        return frame(table, [])
    return pd.concat(frames, ignore_index=True).sort_values("t", kind="stable", ignore_index=True)


def rel_s(ns: int | None, t0_ns: int) -> float | None:
    """Monotonic ns -> seconds since t0 (the tables' clock)."""
    return None if ns is None else (ns - t0_ns) / 1e9


class ProbeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Probe(abc.ABC):
    name: ClassVar[str]
    description: ClassVar[str] = ""
    Params: ClassVar[type[ProbeParams]] = ProbeParams

    def __init__(self, **params: Any):
        try:
            self.params = self.Params(**params)
        except ValidationError as exc:
            raise TestbedError(format_validation_error(f"probe {self.name!r}", exc)) from None

    @abc.abstractmethod
    def start(self, tb: Any, run_dir: Path, t0_ns: int) -> None:
        """Begin observing; t0_ns is the run's clock origin (may precede the workload)."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop observing; idempotent, and must not raise for a probe that never started."""

    def tables(self) -> dict[str, pd.DataFrame]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {}

    def metrics(self) -> dict[str, float | int | str | bool | None]:
        """Flat scalars for metrics.json (names prefixed by host where relevant)."""
        return {}


_REGISTRY: dict[str, type[Probe]] = {}


def register(cls: type[Probe]) -> type[Probe]:
    if not getattr(cls, "name", ""):
        raise TypeError(f"{cls.__name__} needs a name")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    import testbed.probes as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name != "base":
            importlib.import_module(f"testbed.probes.{mod.name}")


def available() -> dict[str, str]:
    _discover()
    return {n: c.description for n, c in sorted(_REGISTRY.items())}


def get(name: str, **params: Any) -> Probe:
    """A new probe instance by name, with validated parameters."""
    _discover()
    if name not in _REGISTRY:
        raise TestbedError(f"unknown probe {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name](**params)
