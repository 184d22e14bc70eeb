"""invoke tasks for benchmarks; the root tasks.py mounts `ns` as "bench".

    ./tb bench.emulation [--quick] [--out DIR] [--backend userspace]
    ./tb bench.robe-proxy [--connections 1000] [--concurrency 50] [--abort-pct 20]
    ./tb bench.capacity [--seconds 3]
    ./tb bench.distributed [--reps 1]
    ./tb bench.chaos [--runs 200] [--interrupts 20] [--out DIR]
    ./tb bench.stack [--seconds 3]
    ./tb bench.parallel [--experiment establishment] [--ks 1,2,3,4] [--reps N]
    ./tb bench.calibration [--calibrations 6] [--checks 100] | --compare N
    ./tb bench.esim-forgery [--attempts 5000] [--variants random-tag,right-hint,replay,unknown-key]
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


@task(help={"seconds": "bulk transfer per direction (default 3)",
            "connects": "connections timed for the connect latency (default 50)",
            "two_path_seconds": "transfer per stack combination on the two-path topology (default 10)"})
def stack(c, seconds=3.0, connects=50, two_path_seconds=10.0):
    """The user-space MPTCP stack against the kernel (one unshaped path; the two-path topology): figures vs targets."""
    need_root()
    from invoke.exceptions import Exit

    from testbed.tools.bench.stack import attach_compare, run, two_path

    for r in guard(attach_compare):
        print(f"attachment {r.method:<9} {r.packets_per_s:>8} packets/s, RTT median "
              f"{r.rtt_median_us} us, p99 {r.rtt_p99_us} us")
    b = guard(lambda: run(float(seconds), int(connects)))
    rows = [("user -> kernel, one unshaped path", f"{b.user_to_kernel_mbit} Mbit/s", ">= 100 Mbit/s",
             b.user_to_kernel_mbit >= 100),
            ("connect latency, user - kernel", f"{b.connect_user_ms - b.connect_kernel_ms:+.3f} ms",
             "<= 1 ms", b.connect_user_ms - b.connect_kernel_ms <= 1.0),
            ("CPU of the user sender", f"{b.user_cpu_s_per_gbit} CPU-s per Gbit", "(reported)", True),
            ("kernel -> user (veth hands 64 KiB super-packets)", f"{b.kernel_to_user_mbit} Mbit/s",
             "(reported)", True),
            ("kernel -> kernel reference", f"{b.kernel_to_kernel_mbit} Mbit/s", "(reported)", True)]
    # Inside the two-path topology, through the app workload (what the experiments run).
    for f in guard(lambda: two_path(float(two_path_seconds))):
        sender = f.server_stack if f.direction == "down" else f.client_stack
        what = (f"2 x 20 Mbit, 10/40 ms: {f.client_stack} client -> {f.server_stack} server, "
                f"{f.direction}")
        measured = f"{f.goodput_mbit} Mbit/s = {f.fraction:.3f}"
        intact = f.sha256_match and f.subflows_max == 2
        if sender == "user" and f.server_stack != f.client_stack:
            rows.append((what, measured, ">= 0.90 x sum of rates", f.fraction >= 0.90 and intact))
        else:
            kernel_only = f.client_stack == f.server_stack == "kernel"
            rows.append((what, measured, "(the kernel's figure)" if kernel_only else "(reported)", intact))
    for what, measured, target, ok in rows:
        verdict = "n/a" if ok is None else ("ok" if ok else "MISSED")
        print(f"{what:<58} {measured:>24}   target {target:<24} {verdict}")
    if any(ok is False for *_, ok in rows):
        raise Exit("bench.stack: a target was missed", code=1)


@task(help={"experiment": "an experiment of the paper, e.g. establishment, throughput, failover, fairness "
                          "(its --quick scenario)",
            "ks": "the K values to measure, comma-separated (default 1,2,3,4)",
            "reps": "repetitions per cell (default: as in the quick scenario)",
            "file": "which of the paper's scenario files of that experiment (default: its first), "
                    "e.g. fairness-user.toml"})
def parallel(c, experiment="establishment", ks="1,2,3,4", reps=None, file=None):
    """Fidelity and speed-up of `--parallel K`: one sweep per K, compared with K = 1."""
    need_root()
    from testbed.tools.bench.parallel import run_benchmark

    print(guard(lambda: run_benchmark(experiment, tuple(int(k) for k in ks.split(",")),
                                      int(reps) if reps is not None else None, file)))


ns = Collection("bench")
ns.add_task(emulation)
ns.add_task(robe_proxy)
ns.add_task(capacity)
ns.add_task(distributed)
ns.add_task(chaos)
ns.add_task(stack)
ns.add_task(parallel)


@task(help={"calibrations": "consecutive full calibrations of one testbed (default 6)",
            "checks": "drift checks against the last valid one (default 100)",
            "compare": "instead: the quick calibration against the reference one, N of each, "
                       "and both under an injected delay and rate fault"})
def calibration(c, calibrations=6, checks=100, compare=0):
    """Spread of a kept testbed's full calibrations, and the drift check's cost and false alarms."""
    need_root()
    from invoke.exceptions import Exit

    from testbed.tools.bench import calibration as bench

    if int(compare):
        text, ok = guard(lambda: bench.compare(int(compare)))
        print(text)
        if not ok:
            raise Exit("bench.calibration: a calibration failed an honest testbed or missed a fault",
                       code=1)
        return
    text, ok = guard(lambda: bench.run(int(calibrations), int(checks)))
    print(text)
    if not ok:
        raise Exit("bench.calibration: a calibration failed or a drift check voided a run", code=1)


ns.add_task(calibration)


@task(name="esim-forgery",
      help={"attempts": "forged MP_JOIN_CAP attempts per variant (default 5000, at most 5000)",
            "variants": "comma-separated: random-tag, right-hint, replay, unknown-key (default all)",
            "out": "directory for esim-forgery.json (default results/bench)"})
def esim_forgery(c, attempts=None, variants="random-tag,right-hint,replay,unknown-key", out="results/bench"):
    """Forged MP_JOIN_CAP from an observer of eSIM's losing path vs the user-stack server: accepted, hint, refusals."""
    need_root()
    from invoke.exceptions import Exit

    from testbed.base.errors import TestbedError
    from testbed.tools.bench.esim_forgery import format_report, run_forgery

    def go() -> dict:
        try:
            n = 5000 if attempts is None else int(attempts)   # a string: invoke would cast an int default itself
        except ValueError:
            raise TestbedError(f"--attempts: {attempts!r} is not a whole number") from None
        return run_forgery(n, tuple(v.strip() for v in str(variants).split(",") if v.strip()), out)

    text, ok = format_report(guard(go))
    print(text)
    if not ok:
        raise Exit("bench.esim-forgery: a bound was missed or the measurement was invalid", code=1)


