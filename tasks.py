"""invoke tasks: the testbed's command line. Run them through ./tb (bootstraps first).

    ./tb doctor                 can experiments run here?
    ./tb demo                   two-path MPTCP demo: per-path and aggregate goodput
    ./tb shell --topology n-path --set n=3   start a topology, open Mininet's CLI
    ./tb clean                  remove leftovers of crashed runs (by recorded PID only)
    ./tb test                   the test suite (what CI runs)
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from invoke import Collection, Exit, task

from testbed.base.errors import TestbedError
from testbed.tools.bench.tasks import ns as bench_tasks
from testbed.tools.cli import fail as _fail, guard as _guard, need_root as _need_root
from testbed.tools.conformance.tasks import conformance
from testbed.tools.vm.tasks import ns as vm_tasks

ROOT = Path(__file__).resolve().parent


def _topology(name: str, sets: list[str]):
    from testbed.harness.overrides import parse_assignments
    from testbed.core.topology import load

    return load(name, **parse_assignments(sets))


@task
def doctor(c):
    """Check kernel MPTCP, sysctls, link-emulation backends, tools and offloads."""
    from testbed.tools import doctor as d

    checks = d.run_checks()
    print(d.render(checks))
    if not d.healthy(checks):
        raise Exit("doctor: experiments cannot run here (see FAIL lines)", code=1)
    print("doctor: experiments can run here")


@task
def clean(c):
    """End the processes of crashed runs (recorded PIDs only; their namespaces go with them)."""
    _need_root()
    from testbed.core.state import clean_stale

    report = _guard(clean_stale)
    removed = report.removed
    print(f"clean: removed {len(removed)} crashed run(s)" + (f": {', '.join(removed)}" if removed else ""))
    for run_id, what in report.kept.items():
        print(f"clean: kept the record of {run_id}: {what}")
    if report.kept:
        raise Exit("clean: something survived (see above); its record is kept for the next clean", code=1)


@task
def topologies(c):
    """List the known topologies."""
    from testbed.core.topology import available

    for name, desc in sorted(available().items()):
        print(f"{name:<22} {desc}")


@task(iterable=["set_"], help={"set_": "topology parameter or field, e.g. --set rate_mbit=10"})
def shell(c, topology="two-path", backend="auto", set_=None):
    """Start TOPOLOGY and open Mininet's CLI (nodes: c, s, r, x<i>)."""
    _need_root()
    from mininet.cli import CLI

    from testbed.core.net import Testbed

    def run():
        with Testbed(_topology(topology, set_ or []), backend=backend) as tb:
            print(f"client c -> server s at {tb.server_addr}; paths: "
                  + ", ".join(f"{p.name} ({p.addr.client})" for p in tb.paths))
            CLI(tb.net)

    _guard(run)


@task(iterable=["set_"], help={"set_": "topology override, e.g. --set wifi_delay_ms=0",
                                "out": "write the result as JSON into this directory"})
def demo(c, topology="two-path", backend="auto", seconds=8.0, set_=None, out=None):
    """Real two-path MPTCP transfer: per-path and aggregate goodput."""
    _need_root()
    from testbed.core.bulk import bulk_transfer
    from testbed.core.net import Testbed

    def run():
        topo = _topology(topology, set_ or [])
        with Testbed(topo, backend=backend) as tb:
            result = bulk_transfer(tb, seconds=float(seconds), warmup=min(2.0, float(seconds) / 3))
            rates = {p.name: p.spec.direction("up").rate_mbit for p in tb.paths}
            print(f"topology {topo.name}, backend {tb.backend.name}, cc cubic, {len(tb.paths)} paths")
            for name, mbit in result.path_goodput_mbit.items():
                print(f"  path {name:<8} {mbit:7.2f} Mbit/s on the wire (configured {rates[name]})")
            total = sum(r or 0 for r in rates.values())
            print(f"  aggregate goodput {result.goodput_mbit:7.2f} Mbit/s"
                  + (f" = {result.goodput_mbit / total:.2f} x sum of rates" if total else "")
                  + f"; extra subflows: {result.subflows}")
            if out:
                Path(out).mkdir(parents=True, exist_ok=True)
                doc = {"result": result.__dict__, "testbed": tb.describe()}
                (Path(out) / "demo.json").write_text(json.dumps(doc, indent=2, default=str))
                print(f"  written {Path(out) / 'demo.json'}")

    _guard(run)


