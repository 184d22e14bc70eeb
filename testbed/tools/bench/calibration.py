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


def spread(kind: str, cals: list[dict[str, Any]]) -> list[str]:
    """Lines on calibrations of one testbed: how many passed, their time, and per
    path the range of mean RTTs, pings sent and goodput/rate ratios."""
    took = [c["duration_s"] for c in cals]
    lines = [f"{kind}: {sum(c['valid'] for c in cals)} of {len(cals)} valid, "
             f"{statistics.median(took):.2f} s median ({min(took):.2f}-{max(took):.2f})"]
    lines += [f"  invalid: {c['reason']}" for c in cals if not c["valid"]]
    for name, first in cals[0]["paths"].items():
        rtts = [c["paths"][name]["rtt_mean_ms"] for c in cals]
        pings = [c["paths"][name]["pings"] for c in cals]
        ratios = [r for c in cals for d in ("rate_up", "rate_down")
                  if (r := c["paths"][name].get(d, {}).get("ratio")) is not None]
        lines.append(f"  {name}: RTT {min(rtts):.3f}-{max(rtts):.3f} ms (configured "
                     f"{first['rtt_configured_ms']:g}, bound +-{first['rtt_tolerance_ms']:.2f}), "
                     f"pings {min(pings)}-{max(pings)}"
                     + (f", goodput/rate {min(ratios):.3f}-{max(ratios):.3f}" if ratios else ""))
    return lines


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
        lines += spread("full calibrations", cals)
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


def compare(reps: int, topology: str = "two-path", params: dict[str, Any] | None = None) -> tuple[str, bool]:
    """The quick calibration against the reference one (one path at a time, 50
    pings 10 ms apart, 2 s flows) on one testbed of `topology`: `reps` of each,
    interleaved (time, RTT and rate spread per path), then a delay fault (one
    link's uplink 1.5 tolerances slower than its record says) and last a rate
    fault (its rate 0.8 of the record), each calibrated both ways. The report,
    and whether both passed the honest testbed every time and both failed each fault."""
    from testbed.core.emulation.calibrate import calibrate
    from testbed.core.net import Testbed
    from testbed.core.topology import load

    params = params if params is not None else {"rate_mbit": 20, "wifi_delay_ms": 10,
                                                "lte_delay_ms": 20}
    lines = [f"{topology} {params}: quick vs reference calibration, {reps} each"]
    ok = True
    with Testbed(load(topology, **params)) as tb:
        runs: dict[str, list[dict[str, Any]]] = {"quick": [], "reference": []}
        for _ in range(max(1, reps)):
            runs["reference"].append(calibrate(tb, quick=False))
            runs["quick"].append(calibrate(tb))
        for kind, cals in runs.items():
            ok &= all(c["valid"] for c in cals)
            lines += spread(kind, cals)
        link = tb.links[0]
        tol = runs["reference"][0]["paths"][tb.paths[0].name]["rtt_tolerance_ms"]
        record = link.up
        faults = [("delay", record.model_copy(update={"delay_ms": record.delay_ms + 1.5 * tol})),
                  ("rate", record.model_copy(update={"rate_mbit": 0.8 * (record.rate_mbit or 20)}))]
        for what, wrong in faults:
            tb.backend.update(link, "up", wrong)  # the emulator now differs from the record
            for kind, quick in (("reference", False), ("quick", True)):
                c = calibrate(tb, quick=quick)
                ok &= not c["valid"]
                lines.append(f"{what} fault on {link.name} up ({what} {getattr(wrong, what + '_ms', None) or wrong.rate_mbit:g} "
                             f"vs record {getattr(record, what + '_ms', None) or record.rate_mbit:g}): {kind} "
                             + (f"caught it in {c['duration_s']:.2f} s: {c['reason']}" if not c["valid"]
                                else "MISSED it"))
            if what == "delay":  # the forwarder takes the record back (the rate fault is last)
                tb.backend.update(link, "up", record)
    return "\n".join(lines), ok
