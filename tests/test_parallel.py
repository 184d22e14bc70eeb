"""`--parallel K` on one machine: K lanes sweep one store at once, each run
stored once with its calibration verdict, every testbed of every lane removed
at the end and on SIGINT/SIGTERM; K beyond the measured bound refused at load."""
from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import ROOT, assert_one_line_error, default_sigint, establishment_sweep, run_tb
from testbed.base.errors import TestbedError
from testbed.core.state import STATE_DIR, alive, namespace_members
from testbed.harness import parallel
from testbed.harness import scenario as sc
from testbed.harness.scenario import Scenario
from testbed.harness.runner import SweepSummary
from testbed.tools.bench.chaos import footprint


def _scenario(tmp_path: Path, reps: int = 1) -> Path:
    path = tmp_path / "parallel.toml"
    # Calibrated, so each lane's testbed is calibrated while the other lane runs.
    path.write_text(establishment_sweep(calibrate=True, trial_timeout_s=3, strategies=["tcp", "sim"],
                                        repetitions=reps))
    return path


def _manifests(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "establishment").glob("*/manifest.json"))]


class Recorded:
    """The state records of our lanes' testbeds, read while they live: their
    processes and namespaces (other people's testbeds on this machine are left
    out of the leak check; they come and go on their own)."""

    def __init__(self, before: dict) -> None:
        self.before = before
        self.records: dict[str, dict] = {}

    def poll(self) -> set[str]:
        """Read every state file that appeared since `before`; their names."""
        for path in STATE_DIR.glob("run-*.json") if STATE_DIR.exists() else []:
            if path.name not in self.before["state files"]:
                try:
                    self.records[path.name] = json.loads(path.read_text())
                except (OSError, ValueError):
                    pass  # gone or being replaced: read again next time
        return set(self.records)

    def watch(self, proc: subprocess.Popen) -> None:
        """Poll until proc ends."""
        while proc.poll() is None:
            self.poll()
            time.sleep(0.02)

    def assert_nothing_left(self, out: Path) -> None:
        """No process or namespace our testbeds recorded, no state file of theirs,
        the host's interfaces, qdiscs and nft tables as before, no half-written run."""
        assert self.records, "no testbed recorded: the check would prove nothing"
        pids = [p for r in self.records.values() for p in r["pids"]]
        netns = [n for r in self.records.values() for n in r["netns"]]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (namespace_members(pids, netns)
                                               or any(alive(*p) for p in pids)):
            time.sleep(0.2)
        assert not namespace_members(pids, netns), "processes left in our namespaces"
        assert not [p for p in pids if alive(*p)], "recorded processes left running"
        assert not [n for n in self.records if (STATE_DIR / n).exists()], "state files left"
        after = footprint()
        for key in ("host interfaces", "qdiscs", "nft tables"):
            assert after[key] == self.before[key], f"{key}: {after[key] ^ self.before[key]}"
        assert not list((out / "establishment").glob(".tmp-*")), "half-written run left"


