"""bench.parallel counts the attempts the runner voided and ran again: a stored
run that is complete may hide them, and a cap must not be raised on their word."""
from __future__ import annotations

import json

from testbed.tools.bench.parallel import measure


def _run(store, name, voided):
    d = store / "throughput" / name
    d.mkdir(parents=True)
    m = {"run_id": name, "status": "complete", "reason": None, "params": {"cell": name}}
    if voided:
        m["voided_attempts"] = [{"start": 0, "end": 1, "reason": r} for r in voided]
    (d / "manifest.json").write_text(json.dumps(m))
    (d / "metrics.json").write_text(json.dumps({"goodput_mbit": 10.0}))


def test_voided_attempts_of_complete_runs_are_counted_with_their_reasons(tmp_path):
    _run(tmp_path, "a", [])
    _run(tmp_path, "b", ["emulation during the run: wifi up: 21 of 5019 packets (0.42%) late"])
    m = measure(tmp_path, "throughput", 2, 1.0)
    assert m.not_complete == {} and m.voided == 1
    assert any("b (voided, run again)" in r and "0.42%" in r for r in m.reasons)
