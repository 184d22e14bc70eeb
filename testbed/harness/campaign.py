"""`invoke paper`: the paper's scenarios, run through the runner, then the report.

The full run uses the shipped scenario files as they are (>= 20 repetitions
per establishment cell); --quick replaces repetitions and trims grids so the
whole pipeline finishes in minutes while every figure and expectation row
still gets data. Results already stored are reused (the runner resumes).
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.harness import scenario as sc
from testbed.harness.results import run_status
from testbed.harness.runner import SweepSummary, sweep

ROOT = Path(__file__).resolve().parents[2]  # the repository root


@dataclass(frozen=True)
class PaperScenario:
    file: str
    quick: dict[str, Any] = field(default_factory=dict)  # top-level keys replaced in --quick


PAPER = [
    PaperScenario("experiments/robe-establishment.toml", {"repetitions": 2}),
    PaperScenario("experiments/failover.toml", {
        "repetitions": 1, "params": {"seconds": 9}}),
    PaperScenario("experiments/failover-mpprio.toml", {"repetitions": 1, "params": {"seconds": 9}}),
    PaperScenario("experiments/throughput.toml", {
        "repetitions": 1, "params": {"seconds": 6},
        "grid": {"topology.params.rates": [[10, 10], [15, 5], [10, 3]],
                 "topology.params.delays": [[0, 0], [25, 1]]}}),
]


def scenarios(quick: bool) -> list[sc.Scenario]:
    out = []
    for item in PAPER:
        path = ROOT / item.file
        data = tomllib.loads(path.read_text())
        if quick:
            data.update(item.quick)
        data["path"] = str(path)
        out.append(sc.validate(data, where=str(path)))
    return out


def run(out: Path, quick: bool, progress: bool = True,
        retry_failed: bool = False) -> list[tuple[str, SweepSummary]]:
    done = []
    for scenario in scenarios(quick):
        done.append((scenario.experiment,
                     sweep(scenario, out, retry_failed=retry_failed, progress=progress)))
    return done


def not_complete(out: Path, quick: bool) -> dict[str, int]:
    """Stored paper runs by status other than complete, counted over the whole
    store, not this invocation: a resumed run skips runs that failed before,
    and must not report success for them."""
    counts: dict[str, int] = {}
    for scenario in scenarios(quick):
        for spec in sc.expand(scenario):
            status = run_status(out, scenario.experiment, spec.run_id) or "missing"
            if status != "complete":
                counts[status] = counts.get(status, 0) + 1
    return counts
