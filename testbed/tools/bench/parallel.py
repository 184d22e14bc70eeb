"""Where parallel runs on this machine lose fidelity: the same sweep (a paper
scenario with its --quick overrides) with K = 1, 2, 3, 4 lanes at once, each
into a fresh store; per K: wall time, runs not complete, the calibration's worst
RTT deviation and rate ratio, the emulator's worst late fraction, and how far
each cell's metric moved from K = 1 (and, for establishment, whether its
outcome changed). Prints the table; docs/performance.md quotes it."""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.base.errors import TestbedError
from testbed.harness import campaign as cp
from testbed.harness.parallel import MAX_PARALLEL, lane_pool, sweep_in_lanes
from testbed.harness.runner import sweep

# The metric each experiment's cells are compared by (K vs K = 1), and
# establishment's verdict per run.
METRICS = {"establishment": "setup_s", "throughput": "goodput_mbit", "failover": "recovery_s",
           "fairness": "jain_index", "inactivity": "resume_s"}
SHOWN_SHIFT = 0.2  # cells whose metric moved more than this from K = 1 are listed


@dataclass
class Measured:
    """One sweep at one K, summarised."""

    k: int
    wall_s: float
    runs: int
    not_complete: dict[str, int]
    rtt_dev_ms: float | None  # worst |measured - configured| RTT over full calibrations
    rate_ratio_min: float | None  # worst goodput / configured over full calibrations
    late_fraction_max: float  # worst share of packets the emulator sent > 1 ms late
    cells: dict[str, list[Any]] = field(default_factory=dict)  # cell -> metric per repetition
    outcomes: dict[str, list[Any]] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    voided: int = 0  # attempts the testbed voided and the runner ran again (stored runs hide them)


def measure(store: Path, experiment: str, k: int, wall_s: float) -> Measured:
    """Summarise the runs of one sweep stored in `store`."""
    metric = METRICS.get(experiment)
    runs, bad, reasons, voided = 0, {}, [], 0
    rtt_dev, ratio, late = [], [], [0.0]
    cells: dict[str, list[Any]] = {}
    outcomes: dict[str, list[Any]] = {}
    for path in sorted((store / experiment).glob("*/manifest.json")):
        m = json.loads(path.read_text())
        runs += 1
        if m["status"] != "complete":
            bad[m["status"]] = bad.get(m["status"], 0) + 1
            reasons.append(f"{m['run_id']}: {m['reason']}")
        for attempt in m.get("voided_attempts") or []:
            voided += 1
            reasons.append(f"{m['run_id']} (voided, run again): {attempt.get('reason')}")
        emulation = m.get("emulation") or {}
        cal = emulation.get("calibration") or {}
        if cal.get("kind", "full") == "full":
            for entry in (cal.get("paths") or {}).values():
                if entry.get("rtt_mean_ms") is not None:
                    rtt_dev.append(abs(entry["rtt_mean_ms"] - entry["rtt_configured_ms"]))
                for d in ("rate_up", "rate_down"):
                    if isinstance(entry.get(d), dict) and "ratio" in entry[d]:
                        ratio.append(entry[d]["ratio"])
        for link in ((emulation.get("run") or {}).get("links") or {}).values():
            late += [d.get("late_fraction", 0.0) for d in link.values()]
        metrics = json.loads((path.parent / "metrics.json").read_text())
        cell = json.dumps(m["params"], sort_keys=True)
        cells.setdefault(cell, []).append(metrics.get(metric) if metric else None)
        outcomes.setdefault(cell, []).append(metrics.get("outcome"))
    return Measured(k=k, wall_s=wall_s, runs=runs, not_complete=bad,
                    rtt_dev_ms=max(rtt_dev) if rtt_dev else None,
                    rate_ratio_min=min(ratio) if ratio else None, late_fraction_max=max(late),
                    cells=cells, outcomes=outcomes, reasons=reasons, voided=voided)


def _median(values: list[Any]) -> float | None:
    nums = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(nums) if nums else None


