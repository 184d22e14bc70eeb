"""invoke tasks for benchmarks; the root tasks.py mounts `ns` as "bench".

    ./tb bench.emulation [--quick] [--out DIR] [--backend userspace]
"""
from __future__ import annotations

from invoke import Collection, task

from testbed.tools.cli import guard, need_root


@task(help={"out": "output directory (CSV, Parquet, meta JSON)",
            "quick": "shorter measurements (same grid)",
            "backend": "only this backend (netem, userspace, bridge); default: every usable one"})
def emulation(c, out="results/bench", quick=False, backend=None):
    """Configured vs measured RTT (idle, 80 % load), TCP goodput, loss, emulator CPU."""
    need_root()
    from testbed.tools.bench.emulation import run_benchmark

    guard(lambda: run_benchmark(out, quick=quick, backends=[backend] if backend else None))


ns = Collection("bench")
ns.add_task(emulation)