@task(help={"quick": "skip slow and VM tests", "k": "pytest -k expression",
            "vm": "also run the VM tests (default: only in CI or with MPTB_VM_TESTS=1)"})
def test(c, quick=False, k=None, vm=False):
    """Run the test suite (integration tests need root)."""
    args = [sys.executable, "-m", "pytest", "-q", str(ROOT / "tests")]
    marks = []
    if quick:
        marks.append("not slow")
    run_vm = vm or os.environ.get("CI") == "true" or os.environ.get("MPTB_VM_TESTS") == "1"
    if quick or not run_vm:
        marks.append("not vm")
    if marks:
        args += ["-m", " and ".join(marks)]
    if k:
        args += ["-k", k]
    rc = os.spawnv(os.P_WAIT, args[0], args)
    if rc != 0:
        raise Exit(code=rc)


@task(iterable=["set_"], help={
    "scenario": "scenario TOML file (see docs/scenarios.md)",
    "reps": "override the number of repetitions",
    "out": "results directory (default: results/)",
    "set_": "override a scenario key, e.g. --set params.seconds=5 (repeatable)",
    "retry_failed": "rerun runs stored as failed",
    "no_progress": "no progress bar",
    "cluster": "Dask scheduler address (tcp://HOST:PORT): runs go to its workers (docs/distributed.md)",
    "parallel": "up to K testbeds at once on this machine, as the experiment allows (docs/performance.md)"})
def run(c, scenario, reps=None, out="results", set_=None, retry_failed=False, no_progress=False,
        cluster=None, parallel=1):
    """Run a scenario: grid x repetitions, resumable; results in OUT/<experiment>/<run-id>/."""
    _need_root()
    from testbed.harness import scenario as sc
    from testbed.harness.overrides import parse_assignments
    from testbed.harness.runner import sweep

    def go():
        from testbed.harness.parallel import check_parallel, parallel_sweep

        lanes = check_parallel(parallel)
        if cluster and lanes > 1:
            raise _fail("--parallel and --cluster: choose one (a cluster's workers set their own --runs)")
        s = sc.load(scenario, parse_assignments(set_ or []), int(reps) if reps is not None else None)
        if cluster:
            from testbed.harness.distributed import check_address, cluster_sweep

            check_address(cluster)
            [(_, summary)] = cluster_sweep([s], Path(out), cluster, retry_failed=retry_failed,
                                           progress=not no_progress)
        elif lanes > 1:
            [(_, summary)] = parallel_sweep([s], Path(out), lanes, retry_failed=retry_failed,
                                            progress=not no_progress)
        else:
            summary = sweep(s, Path(out), retry_failed=retry_failed, progress=not no_progress)
        print(f"{s.experiment}: {summary.line()} -> {Path(out) / s.experiment}")
        if summary.done.get("failed"):
            raise Exit(f"error: {summary.done['failed']} run(s) failed (see `./tb results.ls {out}`)", code=1)
        if summary.done.get("lost"):
            raise Exit(f"error: {summary.done['lost']} run(s) came back from no worker (see above)", code=1)

    _guard(go)


