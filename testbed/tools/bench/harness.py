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
