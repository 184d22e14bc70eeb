"""Sweeps across machines on Dask distributed.

The submitting machine expands the scenarios, takes each run's lock in its own
store (so no other local sweep writes the run meanwhile), and submits the run
to a Dask scheduler as a task that needs one unit of the worker resource
`runs` (RESOURCE): a worker started by `./tb worker` offers as many units as it
may run at once (default 1), so the resource caps concurrent runs per machine.

On the worker, a task runs `runner.run_one` in a child process of its own (the
runner's time limit and the testbed's signal handling need a main thread; the
child dies with the worker through PR_SET_PDEATHSIG, tearing its testbed down as
on SIGTERM) into a private scratch store, and sends back the run directory as
files with their sha256. The submitting machine checks every checksum and
stores the run under its lock, renamed into place like a local run. A worker
that dies mid-run loses its task; the scheduler reruns it on another worker
and the run is stored once, when its one result arrives.

Each manifest records the machine that ran it (the runner's provenance: host,
kernel, CPU, tool versions; plus `executed_by`: the Dask worker).
"""
from __future__ import annotations

import asyncio
import ctypes
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Iterator

from testbed.base.errors import TestbedError
from testbed.harness.results import RunLock, RunWriter, remove_abandoned, run_stamp
from testbed.harness.runner import SweepSummary, wanted
from testbed.harness.scenario import RunSpec, Scenario, expand

RESOURCE = "runs"  # worker resource: how many runs a machine may do at once
REPO = Path(__file__).resolve().parents[2]
WORKER_WAIT_S = 60.0  # how long a submitter waits for a worker offering RESOURCE
RUN_GRACE_S = 120.0  # beyond the scenario's own time limit, for build and teardown
PR_SET_PDEATHSIG = 1
MAX_WORKER_RUNS = 64


class RemoteRunError(Exception):
    """A run's child process on a worker ended without a stored run."""


@dataclass(frozen=True)
class RunFiles:
    """A finished run directory as it travels back: relative path -> bytes, and each file's sha256."""

    experiment: str
    run_id: str
    worker: str
    files: dict[str, bytes]
    sha256: dict[str, str]


# ---- submitting machine ------------------------------------------------------

def check_address(address: str) -> str:
    """A Dask scheduler address (tcp://HOST:PORT or HOST:PORT), refused in one line otherwise."""
    addr = address if "://" in address else f"tcp://{address}"
    proto, _, rest = addr.partition("://")
    host, _, port = rest.rpartition(":")
    if proto not in ("tcp", "tls") or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TestbedError(f"--cluster: {address!r} is not a Dask scheduler address "
                           "(tcp://HOST:PORT, port 1..65535)")
    return addr


