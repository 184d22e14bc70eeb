"""Experiment types, registered by name: a new one is one small module in
experiments/ plus a scenario file.

    @register
    class Throughput(Experiment):
        name = "throughput"
        class Params(ExperimentParams):
            seconds: float = 10
        def run(self, ctx: RunContext) -> RunOutput: ...
"""
from __future__ import annotations

import abc
import importlib
import pkgutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError

from testbed.errors import TestbedError, format_validation_error


class ExperimentParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class RunOutput:
    metrics: dict[str, Any]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    status: str = "complete"  # an experiment may judge its own run "invalid"
    reason: str = ""


@dataclass
class RunContext:
    tb: Any  # testbed.net.Testbed
    spec: Any  # testbed.scenario.RunSpec
    params: Any  # the experiment's validated Params
    raw_dir: Path
    t0_ns: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    probe_summaries: dict[str, Any] = field(default_factory=dict)

    def start_clock(self) -> int:
        """Mark the workload start: t = 0 of every table of this run."""
        self.t0_ns = time.monotonic_ns()
        return self.t0_ns

    def t(self, ns: int | None = None) -> float:
        return ((ns if ns is not None else time.monotonic_ns()) - self.t0_ns) / 1e9

    def record(self, source: str, host: str, event: str, token: int | None = None,
               ns: int | None = None, **detail: Any) -> None:
        self.events.append({"t_ns": ns or time.monotonic_ns(), "source": source, "host": host,
                            "event": event, "token": token, "detail": detail})


class Experiment(abc.ABC):
    name: ClassVar[str]
    description: ClassVar[str] = ""
    Params: ClassVar[type[ExperimentParams]] = ExperimentParams

    @classmethod
    def validate_params(cls, params: dict[str, Any]) -> ExperimentParams:
        try:
            return cls.Params(**params)
        except ValidationError as exc:
            raise TestbedError(format_validation_error(f"experiment {cls.name!r} params", exc)) from None

    @abc.abstractmethod
    def run(self, ctx: RunContext) -> RunOutput:
        """Drive the workload on ctx.tb (already built, probes running)."""


_REGISTRY: dict[str, type[Experiment]] = {}


def register(cls: type[Experiment]) -> type[Experiment]:
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    import experiments

    for mod in pkgutil.iter_modules(experiments.__path__):
        importlib.import_module(f"experiments.{mod.name}")


def get(name: str) -> type[Experiment]:
    _discover()
    if name not in _REGISTRY:
        raise TestbedError(f"unknown experiment type {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def available() -> dict[str, str]:
    _discover()
    return {n: c.description for n, c in sorted(_REGISTRY.items())}
