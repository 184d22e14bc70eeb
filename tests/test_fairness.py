"""The fairness experiment through the runner: real flows at a real bottleneck
(generous bounds; the report compares with RFC 6356)."""
from __future__ import annotations

import pytest

from experiments.fairness import jain
from test_experiments import run

pytestmark = pytest.mark.root


def test_jain_index_bounds():
    assert jain([5, 5, 5]) == pytest.approx(1.0)
    assert jain([9, 0, 0]) == pytest.approx(1 / 3)


@pytest.mark.slow
@pytest.mark.parametrize("disjoint", [False, True])
def test_mptcp_competes_with_tcp_flows(tmp_path, disjoint):
    """Kernel MPTCP has no coupled congestion control: at one shared bottleneck
    its two cubic subflows take more than one TCP flow's share; the bottleneck
    stays busy and every flow gets something."""
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
    if not disjoint:
        assert r["mptcp_share"] > 1 / 3, r  # uncoupled: two flows' worth
    links = {p["name"]: p["links"] for p in r["_manifest"]["testbed"]["paths"]}
    assert links["m1b"][1] == ("bnb" if disjoint else "bn")
