"""invoke tasks for benchmarks; the root tasks.py mounts `ns` as "bench".

    ./tb bench.emulation [--quick] [--out DIR] [--backend userspace]
    ./tb bench.robe-proxy [--connections 1000] [--concurrency 50] [--abort-pct 20]
    ./tb bench.capacity [--seconds 3]
    ./tb bench.distributed [--reps 1]
    ./tb bench.chaos [--runs 200] [--interrupts 20] [--out DIR]
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


@task(name="robe-proxy",
      help={"connections": "client connections in all (default 1000)",
            "concurrency": "clients at once, also the proxy's --max-connections (default 50)",
            "abort_pct": "percentage of clients that reset mid-stream (default 20)",
            "strategy": "the proxy's RobE strategy (default sim+ips)",
            "join": "the proxy's join mode: auto, userspace, kernel, none (default auto)"})
def robe_proxy(c, connections=1000, concurrency=50, abort_pct=20.0, strategy="sim+ips",
               join="auto"):
    """Soak `robe proxy` in a testbed: stays up, threads and descriptors flat, history valid."""
    need_root()
    from invoke.exceptions import Exit

    from testbed.tools.bench.robe_proxy import format_report, run_soak

    text, ok = format_report(guard(lambda: run_soak(int(connections), int(concurrency),
                                                    float(abort_pct), strategy=strategy, join=join)))
    print(text)
    if not ok:
        raise Exit("robe proxy soak: a target was missed", code=1)


@task(help={"reps": "repetitions of the establishment grid (default 1: 35 runs)"})
def distributed(c, reps=1):
    """Speed-up of an establishment sweep with two Dask workers over one (target >= 1.7x)."""
    need_root()
    from invoke.exceptions import Exit

    from testbed.tools.bench.distributed import run_benchmark

    text, ok = guard(lambda: run_benchmark(int(reps)))
    print(text)
    if not ok:
        raise Exit("bench.distributed: speed-up target missed", code=1)


@task(help={"seconds": "transfer per rate step (default 3)"})
def capacity(c, seconds=3.0):
    """Measure and cache the aggregate rate the user-space link emulator carries in time."""
    need_root()
    from testbed.tools.bench.capacity import run

    print(guard(lambda: run(float(seconds))))


@task(help={"runs": "runs in the sweep (default 200)",
            "interrupts": "attempts killed at a random moment (default runs/10)",
            "seed": "seed of the moments and signals (default 1)",
            "out": "a new directory for the scenario, store and chaos.json"})
def chaos(c, runs=200, interrupts=None, seed=1, out="results/bench-chaos"):
    """A sweep hit by kill -9, SIGINT and SIGTERM, each followed by clean and a resume:
    every run stored once, nothing leaked, host sysctls unchanged."""
    need_root()
    from invoke.exceptions import Exit

    from testbed.tools.bench.chaos import run_chaos

    result = guard(lambda: run_chaos(int(runs), None if interrupts is None else int(interrupts),
                                     int(seed), out))
    print(result.render())
    if not result.ok():
        raise Exit("bench.chaos: a target was missed", code=1)


ns = Collection("bench")
ns.add_task(emulation)
ns.add_task(robe_proxy)
ns.add_task(capacity)
ns.add_task(distributed)
ns.add_task(chaos)
