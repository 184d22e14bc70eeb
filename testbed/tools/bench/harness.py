"""Where a sweep's time goes: the per-phase breakdown of the runs in a results
store (a paper run's), from the `phases` every manifest records, with each
experiment's per-run overhead (wall time minus workload) against its target."""
from __future__ import annotations

import statistics
from pathlib import Path

from testbed.harness.schema import PHASES

# Per-run overhead targets (seconds): runs without calibration (establishment
# and other latency-bound runs) and calibrated runs.
TARGET_UNCALIBRATED_S = 0.3
TARGET_CALIBRATED_S = 1.0


def breakdown(store: Path) -> tuple[str, bool]:
    """The table of median seconds per phase and experiment, and whether every
    experiment's mean overhead (full calibrations and builds amortised over the
    runs that reused them) meets its target."""
    from analysis import load

    result = load(store)
    groups: dict[tuple[str, bool], list[dict[str, float]]] = {}
    for (experiment, _run_id), manifest in result.manifests.items():
        phases = manifest.get("phases")
        if not phases:  # stored by code that did not time phases
            continue
        calibrated = bool((manifest.get("scenario") or {}).get("calibrate", False))
        groups.setdefault((experiment, calibrated), []).append(phases)
    if not groups:
        return f"{store}: no run with recorded phases", False
    head = f"{'experiment':<22} {'runs':>4} " + " ".join(f"{p[:9]:>9}" for p in PHASES) \
        + f" {'overhead':>9} {'mean':>7} {'target':>7}  verdict (on the mean)"
    lines = ["median seconds per run", head]
    ok = True
    for (experiment, calibrated), runs in sorted(groups.items()):
        med = {p: statistics.median(r.get(p, 0.0) for r in runs) for p in PHASES}
        overheads = [sum(v for k, v in r.items() if k != "workload") for r in runs]
        overhead, mean = statistics.median(overheads), statistics.fmean(overheads)
        target = TARGET_CALIBRATED_S if calibrated else TARGET_UNCALIBRATED_S
        meets = mean <= target
        ok &= meets
        name = experiment + (" (cal.)" if calibrated else "")
        lines.append(f"{name:<22} {len(runs):>4} " + " ".join(f"{med[p]:9.3f}" for p in PHASES)
                     + f" {overhead:9.3f} {mean:7.3f} {target:7.1f}  "
                     + ("meets target" if meets else "MISSES target"))
    total = sum(sum(r.values()) for runs in groups.values() for r in runs)
    work = sum(r.get("workload", 0.0) for runs in groups.values() for r in runs)
    lines.append(f"all runs: {total:.0f} s, of which workload {work:.0f} s "
                 f"({100 * work / total if total else 0:.0f} %)")
    return "\n".join(lines), ok


def estimate_full(store: Path, campaign_file: Path | None = None, lanes: int = 6) -> str:
    """An estimate (not a measurement) of the full campaign's wall time from a
    quick run's store: per run, the scenario's mean overhead and the part of
    its workload that is not the transfer (both measured in `store`, per
    scenario file, else per experiment), plus the full scenario's
    `params.seconds` (or, without it, the measured workload); runs divided
    over their lanes, grouped as `./tb paper` runs them (harness.parallel):
    in campaign order, or, when some may run beside the one-at-a-time chain,
    those alone first, then the chain with the overlapping ones beside it."""
    from analysis import load
    from testbed.harness import campaign as cp
    from testbed.harness.parallel import beside_rooms, lanes_for
    from testbed.harness.scenario import expand

    per: dict[str, list[tuple[float, float]]] = {}  # file or experiment: (overhead, workload - seconds)
    for (experiment, _run_id), m in load(store).manifests.items():
        phases = m.get("phases")
        if not phases:
            continue
        scenario = m.get("scenario") or {}
        seconds = scenario.get("params", {}).get("seconds") or 0.0
        sample = (sum(v for k, v in phases.items() if k != "workload"),
                  phases.get("workload", 0.0) - seconds)
        for key in {Path(scenario.get("path") or experiment).name, experiment}:
            per.setdefault(key, []).append(sample)
    totals = {"alone": 0.0, "chain": 0.0, "beside": 0.0}
    lines = [f"full campaign estimated from {store} (an estimate, not a measurement):",
             f"{'scenario':<28} {'runs':>5} {'s/run':>7} {'lanes':>5} {'total s':>8}  group"]
    missing = []
    campaign = cp.load(campaign_file or cp.PAPER)
    entries = campaign.entries(False)
    rooms = beside_rooms([s for _, s in entries], lanes)  # grouped as parallel_sweep groups
    for entry, scenario in entries:
        runs = len(expand(scenario))
        seen = per.get(entry.file) or per.get(scenario.experiment)
        if not seen:
            missing.append(f"{entry.file} ({runs} runs)")
            continue
        seconds = float(scenario.params.get("seconds", 0.0) or 0.0)
        each = statistics.fmean(o for o, _ in seen) + statistics.fmean(w for _, w in seen) + seconds
        room, n = rooms[id(scenario)], lanes_for(scenario, lanes)
        group = "beside" if room else ("chain" if n == 1 and any(rooms.values()) else "alone")
        n = max(1, min(n, room, lanes - 1)) if room else n
        totals[group] += runs * each / n
        lines.append(f"{entry.file:<28} {runs:>5} {each:7.2f} {n:>5} {runs * each / n:8.0f}  {group}")
    wall = totals["alone"] + max(totals["chain"], totals["beside"])
    if any(rooms.values()):
        lines.append(f"alone {totals['alone'] / 60:.1f} min, then one at a time {totals['chain'] / 60:.1f} "
                     f"min with {totals['beside'] / 60:.1f} min beside: about {wall / 60:.1f} min plus the report")
    else:
        lines.append(f"in campaign order, each at its lanes: about {wall / 60:.1f} min plus the report")
    if missing:
        lines.append("not in the store, not estimated: " + ", ".join(missing))
    return "\n".join(lines)