@task(help={"quick": "few repetitions, trimmed grids: minutes instead of an hour",
            "out": "results directory (resumed if it exists)",
            "report": "where the report goes (default: OUT/report)",
            "retry_failed": "rerun the runs stored as failed (resuming skips them otherwise)",
            "campaign": "campaign file listing the scenarios (default: experiments/paper.toml)",
            "no_progress": "no progress bars",
            "cluster": "Dask scheduler address (tcp://HOST:PORT): runs go to its workers",
            "parallel": "up to K testbeds at once, each experiment capped where it was measured to "
                        "keep fidelity (default: the largest cap; 1: one run at a time; docs/performance.md)"})
def paper(c, quick=False, out=None, report=None, retry_failed=False, campaign=None, no_progress=False,
          cluster=None, parallel=None):
    """Rerun the paper's scenarios end to end (resuming), then build the report."""
    _need_root()
    from testbed.harness import campaign as cp

    def go():
        from testbed.harness.parallel import MAX_PARALLEL, check_parallel

        lanes = check_parallel(parallel if parallel is not None else MAX_PARALLEL)
        if cluster and parallel is not None and lanes > 1:
            raise _fail("--parallel and --cluster: choose one (a cluster's workers set their own --runs)")
        plan = cp.load(campaign or cp.PAPER)
        results = Path(out or ("results-quick" if quick else "results"))
        t0 = time.monotonic()
        if cluster:
            from testbed.harness.distributed import check_address, cluster_sweep

            check_address(cluster)
            summaries = cluster_sweep(plan.scenarios(quick), results, cluster,
                                      retry_failed=retry_failed, progress=not no_progress)
        else:
            summaries = cp.run(plan, results, quick=quick, progress=not no_progress,
                               retry_failed=retry_failed, parallel=lanes)
        for experiment, summary in summaries:
            print(f"{experiment}: {summary.line()}")
        _paper_forgery(results, quick)
        from analysis.report import build_report

        index = build_report(results, Path(report) if report else results / "report")
        print(f"paper: report {index} ({time.monotonic() - t0:.0f} s)")
        left = cp.not_complete(plan, results, quick)
        if left.get("invalid"):
            print(f"paper: {left['invalid']} run(s) stored as invalid; the report marks them")
        if left.get("failed"):
            raise Exit(f"error: {left['failed']} stored run(s) failed; the report marks them "
                       f"(./tb results.ls {results}; rerun them with --retry-failed)", code=1)

    _guard(go)


def _paper_forgery(results: Path, quick: bool) -> None:
    """The report's RobE_eSIM security table: forged MP_JOIN_CAP attempts on the wire, measured
    on this machine once per results directory (500 per variant with --quick, else 5,000), and
    again while the stored one is invalid."""
    from analysis.esim_security import invalid_reason, load_forgery
    from testbed.stack import StackError
    from testbed.tools.bench.esim_forgery import FORGERY_FILE, run_forgery

    stored = results / FORGERY_FILE
    if stored.exists() and invalid_reason(load_forgery(stored)) is None:
        return
    attempts = 500 if quick else 5000
    try:
        doc = run_forgery(attempts=attempts, out=results)
    except (TestbedError, StackError, OSError) as exc:
        # Stored as invalid, with the reason: the report says why there is no table, the
        # next ./tb paper measures again, and the campaign's report is still built.
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        results.mkdir(parents=True, exist_ok=True)
        stored.write_text(json.dumps({"invalid": reason}, indent=2))
        print(f"paper: esim forgery not measured: {reason}", file=sys.stderr)
        return
    accepted = sum(v["server"]["accepted"] for v in doc["variants"].values())
    print(f"paper: esim forgery: {accepted} of {attempts * len(doc['variants'])} forged MP_JOIN_CAP "
          f"accepted ({doc['seconds']:g} s)" + (f"; invalid: {doc['invalid']}" if doc.get("invalid") else ""))


@task(help={"address": "the Dask scheduler, tcp://HOST:PORT",
            "runs": "runs this machine may do at once (the worker resource; default 1)",
            "name": "worker name recorded in each manifest (default HOST-PID)",
            "host": "address to listen on (default: the one that reaches the scheduler)"})
