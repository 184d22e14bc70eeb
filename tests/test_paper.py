"""The paper pipeline end to end, test-sized: real runs of every paper
scenario (trimmed grids), then the report with its expectation table."""
from __future__ import annotations

import csv
import json

import pytest

from testbed.harness import paper

pytestmark = [pytest.mark.root, pytest.mark.slow]

TINY = [
    paper.PaperScenario("experiments/robe-establishment.toml", {
        "repetitions": 1, "params": {"timeout_s": 5},
        "grid": {"params.strategy": ["mptcp", "sim", "timer"],
                 "params.scenario": ["healthy", "blackhole"]}}),
    paper.PaperScenario("experiments/failover.toml", {
        "repetitions": 1, "calibrate": False, "params": {"seconds": 7},
        "events": [{"at_s": 3.0, "action": "link_down", "path": "wifi"}],
        "grid": {}}),
    paper.PaperScenario("experiments/throughput.toml", {
        "repetitions": 1, "calibrate": False, "params": {"seconds": 4},
        "grid": {"topology.params.rates": [[10, 10]]}}),
]


def test_tiny_paper_run_builds_a_complete_report(tmp_path, monkeypatch):
    monkeypatch.setattr(paper, "PAPER", TINY)
    results = tmp_path / "results"
    summaries = paper.run(results, quick=True, progress=False)
    assert all(not s.done.get("failed") for _, s in summaries), summaries
    from analysis.report import build_report

    index = build_report(results, tmp_path / "report")
    html = index.read_text()
    for section in ("Provenance", "Expected", "stablishment", "ailover", "hroughput"):
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
    assert paper.not_complete(results, quick=True) == {}
    manifest = next((results / "throughput").glob("*/manifest.json"))
    stored = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**stored, "status": "failed", "reason": "test: marked failed"}))
    assert paper.not_complete(results, quick=True) == {"failed": 1}
    resumed = paper.run(results, quick=True, progress=False)
    assert sum(sum(s.done.values()) for _, s in resumed) == 0
    retried = paper.run(results, quick=True, progress=False, retry_failed=True)
    assert {e: s.done for e, s in retried if s.done} == {"throughput": {"complete": 1}}
    assert paper.not_complete(results, quick=True) == {}
