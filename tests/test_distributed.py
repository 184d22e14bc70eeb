"""Sweeps on Dask distributed: a local scheduler and two `./tb worker` processes
on this machine (loopback only) run a small establishment sweep; one worker is
killed mid-run by its PID; every run is stored complete exactly once, by the
submitting machine, and nothing the test started is left running."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import establishment_sweep
from testbed.base.errors import TestbedError
from testbed.core.state import STATE_DIR
from testbed.harness import distributed as dist
from testbed.harness.results import RunLock

ROOT = Path(__file__).resolve().parents[1]
TB = str(ROOT / "tb")

SCENARIO = establishment_sweep(calibrate=False, trial_timeout_s=4, strategies=["tcp", "sim", "mptcp"])


def _children(pid: int) -> list[int]:
    """Children of every thread of pid (a Dask worker starts runs from its executor threads)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


# ---- no namespaces ------------------------------------------------------------

@pytest.mark.parametrize("bad", ["nope", "tcp://host", "tcp://host:0", "udp://h:1", "h:99999"])
def test_scheduler_address_refused_in_one_line(bad):
    with pytest.raises(TestbedError, match="not a Dask scheduler address"):
        dist.check_address(bad)
    assert dist.check_address("10.0.0.1:8786") == "tcp://10.0.0.1:8786"