def worker(c, address, runs=1, name=None, host=None):
    """Serve runs for `./tb run/paper --cluster ADDRESS` on this machine (docs/distributed.md)."""
    from testbed.harness.distributed import check_address, check_runs, check_worker_machine, serve_worker

    def go():
        check_address(address)
        check_runs(int(runs))
        problems = check_worker_machine()
        if not problems:
            from testbed.tools import doctor as d

            problems = [f"worker: doctor: {ck.name}: {ck.detail} (./tb doctor says how to fix it)"
                        for ck in d.run_checks() if ck.required and not ck.ok]
        if problems:
            raise Exit(problems[0], code=1)
        print(f"worker: this machine is fit; serving up to {int(runs)} run(s) at once for {address}",
              flush=True)
        serve_worker(address, runs=int(runs), name=name, host=host)

    _guard(go)


@task(help={"dir": "results directory (as written by ./tb run or ./tb paper)",
            "out": "where to write report.html, figures and CSVs (default: build/report)"})
def report(c, dir, out="build/report"):
    """Rebuild the HTML report, figures (PNG, PDF) and CSVs from an existing results directory."""
    def go():
        from analysis.report import build_report

        if not Path(dir).is_dir():
            raise _fail(f"results directory {dir} does not exist")
        print(f"report: {build_report(dir, out)}")

    _guard(go)


@task(name="ls", positional=["out"])
def results_ls(c, out):
    """List stored runs with their status (and the reason of failed/invalid ones)."""
    from testbed.harness.results import list_runs

    def go():
        if not Path(out).is_dir():
            raise _fail(f"no results directory {out}")
        frame = list_runs(Path(out))
        if frame.empty:
            print(f"no runs in {out}")
            return
        counts = frame.groupby(["experiment", "status"]).size().unstack(fill_value=0)
        print(counts.to_string())
        bad = frame[frame.status != "complete"]
        for row in bad.itertuples():
            print(f"{row.experiment}/{row.run_id}: {row.status}: {row.reason}")

    _guard(go)


@task(help={"store": "results of a paper run whose phases to break down "
                     "(default: results-quick, as ./tb paper --quick writes)",
            "repeats": "builds per topology for the build timing (0: none)"})
def harness(c, store="results-quick", repeats=5):
    """Benchmark: where a paper run's time goes (median seconds per phase and the
    per-run overhead against its target), then build + stop time of two-path and 8-path."""
    _need_root()
    from testbed.tools.bench.harness import breakdown, estimate_full

    if Path(store).is_dir():
        text, _ok = breakdown(Path(store))
        print(text)
        print(estimate_full(Path(store)))
    else:
        print(f"{store}: no results there (run ./tb paper --quick, or pass --store)")
    from testbed.core.net import Testbed
    from testbed.core.topology import load

    def measure(topo) -> list[float]:
        times = []
        for _ in range(int(repeats)):
            t0 = time.perf_counter()
            with Testbed(topo):
                pass
            times.append(time.perf_counter() - t0)
        return times

    def run():
        if int(repeats) <= 0:
            return
        print(f"{'topology':<12} {'median s':>9} {'max s':>7} {'target s':>9}  verdict")
        for name, topo, target in [("two-path", load("two-path"), 1.0),
                                   ("8-path", load("n-path", n=8), 3.0)]:
            ts = sorted(measure(topo))
            med = ts[len(ts) // 2]
            print(f"{name:<12} {med:9.3f} {ts[-1]:7.3f} {target:9.1f}  "
                  f"{'meets target' if med <= target else 'MISSES target'}")

    _guard(run)


ns = Collection(doctor, clean, topologies, shell, demo, test, run, paper, worker)
ns.add_collection(Collection("results", results_ls))
bench = Collection("bench", harness)
ns.add_collection(bench)
ns.add_task(report)
ns.add_task(conformance)
for t in bench_tasks.tasks.values():
    bench.add_task(t)
ns.add_collection(vm_tasks, "vm")
