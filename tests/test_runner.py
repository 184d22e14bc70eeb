"""The runner and results store: provenance, atomicity, resumption, bad input."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT, assert_one_line_error, run_tb
from testbed.core.net import NAMESPACE_SYSCTLS
from testbed.core.state import STATE_DIR
from testbed.harness import scenario as sc
from testbed.harness.runner import PhaseClock, sweep
from testbed.harness import schema as sc_schema
from testbed.harness.schema import PHASES

FAST = textwrap.dedent("""
    experiment = "throughput"
    repetitions = {reps}
    seed = 4
    timeout_s = 60
    backend = "bridge"
    calibrate = false
    probes = ["pm_events", "nstat"]
    [topology]
    name = "two-path"
    params = {{ rate_mbit = 20, wifi_delay_ms = 0, lte_delay_ms = 0 }}
    [params]
    seconds = 2
    [grid]
    "params.direction" = ["up", "down"]
""")

MANIFEST_KEYS = {"schema_version", "experiment", "run_id", "scenario", "params", "repetition",
                 "seed", "git", "kernel", "host", "tools", "testbed", "emulation", "qdiscs",
                 "status", "reason", "start", "end", "duration_s", "clock", "probes", "phases"}


def write(tmp_path: Path, body: str, name: str = "s.toml") -> Path:
    f = tmp_path / name
    f.write_text(body)
    return f


@pytest.mark.parametrize("body, needle", [
    ('experiment = "nope"\n[topology]\nname = "two-path"\n', "unknown experiment type 'nope'"),
    ('experiment = "throughput"\ncolour = 1\n[topology]\nname = "two-path"\n', "colour: unknown key"),
    ('experiment = "throughput"\nrepetitions = "x"\n[topology]\nname = "two-path"\n', "repetitions"),
    ('experiment = "throughput"\n[topology]\nname = "two-path"\n[params]\nseconds = "x"\n', "seconds"),
    ('experiment = "throughput"\n[topology]\nname = "two-path"\n[grid]\n"params.nope" = [1]\n',
     "grid.params.nope: no such parameter"),
    ('experiment = "throughput"\n[topology]\nname = "mesh"\n', "unknown topology 'mesh'"),
    ('experiment = "throughput"\n[topology\nname = "two-path"\n', "malformed TOML"),
    ('experiment = "throughput"\n[topology]\nname = "two-path"\n[[events]]\nat_s = 1\naction = "explode"\npath = "wifi"\n',
     "events.0.action"),
])
def test_bad_scenarios_fail_before_anything_starts(tmp_path, body, needle):
    proc = run_tb("run", str(write(tmp_path, body)), "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "out").exists(), "nothing may be written for an invalid scenario"


def test_grid_expansion_is_seeded_and_complete(tmp_path):
    s = sc.load(write(tmp_path, FAST.format(reps=3)))
    a, b = sc.expand(s), sc.expand(s)
    assert [x.run_id for x in a] == [x.run_id for x in b]
    assert len({x.run_id for x in a}) == 6
    assert {x.params["params.direction"] for x in a} == {"up", "down"}


@pytest.mark.root
def test_run_writes_manifest_tables_and_metrics(tmp_path):
    s = sc.load(write(tmp_path, FAST.format(reps=1)))
    summary = sweep(s, tmp_path / "out", progress=False)
    assert summary.done == {"complete": 2}
    for run_dir in summary.run_dirs:
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert MANIFEST_KEYS <= set(manifest), MANIFEST_KEYS - set(manifest)
        assert manifest["status"] == "complete"
        phases = manifest["phases"]  # where the run's wall time went, in the schema's order
        assert list(phases) == [p for p in PHASES if p in phases]
        assert {"prepare", "build", "probes_up", "workload", "collect", "teardown", "store"} <= set(phases)
        assert phases["workload"] >= 2.0  # seconds = 2: the transfer itself
        assert sum(v for k, v in phases.items() if k != "store") <= manifest["duration_s"] + 0.01
        assert sum(phases.values()) >= 0.9 * manifest["duration_s"]
        assert manifest["git"]["commit"] and "dirty" in manifest["git"]
        assert manifest["kernel"]["release"]
        sysctls = manifest["testbed"]["hosts"]["client"]["sysctls"]
        assert sysctls["net.mptcp.blackhole_timeout"] == "0"
        buffers = manifest["namespace_sysctls"]  # pinned in every node's namespace, not the host's
        assert set(buffers["nodes"]) == {"c", "s", "r", "x1", "x2"}
        for node in buffers["nodes"].values():
            assert node["net.ipv4.tcp_rmem"].split() == NAMESPACE_SYSCTLS["net.ipv4.tcp_rmem"].split()
            assert node["net.ipv4.tcp_wmem"].split() == NAMESPACE_SYSCTLS["net.ipv4.tcp_wmem"].split()
        assert buffers["host_wide"]["net.core.netdev_max_backlog"].isdigit()
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["sha256_match"] is True and metrics["subflows_max"] == 2
        assert metrics["client.MPTcpExtMPCapableSYNTX"] == 1
        assert (run_dir / "events.parquet").exists() and (run_dir / "timeseries.parquet").exists()


KILLABLE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from testbed.harness import scenario as sc
    from testbed.harness.runner import sweep
    sweep(sc.load(sys.argv[1]), Path(sys.argv[2]), progress=False)
""")