def connect(address: str, wait_s: float = WORKER_WAIT_S):
    """A Dask client of the scheduler at `address` that has at least one worker
    offering the `runs` resource (waits up to wait_s for one)."""
    from distributed import Client

    addr = check_address(address)
    try:
        client = Client(addr, timeout="10s", set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise TestbedError(f"--cluster: no Dask scheduler answers at {addr} ({exc})".splitlines()[0]) from None
    deadline = time.monotonic() + wait_s
    while not _run_workers(client):
        if time.monotonic() > deadline:
            client.close()
            raise TestbedError(f"--cluster: no worker offering '{RESOURCE}' joined {addr} within "
                               f"{wait_s:g} s (start one with ./tb worker {addr})")
        time.sleep(0.5)
    return client


def _run_workers(client) -> list[str]:
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return [w for w, info in workers.items() if info.get("resources", {}).get(RESOURCE, 0) >= 1]


def cluster_sweep(scenarios: list[Scenario], root: Path, address: str, retry_failed: bool = False,
                  progress: bool = True) -> list[tuple[str, SweepSummary]]:
    """Run every planned run of the scenarios that is not stored yet on the
    Dask cluster at `address`, storing each result in `root` under its run lock."""
    from distributed import as_completed

    plans: list[tuple[Scenario, list[RunSpec]]] = [(s, expand(s)) for s in scenarios]
    client = connect(address)
    # One summary per scenario: two scenarios of one experiment (as the paper's
    # failover.toml and failover-mpprio.toml) are summarised apart.
    summaries = [SweepSummary() for _ in plans]
    locks: dict[tuple[str, str], RunLock] = {}  # (experiment, run id)
    futures = {}
    bar = None
    try:
        for index, (scenario, specs) in enumerate(plans):
            summary = summaries[index]
            summary.planned += len(specs)
            remove_abandoned(root, scenario.experiment)
            for spec in specs:
                if (scenario.experiment, spec.run_id) in locks:  # an earlier scenario of this sweep runs it
                    summary.skipped += 1
                    continue
                seen = run_stamp(root, scenario.experiment, spec.run_id)
                if not wanted(seen, retry_failed):
                    summary.skipped += 1
                    continue
                lock = RunLock(root, scenario.experiment, spec.run_id)
                if not lock.acquire():
                    summary.elsewhere += 1  # another process on this machine is writing it
                    continue
                if run_stamp(root, scenario.experiment, spec.run_id) != seen:
                    lock.release()
                    summary.skipped += 1  # stored meanwhile
                    continue
                locks[(scenario.experiment, spec.run_id)] = lock
                key = f"mptb-{scenario.experiment}-{spec.run_id}-{uuid.uuid4().hex[:8]}"
                fut = client.submit(execute_on_worker, pickle.dumps(spec), key=key, pure=False,
                                    resources={RESOURCE: 1})
                futures[fut] = (index, scenario.experiment, spec.run_id)
        if progress and futures:
            from tqdm import tqdm
            bar = tqdm(total=len(futures), desc="cluster", unit="run", dynamic_ncols=True)
        for fut in as_completed(list(futures), loop=client.loop):
            index, experiment, run_id = futures[fut]
            summary = summaries[index]
            try:
                result: RunFiles = fut.result()
                run_dir = store_run(root, result)
                manifest = json.loads((run_dir / "manifest.json").read_text())
                status = manifest["status"]
                summary.voided += len(manifest.get("voided_attempts") or [])
                summary.run_dirs.append(run_dir)
            except Exception as exc:  # noqa: BLE001 - the run is lost, not the sweep
                status = "lost"
                print(f"warning: run {experiment}/{run_id}: {exc}".splitlines()[0], file=sys.stderr)
            finally:
                locks.pop((experiment, run_id)).release()
            summary.done[status] = summary.done.get(status, 0) + 1
            if bar is not None:
                bar.set_postfix_str(f"last: {status}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        for fut in futures:
            fut.cancel()
        for lock in locks.values():
            lock.release()
        client.close()
    return [(s.experiment, summary) for (s, _), summary in zip(plans, summaries)]


def store_run(root: Path, result: RunFiles) -> Path:
    """Check every file's checksum and store the run directory like a local run
    (its .tmp- directory renamed into place); the caller holds the run's lock."""
    for rel, data in result.files.items():
        path = PurePosixPath(rel)
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise RemoteRunError(f"worker {result.worker} sent an unsafe path {rel!r}")
        if hashlib.sha256(data).hexdigest() != result.sha256.get(rel):
            raise RemoteRunError(f"worker {result.worker}: {rel} does not match its sha256")
    if set(result.sha256) != set(result.files) or "manifest.json" not in result.files:
        raise RemoteRunError(f"worker {result.worker} sent an incomplete run directory")
    manifest = json.loads(result.files["manifest.json"])
    if (manifest.get("experiment"), manifest.get("run_id")) != (result.experiment, result.run_id):
        raise RemoteRunError(f"worker {result.worker} sent another run's manifest")
    writer = RunWriter(root, result.experiment, result.run_id)
    for rel, data in result.files.items():
        dest = writer.tmp / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "wb") as f:  # synced: a renamed run is never half-written after a crash
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return writer.commit()


# ---- worker machine ----------------------------------------------------------

def execute_on_worker(spec_pickle: bytes) -> RunFiles:
    """The Dask task: one run in a child process, its directory sent back checksummed."""
    from distributed import get_worker

    spec: RunSpec = pickle.loads(spec_pickle)
    worker = str(get_worker().name)
    # Created by the child once its SIGTERM handler is in place, so a worker
    # killed at any moment leaves no scratch store behind.
    scratch = Path(tempfile.gettempdir()) / f"mptb-worker-{uuid.uuid4().hex}"
    try:
        argv = [sys.executable, "-m", "testbed.harness.distributed", "execute", str(scratch),
                worker, spec.run_id]
        child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, cwd=REPO, preexec_fn=_die_with_parent)
        try:
            # Each attempt the testbed voids is run again (void_retries), each with its timeout.
            attempts = 1 + spec.scenario.void_retries
            out, _ = child.communicate(spec_pickle, timeout=attempts * (spec.scenario.timeout_s + RUN_GRACE_S))
        except subprocess.TimeoutExpired:
            child.terminate()  # the testbed tears down on SIGTERM
            try:
                out, _ = child.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                out, _ = child.communicate()
        run_dir = scratch / spec.scenario.experiment / spec.run_id
        if child.returncode != 0 or not (run_dir / "manifest.json").is_file():
            last = (out or b"").decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise RemoteRunError(f"run {spec.run_id} on {worker}: exit {child.returncode}: {last[0]}")
        files = {p.relative_to(run_dir).as_posix(): p.read_bytes()
                 for p in sorted(run_dir.rglob("*")) if p.is_file()}
        return RunFiles(experiment=spec.scenario.experiment, run_id=spec.run_id, worker=worker,
                        files=files, sha256={k: hashlib.sha256(v).hexdigest() for k, v in files.items()})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _die_with_parent() -> None:
    # The run's child gets SIGTERM when the worker dies (even by SIGKILL), so its
    # testbed unwinds instead of outliving the worker.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _child_main(scratch: str, worker: str) -> int:
    """`python -m testbed.harness.distributed execute SCRATCH WORKER RUN_ID`: one run into SCRATCH."""
    from testbed.harness.runner import run_one

    # SIGTERM (also from PR_SET_PDEATHSIG) unwinds like the testbed's own handler
    # does, before and after the testbed exists, so the scratch store goes too.
    def unwind(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, unwind)
    if os.getppid() == 1:
        return 1  # the worker died before PR_SET_PDEATHSIG took effect
    try:
        Path(scratch).mkdir(mode=0o700)
        spec: RunSpec = pickle.loads(sys.stdin.buffer.read())
        run_dir = run_one(spec, Path(scratch))
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)  # the worker may be gone: nobody else will
        raise
    manifest_path = run_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["executed_by"] = {"worker": worker, "pid": os.getpid()}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return 0


