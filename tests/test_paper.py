"""The paper pipeline end to end, test-sized: real runs of every paper
scenario (trimmed grids), then the report with its expectation table."""
from __future__ import annotations

import csv
import json

import pytest

from conftest import ROOT, assert_one_line_error, run_tb
from testbed.harness import campaign as paper

# The paper campaign's scenario files, test-sized by their quick overrides.
TINY = f"""
[[scenario]]
file = "{ROOT}/experiments/robe-establishment.toml"
[scenario.quick]
repetitions = 1
params = {{ timeout_s = 5 }}
grid = {{ "params.strategy" = ["mptcp", "sim", "timer"], "params.condition" = ["healthy", "blackhole"] }}

[[scenario]]
file = "{ROOT}/experiments/failover.toml"
[scenario.quick]
repetitions = 1
calibrate = false
params = {{ seconds = 7 }}
events = [{{ at_s = 3.0, action = "link_down", path = "wifi" }}]
grid = {{}}

[[scenario]]
file = "{ROOT}/experiments/throughput.toml"
[scenario.quick]
repetitions = 1
calibrate = false
params = {{ seconds = 4 }}
grid = {{ "topology.params.rates" = [[10, 10]] }}

[[scenario]]
file = "{ROOT}/experiments/fairness.toml"
[scenario.quick]
repetitions = 1
calibrate = false
params = {{ seconds = 6, warmup_s = 2 }}
grid = {{ "topology.params.m" = [1] }}
"""


@pytest.mark.root
@pytest.mark.slow
def test_tiny_paper_run_builds_a_complete_report(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    tiny = paper.load(tmp_path / "tiny.toml")
    results = tmp_path / "results"
    summaries = paper.run(tiny, results, quick=True, progress=False)
    assert all(not s.done.get("failed") for _, s in summaries), summaries
    from analysis.report import build_report

    index = build_report(results, tmp_path / "report")
    html = index.read_text()
    for section in ("Provenance", "Expected", "stablishment", "ailover", "hroughput", "airness"):
        assert section in html, section
    with open(tmp_path / "report" / "expectations.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows
    for row in rows:
        assert all(str(v).strip() for v in row.values()), row
    verdicts = {r["verdict"] for r in rows}
    assert "holds" in verdicts
    assert list((tmp_path / "report").glob("*.png")) and list((tmp_path / "report").glob("*.pdf"))
    # A resumed paper run must neither skip nor hide runs that failed before.
    assert paper.not_complete(tiny, results, quick=True) == {}
    manifest = next((results / "throughput").glob("*/manifest.json"))
    stored = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**stored, "status": "failed", "reason": "test: marked failed"}))
    assert paper.not_complete(tiny, results, quick=True) == {"failed": 1}
    resumed = paper.run(tiny, results, quick=True, progress=False)
    assert sum(sum(s.done.values()) for _, s in resumed) == 0
    retried = paper.run(tiny, results, quick=True, progress=False, retry_failed=True)
    assert {e: s.done for e, s in retried if s.done} == {"throughput": {"complete": 1}}
    assert paper.not_complete(tiny, results, quick=True) == {}


def test_paper_campaign_is_data_with_the_runs_it_always_had():
    """experiments/paper.toml lists the scenario files and their quick overrides;
    --quick trims each scenario as the campaign always did."""
    from testbed.harness import scenario as sc

    plan = paper.load()
    files = [e.file for e in plan.scenario]
    assert files == ["robe-establishment.toml", "robe-esim.toml", "robe-esim.toml", "robe-user.toml", "failover.toml",
                     "failover-mpprio.toml", "throughput.toml", "fairness.toml", "fairness-user.toml",
                     "failover-redundant.toml", "rate-limit.toml", "inactivity.toml",
                     "inactivity-state.toml", "privacy.toml", "privacy-countermeasures.toml"]
    # the second robe-esim entry is quick-only: the full run of the first already holds its runs
    assert [e.quick_only for e in plan.scenario] == [False, False, True] + [False] * 12
    runs = {q: [len(sc.expand(s)) for s in plan.scenarios(q)] for q in (True, False)}
    assert runs == {True: [70, 20, 5, 12, 6, 2, 6, 4, 6, 3, 5, 4, 2, 2, 1],
                    False: [700, 200, 300, 18, 6, 36, 12, 24, 9, 30, 24, 3, 32, 16]}
    quick = plan.scenarios(True)
    assert [s.repetitions for s in quick] == [2, 1, 5] + [1] * 12
    throughput = quick[files.index("throughput.toml")]
    assert throughput.params == {"seconds": 6} and throughput.grid["topology.params.delays"] == [[0, 0], [25, 1]]