def _testbed_of(pid: int) -> Path | None:
    """The state file of the testbed process pid holds up, if any."""
    for f in STATE_DIR.glob("*.json"):
        try:
            if json.loads(f.read_text())["owner"][0] == pid:
                return f
        except (OSError, ValueError, KeyError):
            pass  # being replaced, or another writer's
    return None


@pytest.mark.root
@pytest.mark.slow
def test_sweep_killed_with_sigkill_resumes_each_run_exactly_once(tmp_path):
    scenario = write(tmp_path, FAST.format(reps=2))
    out = tmp_path / "out"
    assert run_tb("clean").returncode == 0  # earlier crashed runs' leftovers: not this test's count
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(scenario), str(out)], cwd=ROOT)
    deadline = time.time() + 90

    def mid_run() -> bool:
        """A run is stored, the next one is being written (a .tmp- directory
        exists) and its testbed is up (a state file of this runner)."""
        done = list((out / "throughput").glob("*-r*/manifest.json")) if out.exists() else []
        partial = list((out / "throughput").glob(".tmp-*")) if out.exists() else []
        return bool(done and partial and _testbed_of(proc.pid) is not None)

    try:
        # Frozen (SIGSTOP) before the check that decides the kill, so the run
        # cannot finish between the check and the kill.
        while time.time() < deadline:
            if mid_run():
                proc.send_signal(signal.SIGSTOP)
                if mid_run():
                    break
                proc.send_signal(signal.SIGCONT)
            time.sleep(0.02)
        else:
            pytest.fail("never caught the runner mid-run")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        res = run_tb("clean")  # the killed runner's namespaces and processes, also on failure
    stored = len(list((out / "throughput").glob("*-r*/manifest.json")))
    assert list((out / "throughput").glob(".tmp-*")), "the kill did not land mid-run"
    assert res.returncode == 0 and "removed 1 crashed run" in res.stdout, res.stdout + res.stderr
    summary = sweep(sc.load(scenario), out, progress=False)
    assert summary.skipped == stored and summary.done == {"complete": 4 - stored}
    run_dirs = [d for d in (out / "throughput").iterdir()]
    assert not [d for d in run_dirs if d.name.startswith(".tmp-")], "half-written run left"
    ids = sorted(d.name for d in run_dirs)
    assert ids == sorted({x.run_id for x in sc.expand(sc.load(scenario))})
    statuses = [json.loads((d / "manifest.json").read_text())["status"] for d in run_dirs]
    assert statuses == ["complete"] * 4


@pytest.mark.root
def test_failed_run_is_stored_as_failed_and_retried_on_request(tmp_path):
    body = FAST.format(reps=1).replace('"params.direction" = ["up", "down"]', "") + \
        '\n[[events]]\nat_s = 0\naction = "set_link"\npath = "wifi"\nchanges = { delay_ms = 5 }\n'
    s = sc.load(write(tmp_path, body))
    out = tmp_path / "out"
    first = sweep(s, out, progress=False)  # the bridge backend refuses a delay: a failed run
    assert first.done == {"failed": 1}
    manifest = json.loads((first.run_dirs[0] / "manifest.json").read_text())
    assert "bridge" in manifest["reason"] and manifest["status"] == "failed"
    [applied] = manifest["applied_events"]  # the failed change is stored with its error
    assert not applied["ok"] and "bridge" in applied["error"] and applied["action"] == "set_link"
    assert sweep(s, out, progress=False).skipped == 1
    assert sweep(s, out, retry_failed=True, progress=False).done == {"failed": 1}


