"""invoke tasks for benchmarks; the root tasks.py mounts `ns` as "bench".

    ./tb bench.emulation [--quick] [--out DIR] [--backend userspace]
"""
from __future__ import annotations

from invoke import Collection, task
from invoke.exceptions import Exit


@task(help={"out": "output directory (CSV, Parquet, meta JSON)",
            "quick": "shorter measurements (same grid)",
            "backend": "only this backend (netem, userspace, bridge); default: every usable one"})
def emulation(c, out="results/bench", quick=False, backend=None):
    """Configured vs measured RTT (idle, 80 % load), TCP goodput, loss, emulator CPU."""
    import os

    if os.geteuid() != 0:
        raise Exit("error: the emulation benchmark needs root (network namespaces)", code=1)
    from testbed.tools.bench.emulation import run_benchmark
    from testbed.base.errors import TestbedError

    try:
        run_benchmark(out, quick=quick, backends=[backend] if backend else None)
    except TestbedError as exc:
        raise Exit(f"error: {exc}", code=1) from None


ns = Collection("bench")
ns.add_task(emulation)
