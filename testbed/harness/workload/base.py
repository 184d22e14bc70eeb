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
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from testbed.base.errors import TestbedError
from testbed.base.registry import Parametrized, Registry
from testbed.base.strict import Strict

Scalar = float | int | str | bool | None


@dataclass
class WorkloadResult:
    """A workload's metrics, tables and raw files."""
    metrics: dict[str, Scalar]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    raw_files: list[Path] = field(default_factory=list)


WorkloadParams = Strict


class Workload(Parametrized, abc.ABC):
    """Traffic for a run: started on a built testbed, waited for, its result collected."""
    kind = "workload"

    @abc.abstractmethod
    def run(self, tb: Any, run_dir: Path, t0_ns: int, timeout_s: float) -> WorkloadResult:
        """Run to completion (or raise TestbedError after timeout_s, processes killed)."""


def raw_dir(run_dir: Path) -> Path:
    """The run's raw-output directory (created)."""
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


# app.py is the program run in the namespaces, not a workload class.
WORKLOADS: Registry[Workload] = Registry("workload", "testbed.harness.workload", skip={"base", "app"})
register, get, available = WORKLOADS.register, WORKLOADS.get, WORKLOADS.available