ns.add_task(esim_forgery)


@task(name="rate-limit",
      help={"rate_kbit": "the rate the receiver asks for on lte, kbit/s (default 2000)",
            "modes": "comma-separated enforcement modes: pacing, cwnd (default both)"})
def rate_limit(c, rate_kbit=2000.0, modes="pacing,cwnd"):
    """The user-space stack's SRL enforcement: lte's rate vs the request, convergence, bursts (pacing vs cwnd)."""
    need_root()
    from invoke.exceptions import Exit

    from testbed.base.errors import TestbedError
    from testbed.stack.rate_limit import MODES
    from testbed.tools.bench.rate_limit import run

    def go() -> tuple[str, bool]:
        chosen = tuple(m.strip() for m in str(modes).split(",") if m.strip())
        bad = [m for m in chosen if m not in MODES]
        if bad or not chosen:
            raise TestbedError(f"--modes: {','.join(bad) or 'nothing'} is not among {', '.join(MODES)}")
        try:
            rate = float(rate_kbit)
        except ValueError:
            raise TestbedError(f"--rate-kbit: {rate_kbit!r} is not a number") from None
        if not 0 < rate <= RATE_LIMIT_MAX_KBIT:
            raise TestbedError(f"--rate-kbit: {rate:g} is not in (0, {RATE_LIMIT_MAX_KBIT}]")
        return run(rate, chosen)

    text, ok = guard(go)
    print(text)
    if not ok:
        raise Exit("bench.rate-limit: lte's rate missed the +-25 % target", code=1)


RATE_LIMIT_MAX_KBIT = 20_000   # the lte path's rate in the bench's topology
ns.add_task(rate_limit)
