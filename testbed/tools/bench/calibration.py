"""How stable a kept testbed's calibration is, and how often it should be redone:
consecutive full calibrations of one testbed (their spread) and many drift
checks against the last of them (how long each takes, how far the RTT strays,
how many would void a run on a testbed nothing changed), with the per-run
calibration overhead that `calibrate_every` = N gives, against the 1 s target."""
from __future__ import annotations

import statistics
from typing import Any

from testbed.tools.bench.harness import TARGET_CALIBRATED_S

EVERY_CANDIDATES = (1, 5, 10, 20)


def run(calibrations: int, checks: int, topology: str = "two-path",
        params: dict[str, Any] | None = None) -> tuple[str, bool]:
    """Measure on one testbed of `topology`; the report and whether the drift
    check voided no run and every full calibration passed."""
    from testbed.core.emulation.calibrate import calibrate
    from testbed.core.emulation.drift import drift_check
    from testbed.core.net import Testbed
    from testbed.core.topology import load

    params = params if params is not None else {"rate_mbit": 20, "wifi_delay_ms": 10,
                                                "lte_delay_ms": 20}
    lines = [f"{topology} {params}"]
    with Testbed(load(topology, **params)) as tb:
        cals = [calibrate(tb) for _ in range(max(1, calibrations))]
        valid = [c for c in cals if c["valid"]]
        lines.append(f"full calibrations: {len(cals)}, valid {len(valid)}, median "
                     f"{statistics.median(c['duration_s'] for c in cals):.2f} s each")
        for c in cals:
            if not c["valid"]:
                lines.append(f"  invalid: {c['reason']}")
        for name in cals[0]["paths"]:
            rtts = [c["paths"][name]["rtt_mean_ms"] for c in cals]
            ratios = [c["paths"][name].get("rate_up", {}).get("ratio") for c in cals]
            ratios = [r for r in ratios if r is not None]
            lines.append(f"  {name}: RTT {min(rtts):.3f}-{max(rtts):.3f} ms"
                         + (f", goodput/rate {min(ratios):.3f}-{max(ratios):.3f}" if ratios else ""))
        if not valid:
            return "\n".join(lines + ["no valid calibration: no drift check measured"]), False
        ref = valid[-1]
        results = [drift_check(tb, ref) for _ in range(checks)]
    voided = [r for r in results if not r["valid"]]
    took = sorted(r["duration_s"] for r in results) or [0.0]
    lines.append(f"drift checks: {len(results)}, voided {len(voided)}, median {statistics.median(took):.3f} s, "
                 f"max {took[-1]:.3f} s")
    for r in voided[:5]:
        lines.append(f"  voided: {r['reason']}")
    for name in ref["paths"]:
        offs = [abs(r["paths"][name]["rtt_mean_ms"] - r["paths"][name]["rtt_calibrated_ms"])
                for r in results if r["paths"][name]["samples"]]
        if offs:
            lines.append(f"  {name}: |RTT - calibrated| median {statistics.median(offs):.3f} ms, "
                         f"max {max(offs):.3f} ms, bound {ref['paths'][name]['rtt_tolerance_ms']:.2f} ms")
    full_s = statistics.median(c["duration_s"] for c in cals)
    check_s = statistics.median(took)
    lines.append(f"calibration time per run with calibrate_every = N (target for the whole "
                 f"overhead: {TARGET_CALIBRATED_S:g} s):")
    for n in EVERY_CANDIDATES:
        lines.append(f"  N = {n:>2}: {(full_s + (n - 1) * check_s) / n:.3f} s")
    return "\n".join(lines), not voided and len(valid) == len(cals)