def test_quick_paper_gives_every_esim_cell_judged_on_random_effects_enough_runs():
    """eSIM's multipath row with loss needs MIN_RUNS_RANDOM runs: the quick campaign plans that
    many distinct runs of the lossy eSIM cell (user-space stack both sides), sharing run ids
    with the full robe-esim sweep's cell, so the full campaign does not run them again."""
    from analysis.establishment_checks import MIN_RUNS_RANDOM
    from testbed.harness import scenario as sc

    plan = paper.load()

    def lossy_esim(q: bool) -> set[str]:
        return {spec.run_id for s in plan.scenarios(q) if s.path.endswith("robe-esim.toml") for spec in sc.expand(s)
                if spec.params.get("params.strategy") == "esim" and spec.params.get("params.server_stack") == "user"
                and str(spec.params.get("params.condition", "")).startswith("lossy")}
    quick, full = lossy_esim(True), lossy_esim(False)
    assert len(quick) >= MIN_RUNS_RANDOM
    assert quick <= full


@pytest.mark.root
@pytest.mark.parametrize("body, needle", [
    ('[[scenario]]\nfile = "nope.toml"\n', "nope.toml does not exist"),
    ('[[scenario]]\nfile = "{root}/experiments/failover.toml"\nquick = {{ "params.secnds" = 1 }}\n',
     "secnds"),
    ('[[scenario]]\nfile = "{root}/experiments/failover.toml"\ncolour = 1\n', "colour"),
    ('description = "no scenarios"\n', "scenario"),
    ('[[scenario\n', "malformed TOML"),
])
def test_bad_campaign_is_refused_before_anything_runs(tmp_path, body, needle):
    bad = tmp_path / "c.toml"
    bad.write_text(body.format(root=ROOT))
    proc = run_tb("paper", "--campaign", str(bad), "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, needle)
    assert proc.returncode == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.root
@pytest.mark.parametrize("args, needle", [
    (["report", "/nonexistent/results"], "does not exist"),
    (["results.ls", "/nonexistent/results"], "no results directory"),
    (["run", "/nonexistent/s.toml"], "does not exist"),
    (["paper", "--campaign", "/nonexistent/c.toml"], "does not exist"),
    (["demo", "--topology", "no-such-topology"], "no-such-topology"),
    (["shell", "--topology", "no-such-topology"], "no-such-topology"),
])
def test_user_errors_exit_2_in_every_task(args, needle):
    """One convention for every task: a user error is one line on stderr and exit
    status 2 (1 means the work itself failed, 130 an interrupt)."""
    proc = run_tb(*args)
    assert_one_line_error(proc, needle)
    assert proc.returncode == 2, (args, proc.returncode, proc.stderr)


@pytest.mark.root
def test_paper_measures_the_esim_forgery_table_once_per_results_directory(tmp_path, capsys):
    """`./tb paper`'s forgery step writes the report's table into the results directory, once."""
    import tasks
    from analysis.esim_security import FORGERY_FILE, forgery_table, load_forgery

    tasks._paper_forgery(tmp_path, quick=True)
    doc = load_forgery(tmp_path / FORGERY_FILE)
    assert doc["attempts_per_variant"] == 500 and "invalid" not in doc, doc.get("invalid")
    assert forgery_table(doc)["accepted"].sum() == 0
    assert "0 of 2000 forged MP_JOIN_CAP accepted" in capsys.readouterr().out
    stamp = (tmp_path / FORGERY_FILE).stat().st_mtime_ns
    tasks._paper_forgery(tmp_path, quick=True)    # stored: not measured again
    assert (tmp_path / FORGERY_FILE).stat().st_mtime_ns == stamp


def test_paper_forgery_failure_is_stored_invalid_and_measured_again(tmp_path, monkeypatch, capsys):
    """A forgery measurement that breaks leaves the campaign's report to be built: it is stored
    invalid with its reason (the report shows it) and measured again next time."""
    import tasks
    from analysis.esim_security import FORGERY_FILE, invalid_reason, load_forgery
    from testbed.stack import StackError
    from testbed.tools.bench import esim_forgery

    calls = []

    def broken(**kw):
        calls.append(kw)
        raise StackError("accept timed out after 5 s")
    monkeypatch.setattr(esim_forgery, "run_forgery", broken)
    tasks._paper_forgery(tmp_path, quick=True)
    assert invalid_reason(load_forgery(tmp_path / FORGERY_FILE)) == "StackError: accept timed out after 5 s"
    assert "esim forgery not measured" in capsys.readouterr().err
    tasks._paper_forgery(tmp_path, quick=False)     # invalid: measured again, 5,000 per variant
    assert [c["attempts"] for c in calls] == [500, 5000]
