"""Workloads: drive traffic through a built Testbed and report what happened.

    wl = workload.get("app", mode="bulk", direction="down", bytes=10_000_000)
    res = wl.run(tb, run_dir, t0_ns=time.monotonic_ns(), timeout_s=60)
    res.metrics, res.tables["events"], res.raw_files

Parameters are pydantic models with unknown keys forbidden, so a typo in a
scenario file is a one-line TestbedError naming the key. Raw tool outputs go
to run_dir/"raw" and are listed in raw_files.
"""
from __future__ import annotations

import abc
import importlib
import pkgutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError

from testbed.errors import TestbedError, format_validation_error

Scalar = float | int | str | bool | None


@dataclass
class WorkloadResult:
    metrics: dict[str, Scalar]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    raw_files: list[Path] = field(default_factory=list)


class WorkloadParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Workload(abc.ABC):
    name: ClassVar[str]
    description: ClassVar[str] = ""
    Params: ClassVar[type[WorkloadParams]] = WorkloadParams

    def __init__(self, **params: Any):
        try:
            self.params = self.Params(**params)
        except ValidationError as exc:
            raise TestbedError(format_validation_error(f"workload {self.name!r}", exc)) from None

    @abc.abstractmethod
    def run(self, tb: Any, run_dir: Path, t0_ns: int, timeout_s: float) -> WorkloadResult:
        """Run to completion (or raise TestbedError after timeout_s, processes killed)."""


def raw_dir(run_dir: Path) -> Path:
    d = Path(run_dir) / "raw"
    d.mkdir(parents=True, exist_ok=True)
    return d


def wait_procs(procs: dict[str, subprocess.Popen], timeout_s: float, what: str) -> None:
    """Wait for all; on timeout kill exactly these processes and raise."""
    deadline = time.monotonic() + timeout_s
    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
            for p in procs.values():
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            raise TestbedError(f"{what}: {name} still running after {timeout_s:g} s (killed)") from None


_REGISTRY: dict[str, type[Workload]] = {}


def register(cls: type[Workload]) -> type[Workload]:
    if not getattr(cls, "name", ""):
        raise TypeError(f"{cls.__name__} needs a name")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    import testbed.workload as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in ("base", "app"):  # app.py is the program, not a workload
            importlib.import_module(f"testbed.workload.{mod.name}")


def available() -> dict[str, str]:
    _discover()
    return {n: c.description for n, c in sorted(_REGISTRY.items())}


def get(name: str, **params: Any) -> Workload:
    """A new workload instance by name, with validated parameters."""
    _discover()
    if name not in _REGISTRY:
        raise TestbedError(f"unknown workload {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name](**params)
