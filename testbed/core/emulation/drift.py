"""Between two full calibrations of a reused testbed: the cheap per-run check.

    check = drift_check(tb, reference)   # reference: the last valid calibrate(tb)
    if not check["valid"]:
        print("run INVALID:", check["reason"])

A full calibration (testbed.core.emulation.calibrate) takes seconds per path
(50 pings and a 2 s flow each way). A testbed kept across runs is calibrated
fully when built and every N runs; in between each run gets this check instead:
a few pings per path (all paths at once) whose mean RTT must stay within the
calibration's own tolerance of both the RTT the calibration measured and the
configured one, enough of them answered, and the emulator's counters over the
pings judged like a run's (no packet dropped for a reason the scenario did not
configure, lateness within bound). Rate is not re-measured: a rate that moved
since the calibration is what the next full calibration catches, and the
testbed's reset reads the configured rates back before every run.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Any

from testbed.core.emulation.calibrate import emulator_counters, judge_run, path_ends, ping_rtts

DRIFT_PINGS = 10  # per path; 10 ms apart, all paths at once
MIN_ANSWERED = 8  # of DRIFT_PINGS: fewer means the path lost what an idle path should not


def drift_check(tb: Any, reference: dict[str, Any], pings: int = DRIFT_PINGS) -> dict[str, Any]:
    """Each path's RTT now against `reference` (a valid calibrate() result of
    this testbed with the same configuration) and its configuration, plus the
    emulator's counters over the pings. JSON-able, with `valid` and a `reason`
    naming each measured value and its bound."""
    t_start = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    before = emulator_counters(tb)

    def measure(p: Any) -> None:
        # Static neighbours: no ARP to resolve, so no warm-up echo is needed.
        client_addr, server_addr = path_ends(p)  # the ends calibration measured between
        results[p.name] = ping_rtts(tb.client.pid, server_addr, pings, interval=0.01,
                                    src=client_addr, warmup=False, timeout=1.0)

    threads = [threading.Thread(target=measure, args=(p,), daemon=True) for p in tb.paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    emulation = judge_run(before, emulator_counters(tb))
    problems: list[str] = []
    paths: dict[str, Any] = {}
    need = max(1, math.ceil(pings * MIN_ANSWERED / DRIFT_PINGS))
    for p in tb.paths:
        ref = reference["paths"].get(p.name, {})
        # The calibration's own idea of the configured RTT (it knows how a path's
        # links compose); the testbed's reset has checked the links against the spec.
        configured = ref.get("rtt_configured_ms", math.nan)
        rtt = results[p.name]
        tol = ref.get("rtt_tolerance_ms", math.nan)
        entry = {"rtt_mean_ms": rtt["mean_ms"], "rtt_calibrated_ms": ref.get("rtt_mean_ms"),
                 "rtt_configured_ms": configured, "bound_ms": tol, "pings": pings,
                 "answered": rtt["answered"], "samples": rtt["n"]}
        if not ref.get("rtt_ok", False):
            entry["ok"] = False
            problems.append(f"{p.name}: no valid calibrated RTT to compare with")
        elif rtt["answered"] < need or rtt["n"] == 0:
            entry["ok"] = False
            problems.append(f"{p.name}: {rtt['answered']} of {pings} pings answered "
                            f"({rtt['n']} usable), need at least {need}")
        else:
            off_cal = abs(rtt["mean_ms"] - ref["rtt_mean_ms"])
            off_cfg = abs(rtt["mean_ms"] - configured)
            entry["ok"] = off_cal <= tol and off_cfg <= tol
            if not entry["ok"]:
                problems.append(f"{p.name}: RTT {rtt['mean_ms']:.2f} ms, calibrated "
                                f"{ref['rtt_mean_ms']:.2f} ms, configured {configured:g} ms "
                                f"(bound +-{tol:.2f} ms of both)")
        paths[p.name] = entry
    if not emulation["valid"]:
        problems.append(f"emulator during the check: {emulation['reason']}")
    return {"valid": not problems, "reason": "; ".join(problems) or None, "paths": paths,
            "emulation": emulation, "duration_s": round(time.monotonic() - t_start, 3)}