def test_cli_refuses_bad_cluster_and_worker_arguments(tmp_path):
    cases = [(["run", "experiments/robe-establishment.toml", "--cluster", "nope", "--out", str(tmp_path)],
              "not a Dask scheduler address"),
             (["worker", "tcp://127.0.0.1:1", "--runs", "0"], "--runs must be 1..64"),
             (["worker", "x"], "not a Dask scheduler address")]
    for args, message in cases:
        res = subprocess.run([TB, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert res.returncode == 2, (args, res.stderr)
        err = res.stderr.strip().splitlines()
        assert len(err) == 1 and message in err[0] and "Traceback" not in res.stderr, res.stderr
    assert not any(tmp_path.iterdir())  # nothing stored


def test_store_refuses_a_run_whose_files_do_not_match_their_checksums(tmp_path):
    manifest = json.dumps({"experiment": "establishment", "run_id": "r1", "status": "complete"}).encode()
    files = {"manifest.json": manifest, "raw/x.txt": b"data"}
    good = {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
    bad = dict(good, **{"raw/x.txt": hashlib.sha256(b"other").hexdigest()})
    with pytest.raises(dist.RemoteRunError, match="does not match its sha256"):
        dist.store_run(tmp_path, dist.RunFiles("establishment", "r1", "w", files, bad))
    unsafe = {"../escape": b"x", "manifest.json": manifest}
    with pytest.raises(dist.RemoteRunError, match="unsafe path"):
        dist.store_run(tmp_path, dist.RunFiles("establishment", "r1", "w", unsafe,
                                               {k: hashlib.sha256(v).hexdigest() for k, v in unsafe.items()}))
    assert not (tmp_path / "establishment" / "r1").exists()
    run_dir = dist.store_run(tmp_path, dist.RunFiles("establishment", "r1", "w", files, good))
    assert (run_dir / "raw/x.txt").read_bytes() == b"data"
    assert not list((tmp_path / "establishment").glob(".tmp-*"))


# ---- a real cluster on this machine -------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_workers_one_killed_mid_run_every_run_stored_once(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    scenario = tmp_path / "small.toml"
    scenario.write_text(SCENARIO)
    store = tmp_path / "store"
    work = tmp_path / "cluster"
    work.mkdir()
    with dist.local_cluster(2, work) as cluster:
        # The scheduler and the workers listen on loopback only.
        listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout
        ours = {cluster.scheduler.pid, *(w.pid for w in cluster.workers.values())}
        for line in listening.splitlines():
            if any(f"pid={pid}," in line for pid in ours):
                assert line.split()[3].startswith("127.0.0.1:"), line
        sweep = subprocess.Popen([TB, "run", str(scenario), "--cluster", cluster.address, "--out", str(store),
                                  "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, cwd=ROOT)
        # Kill the first worker seen running a run, by its PID, while the run is on.
        killed = child = None
        deadline = time.monotonic() + 180
        while killed is None and time.monotonic() < deadline and sweep.poll() is None:
            for name, proc in cluster.workers.items():
                runs = [c for c in _children(proc.pid) if "execute" in _cmdline(c)]
                if runs and _children(runs[0]):  # well inside the run: the testbed's nodes exist
                    time.sleep(0.5)
                    child, argv = runs[0], _cmdline(runs[0])
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    killed = (name, argv[argv.index("execute") + 3], Path(argv[argv.index("execute") + 1]))
                    break
            time.sleep(0.05)
        if killed is None:
            sweep.kill()
            pytest.fail(f"no worker was seen running a run; the sweep said: {sweep.communicate()[0][-3000:]}")
        out, _ = sweep.communicate(timeout=400)
        assert sweep.returncode == 0, out
        # The run's child went with its worker, and took its scratch store with it.
        deadline = time.monotonic() + 30
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(child), "the run's process outlived its killed worker"
        assert not killed[2].exists(), "the killed run's scratch store was left behind"
    # Every planned run stored complete exactly once; the killed one by the other worker.
    manifests = sorted((store / "establishment").glob("*/manifest.json"))
    assert len(manifests) == 6, out
    assert not list((store / "establishment").glob(".tmp-*"))
    docs = {p.parent.name: json.loads(p.read_text()) for p in manifests}
    assert {d["status"] for d in docs.values()} == {"complete"}, {k: d["reason"] for k, d in docs.items()}
    name, run_id, _ = killed
    assert run_id in docs
    survivor = next(n for n in cluster.workers if n != name)
    assert docs[run_id]["executed_by"]["worker"] == survivor
    assert "6 runs planned, 0 already stored, 6 complete" in out, out
    # Each manifest names the machine that ran it.
    for d in docs.values():
        assert d["kernel"]["release"] == os.uname().release
        assert d["host"]["hostname"] and d["host"]["cpu_model"]
    # Nothing left running: scheduler and workers stopped by PID, no run process,
    # no testbed record, every run lock free.
    assert cluster.scheduler.poll() is not None
    assert all(w.poll() is not None for w in cluster.workers.values())
    leftovers = [p for p in os.listdir("/proc") if p.isdigit()
                 and "testbed.harness.distributed" in _cmdline(int(p)) and _alive(int(p))]
    assert not leftovers
    records = [r for r in STATE_DIR.glob("*.json") if any(rid in r.name for rid in docs)]
    assert not records, records
    for rid in docs:
        lock = RunLock(store, "establishment", rid)
        assert lock.acquire()
        lock.release()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_campaign_on_the_cluster_summarises_each_scenario_on_its_own(tmp_path):
    """Two scenarios of one experiment (as failover.toml and failover-mpprio.toml
    in the paper): each gets its own summary of its own runs; a third that repeats
    the first (as the quick paper's eSIM entry shares a run) finds them taken."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    from testbed.harness import scenario as sc
    paths = []
    for name, strategy in (("a", "tcp"), ("b", "mptcp")):
        paths.append(tmp_path / f"{name}.toml")
        paths[-1].write_text(establishment_sweep(calibrate=False, trial_timeout_s=4, strategies=[strategy]))
    scenarios = [sc.load(p) for p in paths]
    work = tmp_path / "cluster"
    work.mkdir()
    with dist.local_cluster(1, work) as cluster:
        summaries = dist.cluster_sweep([*scenarios, scenarios[0]], tmp_path / "store", cluster.address,
                                       progress=False)
    assert [name for name, _ in summaries] == ["establishment"] * 3
    again = summaries[2][1]
    assert (again.planned, again.skipped, again.elsewhere, again.done) == (2, 2, 0, {}), again.line()
    for s, (_, summary) in zip(scenarios, summaries):
        ids = {spec.run_id for spec in sc.expand(s)}
        assert (summary.planned, summary.done) == (2, {"complete": 2}), summary.line()
        assert {d.name for d in summary.run_dirs} == ids


def test_report_flags_results_mixed_from_machines_with_different_kernels(tmp_path):
    from types import SimpleNamespace

    from analysis.report import provenance

    def rows(*releases):
        mans = {f"r{i}": {"kernel": {"release": r}} for i, r in enumerate(releases)}
        return dict(provenance(SimpleNamespace(root=tmp_path, manifests=mans)))

    assert rows("6.18.0", "6.18.0")["kernel"] == "6.18.0"
    mixed = rows("6.18.0", "6.12.48", "6.18.0")["kernel"]
    assert mixed.startswith("MIXED") and "6.12.48 (1 runs)" in mixed and "6.18.0 (2 runs)" in mixed
