"""This machine's emulation capacity: how much aggregate rate the user-space
link emulator carries while keeping time.

    ./tb bench.capacity [--seconds 3]

For aggregate rates 50, 100, 200, 400, 800, 1600 Mbit/s (stopping at the first
that fails): n-path with 4 paths of a quarter of the rate each, 2 ms one way,
one MPTCP transfer (cubic, 4 subflows) filling them for `seconds`, and the
forwarders' own counters over it judged with the tolerance every run is judged
with (calibrate.judge_run: at most 0.1 % of packets more than 1 ms late, no
drop the scenario did not configure). The capacity is the highest rate that
passed; it is cached (calibrate.CAPACITY_FILE) for the runner's warning at load.
"""
from __future__ import annotations

import time
from typing import Any

from testbed.core.bulk import bulk_transfer
from testbed.core.emulation.calibrate import (CAPACITY_FILE, emulator_counters, judge_run,
                                              save_capacity)
from testbed.core.net import Testbed
from testbed.core.topology import load

RATES_MBIT = (50, 100, 200, 400, 800, 1600)
PATHS = 4


def measure_capacity(seconds: float = 3.0, log=print) -> dict[str, Any]:
    """Step the aggregate rate up until the emulator breaks the tolerance; cache and return."""
    steps = []
    capacity = 0.0
    for rate in RATES_MBIT:
        with Testbed(load("n-path", n=PATHS, rate_mbit=rate / PATHS, delay_ms=2),
                     backend="userspace") as tb:
            before = emulator_counters(tb)
            res = bulk_transfer(tb, seconds=seconds, warmup=min(1.0, seconds / 3),
                                protocol="mptcp", cc="cubic")
            verdict = judge_run(before, emulator_counters(tb))
        step = {"aggregate_mbit": rate, "goodput_mbit": round(res.goodput_mbit, 1),
                "kept_time": verdict["valid"], "reason": verdict["reason"]}
        steps.append(step)
        log(f"  {rate:6g} Mbit/s configured: goodput {res.goodput_mbit:7.1f} Mbit/s, "
            f"{'kept time' if verdict['valid'] else 'BROKE: ' + verdict['reason']}")
        if not verdict["valid"]:
            break
        capacity = rate
    measured = {"capacity_mbit": capacity, "steps": steps, "paths": PATHS, "seconds": seconds,
                "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    save_capacity(measured)
    return measured


def run(seconds: float = 3.0) -> str:
    """Measure, cache, and say so in a few lines."""
    print(f"emulation capacity: {PATHS} paths, one MPTCP transfer of {seconds:g} s per rate")
    m = measure_capacity(seconds)
    return (f"capacity {m['capacity_mbit']:g} Mbit/s in all (target: above every scenario's "
            f"aggregate rate), cached in {CAPACITY_FILE}")
