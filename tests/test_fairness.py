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
