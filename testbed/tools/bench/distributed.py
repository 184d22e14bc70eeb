"""Speed-up of a sweep on Dask distributed: the same establishment sweep on a
local cluster with one worker, then with two (scheduler and workers on this
machine, loopback only), each into a fresh store; prints measured vs target."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from testbed.harness import scenario as sc
from testbed.harness.distributed import cluster_sweep, local_cluster

REPO = Path(__file__).resolve().parents[3]
SCENARIO = REPO / "experiments" / "robe-establishment.toml"
TARGET_SPEEDUP = 1.7


def run_benchmark(reps: int = 1) -> tuple[str, bool]:
    """Wall time of the sweep with 1 and 2 workers; (report, target met)."""
    scenario = sc.load(SCENARIO, None, reps)
    times: dict[int, float] = {}
    statuses: dict[int, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="mptb-bench-dist-") as tmp:
        for n in (1, 2):
            work = Path(tmp) / f"cluster-{n}"
            work.mkdir()
            with local_cluster(n, work) as cluster:
                t0 = time.monotonic()
                [(_, summary)] = cluster_sweep([scenario], Path(tmp) / f"store-{n}", cluster.address,
                                               progress=False)
                times[n] = time.monotonic() - t0
                statuses[n] = summary.done
    runs = sum(statuses[1].values())
    speedup = times[1] / times[2]
    ok = speedup >= TARGET_SPEEDUP
    lines = [f"establishment sweep ({SCENARIO.name}, {reps} rep(s), {runs} runs) on a local Dask cluster:",
             f"  1 worker : {times[1]:7.1f} s  {statuses[1]}",
             f"  2 workers: {times[2]:7.1f} s  {statuses[2]}",
             f"  speed-up : {speedup:.2f}x measured, target >= {TARGET_SPEEDUP}x -> "
             + ("met" if ok else "MISSED")]
    return "\n".join(lines), ok