def shift(base: Measured, other: Measured) -> tuple[float | None, float | None, int, list[str]]:
    """(median, largest) relative shift of the cells' median metric from K = 1,
    how many cells' outcomes differ (establishment's verdict per run), and the
    cells that differ or whose metric moved by more than SHOWN_SHIFT, as lines."""
    rel, lines, changed = [], [], 0
    for cell, values in base.cells.items():
        a, b = _median(values), _median(other.cells.get(cell, []))
        moved = None
        if a is not None and b is not None and a:
            moved = abs(b - a) / abs(a)
            rel.append(moved)
        outcome_a = sorted(map(str, base.outcomes[cell]))
        outcome_b = sorted(map(str, other.outcomes.get(cell, [])))
        changed += outcome_a != outcome_b
        if outcome_a != outcome_b or (moved is not None and moved > SHOWN_SHIFT):
            lines.append(f"K={other.k} {cell}: {base.cells[cell]} {outcome_a} -> "
                         f"{other.cells.get(cell)} {outcome_b}")
    return (statistics.median(rel) if rel else None, max(rel) if rel else None, changed, lines)


def run_benchmark(experiment: str = "establishment", ks: tuple[int, ...] = (1, 2, 3, 4),
                  reps: int | None = None, file: str | None = None) -> str:
    """Sweep the paper's quick scenario of `experiment` (its first scenario
    file, or `file`) at each K; the table as text."""
    campaign = cp.load(cp.PAPER)
    matches = [s for entry, s in campaign.entries(quick=True)
               if s.experiment == experiment and (file is None or entry.file == file)]
    if not matches:
        which = f"scenario file {file!r} of experiment {experiment!r}" if file else \
            f"scenario of experiment {experiment!r}"
        raise TestbedError(f"no {which} in {cp.PAPER.name}")
    scenario = matches[0]
    if reps is not None:
        scenario = scenario.model_copy(update={"repetitions": reps})
    results: list[Measured] = []
    with tempfile.TemporaryDirectory(prefix="mptb-bench-par-") as tmp, lane_pool(max(ks)) as pool:
        for i, k in enumerate(ks):  # K = 1 twice: the second shows the serial noise
            store = Path(tmp) / f"{i}-k{k}"
            t0 = time.monotonic()
            if k == 1:
                sweep(scenario, store, progress=False)
            else:
                sweep_in_lanes(pool, scenario, store, k, progress=False)
            results.append(measure(store, experiment, k, time.monotonic() - t0))
    base = results[0]
    metric = METRICS.get(experiment, "-")
    lines = [f"{experiment}: paper --quick scenario, {base.runs} runs per K, metric {metric} "
             f"(max K allowed: {MAX_PARALLEL})",
             f"{'K':>2} {'wall s':>7} {'speed-up':>8} {'not complete':>14} {'voided':>6} {'RTT dev ms':>10} "
             f"{'rate min':>8} {'late max':>9} {'shift med':>9} {'shift max':>9} {'outcomes':>8}"]
    details = []
    for r in results:
        med, top, changed, cells = shift(base, r)
        details += cells
        bad = ",".join(f"{n} {s}" for s, n in r.not_complete.items()) or "0"
        fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
        lines.append(f"{r.k:>2} {r.wall_s:7.1f} {base.wall_s / r.wall_s:7.2f}x {bad:>14} {r.voided:>6} "
                     f"{fmt(r.rtt_dev_ms, '10.2f'):>10} {fmt(r.rate_ratio_min, '8.3f'):>8} "
                     f"{r.late_fraction_max:9.2%} {fmt(med, '9.1%'):>9} {fmt(top, '9.1%'):>9} "
                     f"{changed:>8}")
    for r in results:
        for reason in r.reasons:
            lines.append(f"  K={r.k} {reason}")
    lines += ["cells that moved (metric per repetition, outcomes):"] + [f"  {d}" for d in details]
    return "\n".join(lines)