@pytest.mark.root
def test_a_probe_failing_to_start_fails_the_run_and_stops_the_others(tmp_path, monkeypatch):
    from testbed.harness import probes

    stopped = []

    class Ok(probes.Probe):
        name = "ok"

        def start(self, tb, run_dir, t0_ns):
            pass

        def stop(self):
            stopped.append(self.name)

    class Broken(Ok):
        name = "broken"

        def start(self, tb, run_dir, t0_ns):
            raise RuntimeError("probe broke")

    monkeypatch.setattr(probes, "get", lambda name, **kw: {"ok": Ok, "broken": Broken}[name]())
    monkeypatch.setattr(probes, "available", lambda: {"ok": "", "broken": ""})  # known at load
    body = FAST.format(reps=1).replace('probes = ["pm_events", "nstat"]', 'probes = ["ok", "broken"]')
    body = body.replace('"params.direction" = ["up", "down"]', "")
    summary = sweep(sc.load(write(tmp_path, body)), tmp_path / "out", progress=False)
    manifest = json.loads((summary.run_dirs[0] / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "probe broke" in manifest["reason"]
    assert stopped == ["ok"]


BASE = ('experiment = "throughput"\nbackend = "bridge"\n[topology]\nname = "two-path"\n'
        '[params]\nseconds = 2\n')
SET_LINK = '[[events]]\nat_s = 1\naction = "set_link"\npath = "wifi"\nchanges = {{ {} }}\n'


def _big_grid() -> str:
    seconds = ", ".join(str(2 + i / 100) for i in range(200))
    rates = ", ".join(str(1 + i) for i in range(200))
    return f'[grid]\n"params.seconds" = [{seconds}]\n"topology.params.rate_mbit" = [{rates}]\n'


@pytest.mark.parametrize("body, args, needles", [
    (BASE.replace('backend = "bridge"\n', 'probes = ["pm_events", "nope"]\n'), [],
     ["probes.1", "unknown probe 'nope'"]),
    (BASE.replace('"bridge"', '"warp"'), [], ["backend", "'warp'"]),
    (BASE + '[hosts.client]\nscheduler = "fastest"\n', [], ["hosts.client.scheduler", "'fastest'"]),
    (BASE + '[hosts.server]\ncongestion_control = "bbr"\n', [],
     ["hosts.server.congestion_control", "hosts.client.congestion_control", "both ends"]),
    (BASE + '[[events]]\nat_s = 1\naction = "link_down"\npath = "dsl"\n', [],
     ["events.0.path", "'dsl'", "wifi, lte"]),
    (BASE + '[[events]]\nat_s = 1\naction = "blackhole"\npath = "bottleneck"\n', [],
     ["events.0.path", "bottleneck"]),
    (BASE + SET_LINK.format("loss_pct = 500"), [], ["events.0.changes.loss_pct", "100"]),
    (BASE + SET_LINK.format("mtu = 1"), [], ["events.0.changes", "mtu"]),
    ('timeout_s = inf\n' + BASE, [], ["timeout_s", "86400"]),
    (BASE + '[[events]]\nat_s = inf\naction = "link_down"\npath = "wifi"\n', [],
     ["events.0.at_s", "86400"]),
    (BASE.replace('name = "two-path"', 'name = "two-path"\nparams = { rate_mbit = 0.0001 }'), [],
     ["rate_mbit", "0.01"]),
    (BASE.replace('name = "two-path"', 'spec = { paths = [{ name = "a", rate_mbit = 100000, '
                  'delay_ms = 10000, queue_bdp = 100 }] }'), [], ["paths.0", "queue", "1000000"]),
    (BASE.replace('name = "two-path"', 'name = "n-path"\nparams = { n = "abc" }'), [], ["n-path", "n:"]),
    (BASE.replace('name = "two-path"', 'name = "n-path"\nparams = { n = 2.9 }'), [], ["n-path", "n:"]),
    (BASE + '[[events]]\nat_s = 1\naction = "link_down"\npath = "wifi"\n',
     ["--set", "events.3.at_s=1"], ["events.3", "1 entr"]),
    (BASE + _big_grid(), [], ["grid", "40000", "10000"]),
])
def test_bad_input_is_refused_at_load_in_one_line(tmp_path, body, args, needles):
    proc = run_tb("run", str(write(tmp_path, body)), "--out", str(tmp_path / "out"), *args)
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "out").exists(), "nothing may be written for an invalid scenario"


def test_set_link_changes_are_checked_against_the_path_they_change(tmp_path):
    ok = sc.load(write(tmp_path, BASE + SET_LINK.format("queue_pkts = 10, loss_pct = 1")))
    assert ok.events[0].changes.queue_pkts == 10
    # the path's own queue_bdp plus a queue_pkts change would give the link both
    body = BASE.replace('name = "two-path"', 'spec = { paths = [{ name = "wifi", queue_bdp = 2 }] }')
    with pytest.raises(sc.TestbedError, match=r"events\.0\.changes: .*queue_pkts or queue_bdp"):
        sc.load(write(tmp_path, body + SET_LINK.format("queue_pkts = 10"), "b.toml"))
    # a later event sees the link as the earlier ones left it
    two = SET_LINK.format("loss_pct = 1") + SET_LINK.format("gilbert = { p_pct = 1, r_pct = 50 }")
    with pytest.raises(sc.TestbedError, match=r"events\.1\.changes: .*loss_pct or gilbert"):
        sc.load(write(tmp_path, BASE + two, "c.toml"))


@pytest.mark.root
def test_a_sysctl_the_kernel_refuses_is_named_with_its_value(tmp_path):
    # Within the model's range (a C int), but the kernel stores it in jiffies and refuses.
    body = FAST.format(reps=1).replace('"params.direction" = ["up", "down"]', "")
    body = body.replace("[params]", "[hosts.client]\nadd_addr_timeout = 2147483647\n[params]")
    summary = sweep(sc.load(write(tmp_path, body)), tmp_path / "out", progress=False)
    manifest = json.loads((summary.run_dirs[0] / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert "net.mptcp.add_addr_timeout = 2147483647" in manifest["reason"], manifest["reason"]


def test_phase_clock_adds_up_in_schema_order():
    clock = PhaseClock()
    clock.begin("build")
    time.sleep(0.05)
    clock.begin("workload")
    time.sleep(0.02)
    clock.begin("build")  # a phase entered again adds up
    time.sleep(0.05)
    clock.end()
    record = clock.record()
    assert list(record) == ["build", "workload"]
    assert record["build"] >= 0.1 and 0.02 <= record["workload"] < 0.1
    with pytest.raises(ValueError, match="unknown phase"):
        clock.begin("lunch")


def test_bench_harness_breaks_a_store_down_by_phase(tmp_path):
    from testbed.tools.bench.harness import breakdown

    def stored(experiment, run_id, calibrate, phases):
        run = tmp_path / "store" / experiment / run_id
        run.mkdir(parents=True)
        (run / "manifest.json").write_text(json.dumps({
            "schema_version": sc_schema.SCHEMA_VERSION, "experiment": experiment,
            "run_id": run_id, "scenario": {"calibrate": calibrate}, "params": {},
            "repetition": 0, "seed": 1, "status": "complete", "reason": "", "phases": phases}))
        (run / "metrics.json").write_text("{}")

    stored("establishment", "a-r000", False, {"build": 0.1, "workload": 3.0, "teardown": 0.1})
    stored("throughput", "b-r000", True, {"build": 0.5, "calibrate": 1.5, "workload": 10.0})
    text, ok = breakdown(tmp_path / "store")
    rows = {line.split()[0]: line for line in text.splitlines()}
    assert rows["establishment"].split()[-3:] == ["0.3", "meets", "target"]
    assert "0.200" in rows["establishment"]  # overhead: build + teardown
    assert rows["throughput"].endswith("MISSES target") and "2.000" in rows["throughput"]
    assert not ok



@pytest.mark.root
def test_an_experiments_protocol_choices_are_stored_in_the_manifest(tmp_path):
    """RunOutput.protocol reaches the stored manifest as `protocol` (a stub experiment, real sweep)."""
    from testbed.harness.experiment import EXPERIMENTS, Experiment, ExperimentParams, RunOutput

    class StubParams(ExperimentParams):
        """No parameters."""

    class ProtocolStub(Experiment):
        """Reports protocol choices and nothing else."""
        name = "protocol-stub"
        description = "test stub"
        Params = StubParams

        def run(self, ctx):
            """Report a choice."""
            ctx.start_clock()
            return RunOutput(metrics={"x": 1}, protocol={"option": {"code": "0xf/2", "length": 5}})

    if "protocol-stub" not in EXPERIMENTS.available():
        EXPERIMENTS.register(ProtocolStub)
    body = FAST.replace('experiment = "throughput"', 'experiment = "protocol-stub"').replace(
        '[params]\nseconds = 2\n[grid]\n"params.direction" = ["up", "down"]\n', "")
    summary = sweep(sc.load(write(tmp_path, body.format(reps=1))), tmp_path / "out", progress=False)
    assert summary.done == {"complete": 1}, summary
    manifest = json.loads((summary.run_dirs[0] / "manifest.json").read_text())
    assert manifest["protocol"] == {"option": {"code": "0xf/2", "length": 5}}


@pytest.mark.root
@pytest.mark.parametrize("late_attempts, retries, status, voided", [
    (1, 1, "complete", 1),   # the re-run stands; the voided attempt is listed
    (2, 1, "invalid", 1),    # out of retries: stored invalid, with the attempt before it
    (1, 0, "invalid", 0),    # void_retries = 0: the first verdict stands
])
def test_a_run_the_emulator_voided_is_run_again_and_says_so(tmp_path, monkeypatch,
                                                            late_attempts, retries, status, voided):
    from testbed.harness import runner

    real, calls = runner.judge_run, []

    def late(before, after):  # the emulator's verdict over the run, late for the first attempts
        calls.append(1)
        verdict = real(before, after)
        if len(calls) <= late_attempts:
            return {**verdict, "valid": False, "reason": "link wifi: 0.20 % of frames late (bound 0.1 %)"}
        return verdict

    monkeypatch.setattr(runner, "judge_run", late)
    body = f"void_retries = {retries}\n" + FAST.format(reps=1).replace('"params.direction" = ["up", "down"]', "")
    s = sc.load(write(tmp_path, body))
    summary = sweep(s, tmp_path / "out", progress=False)
    assert summary.done == {status: 1}
    assert len(calls) == voided + 1
    [run_dir] = summary.run_dirs
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == status
    attempts = manifest.get("voided_attempts", [])
    assert len(attempts) == voided
    for attempt in attempts:
        assert attempt["reason"] == "emulation during the run: link wifi: 0.20 % of frames late (bound 0.1 %)"
        assert attempt["start"] and attempt["end"]
    assert manifest.get("voided_by_testbed", False) is (status == "invalid")
    assert [d.name for d in (tmp_path / "out" / "throughput").iterdir()] == [run_dir.name]
    # Each attempt after a voided one runs on a testbed built afresh.
    assert manifest["testbed_reuse"]["reused"] is False


@pytest.mark.root
def test_a_failed_run_is_not_run_again(tmp_path):
    body = FAST.format(reps=1).replace('"params.direction" = ["up", "down"]', "") + \
        '\n[[events]]\nat_s = 0\naction = "set_link"\npath = "wifi"\nchanges = { delay_ms = 5 }\n'
    summary = sweep(sc.load(write(tmp_path, body)), tmp_path / "out", progress=False)
    assert summary.done == {"failed": 1}  # the bridge backend refuses a delay
    manifest = json.loads((summary.run_dirs[0] / "manifest.json").read_text())
    assert "voided_attempts" not in manifest and not manifest.get("voided_by_testbed")


def test_the_report_counts_runs_the_testbed_voided(tmp_path):
    from types import SimpleNamespace

    from analysis.report import provenance

    late = {"start": "s", "end": "e", "reason": "emulation during the run: wifi up 0.2 % late"}
    mans = {"a": {"voided_attempts": [late, late]}, "b": {}, "c": {"voided_attempts": [late]}}
    row = dict(provenance(SimpleNamespace(root=tmp_path, manifests=mans)))
    assert row["runs the testbed voided and ran again"] == \
        "2 of 3 runs, 3 voided attempts (e.g. emulation during the run: wifi up 0.2 % late)"
    row = dict(provenance(SimpleNamespace(root=tmp_path, manifests={"b": {}})))
    assert row["runs the testbed voided and ran again"] == "none"


@pytest.mark.root
def test_a_run_interrupted_between_attempts_is_not_stored_and_runs_again_on_resume(tmp_path, monkeypatch):
    from testbed.harness import runner

    def late(before, after):
        return {"valid": False, "reason": "link wifi: 0.20 % of frames late (bound 0.1 %)"}

    real_close, closes = runner.TestbedPool.close, []

    def interrupted_close(self):  # Ctrl-C as the voided attempt's testbed goes
        closes.append(1)
        real_close(self)
        if len(closes) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner, "judge_run", late)
    monkeypatch.setattr(runner.TestbedPool, "close", interrupted_close)
    body = FAST.format(reps=1).replace('"params.direction" = ["up", "down"]', "")
    s = sc.load(write(tmp_path, body))
    with pytest.raises(KeyboardInterrupt):
        sweep(s, tmp_path / "out", progress=False)
    assert list((tmp_path / "out" / "throughput").iterdir()) == [], "a voided attempt was stored"
    monkeypatch.undo()
    summary = sweep(s, tmp_path / "out", progress=False)
    assert summary.skipped == 0 and summary.done == {"complete": 1}