def check_worker_machine() -> list[str]:
    """What keeps this machine from being a worker, one line each: root and the
    pinned Python packages (bootstrapped); `./tb worker` adds doctor's checks."""
    if os.geteuid() != 0:
        return ["worker: needs root (network namespaces, tc, nftables)"]
    for line in (REPO / "requirements.txt").read_text().splitlines():
        name, sep, pinned = line.split("#")[0].strip().partition("==")
        if not sep:
            continue
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have != pinned:
            return [f"worker: not bootstrapped: {name} {pinned} pinned, {have or 'none'} "
                    "installed (run scripts/bootstrap.sh)"]
    return []


def check_runs(runs: int) -> int:
    """The worker's concurrent-run cap, refused in one line outside 1..MAX_WORKER_RUNS."""
    if not 1 <= runs <= MAX_WORKER_RUNS:
        raise TestbedError(f"worker: --runs must be 1..{MAX_WORKER_RUNS}, got {runs}")
    return runs


def serve_worker(address: str, runs: int = 1, name: str | None = None, host: str | None = None) -> None:
    """Run a Dask worker offering `runs` units of RESOURCE until the scheduler
    goes away or SIGINT/SIGTERM; no dashboard."""
    from distributed import Worker
    from distributed.utils import get_ip

    addr = check_address(address)
    check_runs(runs)
    # Listen only on the interface that reaches the scheduler (loopback for a local one).
    listen = host or get_ip(addr.partition("://")[2].rpartition(":")[0])

    async def main() -> None:
        worker = Worker(addr, nthreads=runs, resources={RESOURCE: runs}, host=listen,
                        name=name or f"{os.uname().nodename}-{os.getpid()}", dashboard=False,
                        death_timeout=60)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(worker.close()))
        await worker
        await worker.finished()

    asyncio.run(main())


# ---- a cluster on this machine (tests, benchmark) ---------------------------

@dataclass
class LocalCluster:
    """A scheduler and `./tb worker` processes on this machine, all on loopback."""

    address: str
    scheduler: subprocess.Popen
    workers: dict[str, subprocess.Popen]


@contextmanager
def local_cluster(n_workers: int, workdir: Path, runs: int = 1) -> Iterator[LocalCluster]:
    """Start a scheduler (loopback, dashboard on loopback) and n `./tb worker`
    processes; stop each by its PID at the end, whatever happens."""
    procs: list[subprocess.Popen] = []
    sched_file = workdir / "scheduler.json"
    try:
        sched = subprocess.Popen(
            [str(Path(sys.executable).with_name("dask")), "scheduler", "--host", "127.0.0.1",
             "--port", "0", "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(sched_file)],
            stdout=open(workdir / "scheduler.log", "wb"), stderr=subprocess.STDOUT, cwd=workdir)
        procs.append(sched)
        address = _scheduler_address(sched, sched_file, workdir / "scheduler.log")
        workers = {}
        for i in range(n_workers):
            name = f"w{i}"
            log = open(workdir / f"worker-{name}.log", "wb")
            w = subprocess.Popen([str(REPO / "tb"), "worker", address, "--name", name, "--runs", str(runs)],
                                 stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
            procs.append(w)
            workers[name] = w
        cluster = LocalCluster(address=address, scheduler=sched, workers=workers)
        client = connect(address)
        try:
            deadline = time.monotonic() + 120
            while len(_run_workers(client)) < n_workers:
                dead = [n for n, w in workers.items() if w.poll() is not None]
                if dead or time.monotonic() > deadline:
                    logs = "; ".join((workdir / f"worker-{n}.log").read_text()[-300:] for n in dead)
                    raise RuntimeError(f"workers did not join: {logs or 'timeout'}")
                time.sleep(0.3)
        finally:
            client.close()
        yield cluster
    finally:
        for p in reversed(procs):  # workers first, then the scheduler
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _scheduler_address(sched: subprocess.Popen, sched_file: Path, log: Path, wait_s: float = 60) -> str:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return json.loads(sched_file.read_text())["address"]
        except (OSError, ValueError, KeyError):
            pass  # not written yet, or half written
        if sched.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"dask scheduler did not start: {log.read_text()[-500:]}")
        time.sleep(0.2)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "execute":
        sys.exit(_child_main(sys.argv[2], sys.argv[3]))
    print("usage: python -m testbed.harness.distributed execute SCRATCH WORKER RUN_ID", file=sys.stderr)
    sys.exit(2)
