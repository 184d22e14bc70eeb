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

First, the cost of one link: one path at 20 Mbit/s, 2 ms one way, one TCP
transfer filling it for `seconds`; the forwarder's CPU (stats `cpu_s`, both
directions, in % of one core over the transfer) and its lateness.
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
LINK_RATE_MBIT = 20  # the per-link cost is measured at this rate


def _cpu_pct(before: dict[str, Any] | None, after: dict[str, Any] | None, elapsed: float) -> float:
    """The forwarders' mean CPU per link over elapsed seconds, in % of one core."""
    if not before or not after:
        return float("nan")
    return round(100 * sum(after[n]["cpu_s"] - before[n]["cpu_s"] for n in after)
                 / len(after) / elapsed, 1)


def _late(before: dict[str, Any], after: dict[str, Any]) -> tuple[int, int, float]:
    """Packets sent, packets > 1 ms late, worst lateness (us) over both directions."""
    tx = late = 0
    worst = 0.0
    for name, end in after.items():
        for d in ("up", "down"):
            tx += end[d]["tx"] - before[name][d]["tx"]
            late += end[d]["late_1ms"] - before[name][d]["late_1ms"]
            worst = max(worst, end[d]["late_max_us"])
    return tx, late, worst


def measure_link_cpu(seconds: float = 3.0) -> dict[str, Any]:
    """One forwarder's CPU (% of one core) and lateness while TCP fills a 20 Mbit/s link."""
    with Testbed(load("n-path", n=1, rate_mbit=LINK_RATE_MBIT, delay_ms=2),
                 backend="userspace") as tb:
        before, t0 = emulator_counters(tb), time.monotonic()
        res = bulk_transfer(tb, seconds=seconds, warmup=min(1.0, seconds / 3), protocol="tcp",
                            cc="cubic")
        after, t1 = emulator_counters(tb), time.monotonic()
    assert before is not None and after is not None  # the userspace backend has counters
    tx, late, worst = _late(before, after)
    return {"rate_mbit": LINK_RATE_MBIT, "goodput_mbit": round(res.goodput_mbit, 1),
            "cpu_pct_per_link": _cpu_pct(before, after, t1 - t0), "packets": tx,
            "late_1ms": late, "late_max_us": worst}


def measure_capacity(seconds: float = 3.0, log=print) -> dict[str, Any]:
    """Step the aggregate rate up until the emulator breaks the tolerance; cache and return."""
    link = measure_link_cpu(seconds)
    log(f"  one link at {link['rate_mbit']} Mbit/s: goodput {link['goodput_mbit']} Mbit/s, "
        f"forwarder CPU {link['cpu_pct_per_link']} % of a core, {link['late_1ms']} of "
        f"{link['packets']} packets > 1 ms late (max {link['late_max_us']:.0f} us)")
    steps = []
    capacity = 0.0
    for rate in RATES_MBIT:
        with Testbed(load("n-path", n=PATHS, rate_mbit=rate / PATHS, delay_ms=2),
                     backend="userspace") as tb:
            before, t0 = emulator_counters(tb), time.monotonic()
            res = bulk_transfer(tb, seconds=seconds, warmup=min(1.0, seconds / 3),
                                protocol="mptcp", cc="cubic")
            after, t1 = emulator_counters(tb), time.monotonic()
            verdict = judge_run(before, after)
        step = {"aggregate_mbit": rate, "goodput_mbit": round(res.goodput_mbit, 1),
                "cpu_pct_per_link": _cpu_pct(before, after, t1 - t0),
                "kept_time": verdict["valid"], "reason": verdict["reason"]}
        steps.append(step)
        log(f"  {rate:6g} Mbit/s configured: goodput {res.goodput_mbit:7.1f} Mbit/s, "
            f"CPU {step['cpu_pct_per_link']:5.1f} % per link, "
            f"{'kept time' if verdict['valid'] else 'BROKE: ' + verdict['reason']}")
        if not verdict["valid"]:
            break
        capacity = rate
    measured = {"capacity_mbit": capacity, "steps": steps, "paths": PATHS, "seconds": seconds,
                "link": link,
                "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    save_capacity(measured)
    return measured


def run(seconds: float = 3.0) -> str:
    """Measure, cache, and say so in a few lines."""
    print(f"emulation capacity: {PATHS} paths, one MPTCP transfer of {seconds:g} s per rate")
    m = measure_capacity(seconds)
    return (f"capacity {m['capacity_mbit']:g} Mbit/s in all (target: above every scenario's "
            f"aggregate rate), cached in {CAPACITY_FILE}")