@contextlib.contextmanager
def _parallel_run(scenario: Path, out: Path) -> Iterator[subprocess.Popen]:
    """`./tb run SCENARIO --parallel 2` as a process (killed at the end if still running)."""
    invoke = Path(sys.executable).parent / "invoke"
    # Ctrl-C as at a terminal: a test run started in the background inherits SIGINT ignored.
    proc = subprocess.Popen([str(invoke), "run", str(scenario), "--parallel", "2", "--out", str(out),
                             "--no-progress"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- no namespaces ------------------------------------------------------------

@pytest.mark.parametrize("k", [0, parallel.MAX_PARALLEL + 1])
def test_k_outside_the_measured_bound_is_refused_in_one_line(k):
    with pytest.raises(TestbedError, match=f"--parallel: must be 1..{parallel.MAX_PARALLEL}"):
        parallel.check_parallel(k)


def test_cli_refuses_k_beyond_the_bound_before_anything_runs(tmp_path):
    res = run_tb("run", str(_scenario(tmp_path)), "--parallel", str(parallel.MAX_PARALLEL + 1),
                 "--out", str(tmp_path / "out"))
    assert res.returncode == 2
    assert_one_line_error(res, "--parallel: must be 1..")
    assert not (tmp_path / "out").exists()


def test_an_experiment_gets_at_most_its_measured_lanes(tmp_path):
    est = sc.load(_scenario(tmp_path))
    thr = sc.load(ROOT / "experiments" / "throughput.toml")
    assert parallel.lanes_for(est, 3) == 3
    assert parallel.lanes_for(est, 1) == 1
    from testbed.harness.experiment import experiment_class
    assert parallel.lanes_for(thr, parallel.MAX_PARALLEL) == experiment_class("throughput").max_parallel


def test_an_experiment_held_below_k_says_so_and_runs_one_at_a_time(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(parallel, "sweep", lambda s, root, **kw: calls.append(s) or SweepSummary())
    priv = sc.load(ROOT / "experiments" / "privacy.toml")
    [(experiment, _)] = parallel.parallel_sweep([priv], tmp_path, 3, progress=False)
    assert experiment == "privacy" and calls == [priv]  # in this process, no lanes
    assert "note: privacy: 1 run(s) at once" in capsys.readouterr().err


def test_lanes_start_on_testbed_identities_of_their_own():
    """Each lane walks the identity groups from a group of its own, wrapping
    around: every run in each lane's walk, each group kept together."""
    from testbed.harness.runner import lane_walk
    keys = ["a", "a", "a", "b", "b", "c", "c", "c", "d"]
    assert lane_walk(keys) == list(range(9))
    walks = [lane_walk(keys, lane, 2) for lane in range(2)]
    assert [keys[w[0]] for w in walks] == ["a", "c"]
    assert walks[1] == [5, 6, 7, 8, 0, 1, 2, 3, 4]
    for lanes in (2, 3, 4, 6):
        for lane in range(lanes):
            assert sorted(lane_walk(keys, lane, lanes)) == list(range(9))
    assert len({keys[lane_walk(keys, lane, 4)[0]] for lane in range(4)}) == 4
    assert lane_walk([], 1, 2) == []


class _LanesInTurn:
    """A lane pool whose lanes run one after the other in this process: the
    worst case for lanes that plan on their own (the last one comes when the
    others have stored everything)."""
    k = 2

    def submit(self, *args):
        from concurrent.futures import Future
        done = Future()
        done.set_result(parallel._lane(*args))
        return done


def _store_as(root: Path, experiment: str, run_id: str, status: str) -> Path:
    """Store a run the way the store does: a new directory renamed into place."""
    import shutil
    final = root / experiment / run_id
    tmp = root / experiment / f".tmp-{run_id}"
    tmp.mkdir(parents=True)
    (tmp / "manifest.json").write_text(json.dumps({"status": status, "run_id": run_id}))
    if final.exists():
        old = root / experiment / f".old-{run_id}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    return final


def test_lanes_take_only_what_the_sweep_planned_and_count_each_run_once(tmp_path, monkeypatch):
    """--retry-failed over a group of scenarios: every failed run is run once more,
    not once per lane that reaches it after another lane stored it failed again;
    a run two scenarios of the group share is run once and counted as stored by
    the second, as a serial sweep counts it."""
    from testbed.harness import runner

    path = tmp_path / "small.toml"
    path.write_text(establishment_sweep(calibrate=False, trial_timeout_s=3, strategies=["tcp", "sim"],
                                        repetitions=2))
    first = sc.load(path)
    second = sc.load(path)  # the same runs again, as the paper's quick-only eSIM entry shares one
    out = tmp_path / "out"
    ids = [s.run_id for s in sc.expand(first)]
    for run_id in ids:
        _store_as(out, "establishment", run_id, "failed")
    calls = []

    def run_one(spec, root, pool=None):
        calls.append(spec.run_id)
        return _store_as(root, spec.scenario.experiment, spec.run_id, "failed")

    monkeypatch.setattr(runner, "run_one", run_one)
    summaries = parallel.sweep_many_in_lanes(_LanesInTurn(), [first, second], out, 2,
                                             retry_failed=True, progress=False)
    assert sorted(calls) == sorted(ids), calls
    assert [s.done for s in summaries] == [{"failed": len(ids)}, {}]
    assert [(s.planned, s.skipped, s.elsewhere) for s in summaries] == [
        (len(ids), 0, 0), (len(ids), len(ids), 0)]


def test_a_lane_that_fails_stops_the_sweep_at_once(tmp_path, monkeypatch):
    """A lane's error ends the sweep within a poll, the other lanes stopped, and
    does not wait for them to finish their scenarios first."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "small.toml"
    path.write_text(establishment_sweep(calibrate=False, trial_timeout_s=3, strategies=["tcp"]))
    stopped = threading.Event()

    class Lanes:
        k = 2

        def __init__(self) -> None:
            self.pool = ThreadPoolExecutor(2)
            self.lanes = 0

        def submit(self, *args):
            lane = self.lanes
            self.lanes += 1
            if lane == 1:
                return self.pool.submit(lambda: (_ for _ in ()).throw(RuntimeError("lane 1 broke")))
            # Lane 0 would sweep for a long while; it ends early only when stopped.
            return self.pool.submit(lambda: [SweepSummary()] if stopped.wait(30) else [SweepSummary()])

    # These lanes are threads: stopping one is the event (lane processes get SIGINT).
    stop_lanes = parallel._stop_lanes
    monkeypatch.setattr(parallel, "_stop_lanes", lambda futures: (stopped.set(), stop_lanes(futures)))
    lanes = Lanes()
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="lane 1 broke"):
        try:
            parallel.sweep_many_in_lanes(lanes, [sc.load(path)], tmp_path / "out", 2, progress=False)
        finally:
            waited = time.monotonic() - started
            stopped.set()
            lanes.pool.shutdown()
    assert waited < 5 * parallel.POLL_S + 1, waited


# ---- namespaces ----------------------------------------------------------------

@pytest.mark.root
def test_parallel_sweep_stores_each_run_once_and_leaves_nothing(tmp_path):
    recorded = Recorded(footprint())
    out = tmp_path / "out"
    t0 = time.monotonic()
    with _parallel_run(_scenario(tmp_path), out) as proc:
        recorded.watch(proc)
        stdout, stderr = proc.communicate(timeout=180)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, stdout + stderr
    assert "4 runs planned, 0 already stored" in stdout, stdout
    manifests = _manifests(out)
    assert sorted(m["run_id"] for m in manifests) == sorted(
        s.run_id for s in sc.expand(sc.load(_scenario(tmp_path))))  # each run once
    # Two lanes, two testbeds, each named after its own process.
    lanes = {m["testbed"]["run_id"].rsplit("-", 1)[1] for m in manifests}
    assert len(lanes) == 2, lanes
    for m in manifests:
        calibration = m["emulation"]["calibration"]
        assert calibration is not None and "valid" in calibration, m["run_id"]
        assert m["emulation"]["run"]["judged"] and "valid" in m["emulation"]["run"]
        assert m["status"] == "complete" or "calibration" in m["reason"] \
            or "drift" in m["reason"] or "emulation" in m["reason"], m["reason"]
    # Runs of different lanes overlapped: they really ran at once.
    busy = sum(m["duration_s"] for m in manifests)
    assert wall < busy + 30, (wall, busy)
    recorded.assert_nothing_left(out)


@pytest.mark.root
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_interrupted_parallel_sweep_removes_every_lanes_testbed(tmp_path, sig):
    recorded = Recorded(footprint())
    out = tmp_path / "out"
    with _parallel_run(_scenario(tmp_path, reps=3), out) as proc:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # both lanes have a testbed up and a run under way
            new = recorded.poll()
            partial = list((out / "establishment").glob(".tmp-*")) if out.exists() else []
            if len(new) >= 2 and partial:
                break
            time.sleep(0.05)
        else:
            pytest.fail("never caught both lanes mid-run")
        proc.send_signal(sig)
        recorded.watch(proc)
        _, err = proc.communicate(timeout=90)
    assert proc.returncode == (130 if sig == signal.SIGINT else 128 + sig), err
    assert "Traceback" not in err, err
    stored = _manifests(out)
    assert len(stored) < 12, "the interrupt came after the sweep"
    assert len({m["run_id"] for m in stored}) == len(stored)
    recorded.assert_nothing_left(out)


def test_a_campaign_runs_latency_bound_experiments_beside_the_one_at_a_time_ones(tmp_path, monkeypatch):
    """The bulk scenarios go, in order, to one lane of their own; establishment
    runs beside them with at most its overlap_lanes; summaries in campaign order."""
    from concurrent.futures import Future

    chains, beside = [], []

    class Pool:
        def submit_chain(self, scenarios, root, retry_failed):
            chains.append([s.experiment for s in scenarios])
            done = Future()
            done.set_result([SweepSummary(planned=i + 1) for i in range(len(scenarios))])
            return done

    @contextlib.contextmanager
    def pool(k):
        yield Pool()

    from experiments.establishment import Establishment

    # Off in the paper (measured: docs/performance.md); the mechanism as if allowed.
    monkeypatch.setattr(Establishment, "overlap_lanes", 1)
    monkeypatch.setattr(parallel, "lane_pool", pool)
    monkeypatch.setattr(parallel, "sweep_in_lanes", lambda pool, s, root, n, *a: beside.append(
        (s.experiment, n)) or SweepSummary(planned=100))
    monkeypatch.setattr(parallel, "sweep_many_in_lanes", lambda pool, group, root, n, *a: [
        beside.append((s.experiment, n)) or SweepSummary(planned=100) for s in group])
    monkeypatch.setattr(parallel, "sweep", lambda *a, **kw: pytest.fail("nothing runs in this process"))
    est = sc.load(ROOT / "experiments" / "robe-establishment.toml")
    user = sc.load(ROOT / "experiments" / "robe-user.toml")  # some runs on the user-space stack
    priv = sc.load(ROOT / "experiments" / "privacy.toml")  # one run at a time
    state = sc.load(ROOT / "experiments" / "inactivity-state.toml")  # 1,000 connections: alone
    out = parallel.parallel_sweep([est, priv, user, state], tmp_path, 6, progress=False)
    assert chains == [["privacy", "inactivity"]]
    # the user-stack scenario first, alone at its cap; then kernel establishment beside the chain
    from experiments.establishment import USER_STACK_LANES
    assert beside == [("establishment", USER_STACK_LANES), ("establishment", 1)]
    assert [s.planned for e, s in out] == [100, 1, 100, 2]
    chains.clear(), beside.clear()  # without overlap: as before, establishment at its cap
    monkeypatch.setattr(parallel, "sweep", lambda s, root, **kw: SweepSummary(planned=7))
    out = parallel.parallel_sweep([est, priv], tmp_path, 6, progress=False, overlap=False)
    assert chains == [] and beside == [("establishment", 6)]


def test_user_stack_establishment_gets_fewer_lanes_kernel_sockets_keep_six():
    """Runs with the user-space stack on a side are CPU-bound on this 2-core machine: a scenario
    with any such grid point gets USER_STACK_LANES; kernel-socket establishment keeps its 6."""
    from experiments.establishment import USER_STACK_LANES
    kernel = sc.load(ROOT / "experiments" / "robe-establishment.toml")
    for name in ("robe-user.toml", "robe-esim.toml"):
        assert parallel.lanes_for(sc.load(ROOT / "experiments" / name), parallel.MAX_PARALLEL) == USER_STACK_LANES
    assert parallel.lanes_for(kernel, 6) == 6
    assert 1 <= USER_STACK_LANES < 6



@pytest.mark.root
def test_two_lanes_keep_a_testbed_each_across_two_identities(tmp_path):
    """Two testbed identities, three runs each, two lanes: each lane builds for
    one identity and reuses it, rather than both lanes taking turns in one
    identity and building a testbed for nearly every run."""
    path = tmp_path / "two-identities.toml"
    path.write_text(establishment_sweep(calibrate=False, trial_timeout_s=3, strategies=["tcp"],
                                        repetitions=3).replace(
        '"params.condition" = ["healthy", "blackhole"]',
        '"params.condition" = ["healthy"]\n"topology.params.lte_delay_ms" = [20, 30]'))
    out = tmp_path / "out"
    with _parallel_run(path, out) as proc:
        stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stdout + stderr
    manifests = _manifests(out)
    assert len(manifests) == 6
    reused = sum(bool(m["testbed_reuse"]["reused"]) for m in manifests)
    assert reused >= 3, [(m["testbed"]["run_id"], m["testbed_reuse"]) for m in manifests]
    # Each lane (its PID ends the testbed's run id) began on an identity of its own.
    first: dict[str, tuple[int, int]] = {}
    for m in manifests:
        lane = m["testbed"]["run_id"].rsplit("-", 1)[1]
        began = (m["clock"]["t0_ns"], m["scenario"]["topology"]["params"]["lte_delay_ms"])
        first[lane] = min(first.get(lane, began), began)
    assert len({delay for _, delay in first.values()}) == 2, first


@pytest.mark.root
def test_consecutive_scenarios_with_the_same_lanes_run_without_a_gap(tmp_path):
    """Two scenarios at two lanes each, three runs each: a lane that is done with
    its share of the first goes on to the second while the other lane finishes
    the first's last run, instead of idling until the first scenario ends."""
    def scenario(name: str, seed: int) -> Scenario:
        path = tmp_path / f"{name}.toml"
        path.write_text(establishment_sweep(calibrate=False, trial_timeout_s=3, strategies=["tcp"],
                                            repetitions=3)
                        .replace("seed = 5", f"seed = {seed}")
                        .replace('"params.condition" = ["healthy", "blackhole"]',
                                 '"params.condition" = ["blackhole"]'))
        return sc.load(path)  # runs of ~1-3 s: long against a lane's start-up


    first, second = scenario("first", 5), scenario("second", 6)
    out = tmp_path / "out"
    summaries = parallel.parallel_sweep([first, second], out, 2, progress=False)
    assert [sum(s.done.values()) for _e, s in summaries] == [3, 3]
    runs = {m["run_id"]: m for m in _manifests(out)}
    ids = [[s.run_id for s in sc.expand(x)] for x in (first, second)]
    assert sorted(runs) == sorted(ids[0] + ids[1])
    first_end = max(runs[i]["end"] for i in ids[0])
    second_start = min(runs[i]["start"] for i in ids[1])
    assert second_start < first_end, (second_start, first_end)


def test_inactivity_state_runs_with_a_thousand_connections_go_one_at_a_time():
    """The quick state runs (20-50 connections) were measured two at a time; the
    full ones (up to 1,000 idle connections) were not, and run alone."""
    from testbed.harness import campaign as cp

    plan = cp.load(cp.PAPER)
    for quick, lanes in ((True, 2), (False, 1)):
        [state] = [s for e, s in plan.entries(quick) if e.file == "inactivity-state.toml"]
        assert parallel.lanes_for(state, 6) == lanes
    resume = sc.load(ROOT / "experiments" / "inactivity.toml")
    assert parallel.lanes_for(resume, 6) == 2
    from experiments.inactivity import Inactivity
    for stack, measured in (("user", 20), ("kernel", 50)):
        state = {"mode": "state", "server_stack": stack}
        assert Inactivity.max_parallel_for({**state, "connections": measured}) == 2
        assert Inactivity.max_parallel_for({**state, "connections": measured + 1}) == 1
