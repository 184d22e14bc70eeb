"""The fairness experiment through the runner: real flows at a real bottleneck
(generous bounds; the report compares with RFC 6356)."""
from __future__ import annotations

import json

import pytest

from experiments.fairness import jain
from test_experiments import run
from testbed.harness import scenario as sc
from testbed.harness.runner import sweep

pytestmark = pytest.mark.root


def test_jain_index_bounds():
    assert jain([5, 5, 5]) == pytest.approx(1.0)
    assert jain([9, 0, 0]) == pytest.approx(1 / 3)


@pytest.mark.slow
@pytest.mark.parametrize("disjoint", [False, True])
def test_mptcp_competes_with_tcp_flows(tmp_path, disjoint):
    """Three flows share the bottleneck(s): it stays busy, every flow gets
    something, MPTCP uses both subflows and the metrics are consistent (where
    MPTCP's share lands against 1/(M+1) is the report's question)."""
    # Calibrated when disjoint: each path's rate is measured to its own left router.
    [r] = run(tmp_path, {"experiment": "fairness", "calibrate": disjoint,
                         "topology": {"name": "dumbbell", "params": {
                             "m": 2, "bottleneck_mbit": 10, "delay_ms": 5, "disjoint": disjoint}},
                         "params": {"seconds": 12, "warmup_s": 4}})
    assert r["flows"] == 3 and r["mptcp_subflows"] == 2 and r["fair_share"] == pytest.approx(1 / 3)
    assert all(r[f"goodput.{f}"] > 0.5 for f in ("mptcp", "t1", "t2")), r
    capacity = 20 if disjoint else 10
    assert r["shared_capacity_mbit"] == capacity
    assert 0.8 < r["utilisation"] <= 1.02, r
    assert 0.5 < r["jain_index"] <= 1.0
    assert 0.15 < r["mptcp_share"] < 0.85, r  # neither starved nor taking all
    links = {p["name"]: p["links"] for p in r["_manifest"]["testbed"]["paths"]}
    assert links["m1b"][1] == ("bnb" if disjoint else "bn")


@pytest.mark.slow
def test_user_stack_lia_competes_at_the_shared_bottleneck(tmp_path):
    """The MPTCP connection is the user-space stack with LIA: both subflows cross the one
    bottleneck, it stays busy, neither side starves (each keeps at least a fifth). Where the
    share lands is the report's question; the coupling itself is tests/test_stack_coupling.py's,
    against a Reno-like competitor. Measured here against kernel CUBIC, 12 s runs: LIA
    0.48-0.72 in 11 runs and once 0.767 (a CI run), the stack's uncoupled CUBIC 0.72-0.81: one
    run does not tell them apart."""
    scenario = {"experiment": "fairness", "calibrate": False,
                "topology": {"name": "dumbbell", "params": {"m": 1, "bottleneck_mbit": 20, "delay_ms": 10}},
                "params": {"seconds": 12, "warmup_s": 4, "stack": "user", "cc": "lia"}}
    # The stack sends segment by segment (no TSO), so the emulator forwards ~20x the frames
    # of a kernel sender; a run it could not forward in time is voided (honestly) and run
    # again by the runner (void_retries).
    s = sc.validate({"seed": 1, "timeout_s": 120, "void_retries": 2, **scenario})
    [d] = sweep(s, tmp_path / "out", progress=False).run_dirs
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["status"] == "complete", manifest["reason"]
    r = json.loads((d / "metrics.json").read_text())
    assert r["stack"] == "user" and r["cc"] == "lia" and r["coupled"] is True
    assert r["mptcp_subflows"] == 2 and r["shared_bottleneck"] is True
    assert 0.8 < r["utilisation"] <= 1.02, r
    assert 0.2 < r["mptcp_share"] < 0.8, {k: r[k] for k in ("mptcp_share", "utilisation", "goodput.mptcp", "goodput.t1")}


@pytest.mark.parametrize("params, message", [
    ({"cc": "lia"}, "kernel MPTCP does not have"),
    ({"stack": "user"}, "stack 'user' needs cc"),
    ({"stack": "user", "cc": "bbr"}, "stack 'user' needs cc"),
])
def test_stack_and_cc_refused_at_load(params, message):
    from experiments.fairness import Params
    with pytest.raises(ValueError, match=message):
        Params(**params)
