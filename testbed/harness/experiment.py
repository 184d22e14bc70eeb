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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from testbed.base.registry import Parametrized, Registry
from testbed.base.strict import Strict

if TYPE_CHECKING:  # only for the annotations: importing Testbed pulls in Mininet
    from testbed.core.model import TopologySpec
    from testbed.core.net import Testbed
    from testbed.harness.scenario import RunSpec


ExperimentParams = Strict


@dataclass
class RunOutput:
    """An experiment's result: metrics, tables, and its own verdict on the run."""

    metrics: dict[str, Any]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    status: str = "complete"  # an experiment may judge its own run "invalid"
    reason: str = ""
    # What the run's protocol endpoints chose where a standard or draft leaves it
    # open (experimental option codes, hash and CRC choices, option lengths): the
    # runner stores it as the manifest's `protocol`, so every run names its choices.
    protocol: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunContext:
    """What an experiment's run() gets: the built testbed, its run, and where to write."""

    tb: Testbed
    spec: RunSpec
    params: Any  # the experiment's validated Params (each type has its own class)
    raw_dir: Path
    t0_ns: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    probe_summaries: dict[str, Any] = field(default_factory=dict)

    def start_clock(self) -> int:
        """Mark the workload start: t = 0 of every table of this run."""
        self.t0_ns = time.monotonic_ns()
        return self.t0_ns

    def t(self, ns: int | None = None) -> float:
        """Seconds since the run's clock origin (now, or at monotonic ns)."""
        return ((ns if ns is not None else time.monotonic_ns()) - self.t0_ns) / 1e9

    def record(self, source: str, host: str, event: str, token: int | None = None,
               ns: int | None = None, **detail: Any) -> None:
        """Add an event to the run's event log."""
        self.events.append({"t_ns": ns or time.monotonic_ns(), "source": source, "host": host,
                            "event": event, "token": token, "detail": detail})


class Experiment(Parametrized, abc.ABC):
    """An experiment type: run() does one run on a built testbed and returns its output."""
    kind = "experiment"
    # How many runs of this type may run at once on one machine (`--parallel K`
    # gives it min(K, max_parallel) lanes): measured per experiment by
    # `./tb bench.parallel`, see docs/performance.md. 1: one at a time.
    max_parallel: int = 1
    # How many of its runs may run at once beside the campaign's one-at-a-time
    # (bulk) experiments, in `./tb paper --parallel K` (K > 1); 0: not beside
    # them. Measured by comparing a campaign's runs and verdicts with and
    # without (docs/performance.md).
    overlap_lanes: int = 0

    @classmethod
    def overlap_lanes_for(cls, params: dict[str, Any]) -> int:
        """overlap_lanes for a run with these (scenario) params; an experiment
        whose runs differ in load narrows it per run."""
        return cls.overlap_lanes

    @classmethod
    def max_parallel_for(cls, params: dict[str, Any]) -> int:
        """max_parallel for a run with these (scenario) params; an experiment whose
        runs differ in load narrows it per run."""
        return cls.max_parallel

    @classmethod
    def check_topology(cls, params: Any, topology: "TopologySpec") -> None:
        """Refuse (TestbedError, one line naming the key and the bound) params this
        topology cannot serve; called at load for every grid point, before anything
        is built. params: the validated Params. Default: everything fits."""

    @abc.abstractmethod
    def run(self, ctx: RunContext) -> RunOutput:
        """Drive the workload on ctx.tb (already built, probes running)."""


EXPERIMENTS: Registry[Experiment] = Registry("experiment type", "experiments")
register, available = EXPERIMENTS.register, EXPERIMENTS.available


def experiment_class(name: str) -> type[Experiment]:
    """The experiment class registered under name."""
    return EXPERIMENTS.cls(name)
