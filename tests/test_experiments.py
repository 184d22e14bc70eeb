"""Short real runs of each experiment through the runner: functional truths
(generous bounds; timing goals live in the benchmarks and the report)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed.harness import scenario as sc
from testbed.harness.runner import sweep

pytestmark = pytest.mark.root


def run(tmp_path: Path, data: dict) -> list[dict]:
    """Sweep `data` (a scenario dict) into tmp_path/out and return each run's
    metrics + manifest; every run must be complete.

    A run the testbed voided (the link emulator late: a scheduling hiccup of the
    2-core CI machine) is run again by the runner up to twice here (void_retries)."""
    s = sc.validate({"seed": 1, "timeout_s": 120, "void_retries": 2, **data})
    summary = sweep(s, tmp_path / "out", progress=False)
    out = []
    for d in summary.run_dirs:
        manifest = json.loads((d / "manifest.json").read_text())
        assert manifest["status"] == "complete", manifest["reason"]
        out.append({**json.loads((d / "metrics.json").read_text()), "_manifest": manifest})
    return out


def two_path(**params) -> dict:
    return {"name": "two-path", "params": {"rate_mbit": 20, **params}}


@pytest.mark.slow
def test_throughput_aggregate_beats_best_single_path(tmp_path):
    runs = run(tmp_path, {"experiment": "throughput", "calibrate": False,
                          "topology": two_path(wifi_delay_ms=5, lte_delay_ms=10),
                          "params": {"seconds": 6},
                          "grid": {"params.protocol": ["mptcp", "tcp"]}})
    by = {r["protocol"]: r for r in runs}
    assert by["mptcp"]["goodput_mbit"] > 1.3 * by["tcp"]["goodput_mbit"]
    assert by["mptcp"]["goodput_mbit"] > by["mptcp"]["best_path_mbit"]
    assert by["mptcp"]["share.lte"] > 0.3 and by["mptcp"]["share.wifi"] > 0.3
    assert by["mptcp"]["sha256_match"] is True


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["link_down", "blackhole"])
def test_failover_keeps_data_flowing_and_intact(tmp_path, failure):
    [r] = run(tmp_path, {"experiment": "failover", "calibrate": False,
                         "topology": two_path(wifi_delay_ms=5, lte_delay_ms=10),
                         "params": {"seconds": 8},
                         "events": [{"at_s": 3.0, "action": failure, "path": "wifi"}]})
    assert r["sha256_match"] is True
    assert r["recovered"] is True and r["recovery_s"] < 4.0
    assert r["stall_s"] < 3.0
    ts = r["_manifest"]["probes"]
    assert ts, "probes recorded nothing"
    [applied] = r["_manifest"]["applied_events"]  # stored by the runner, not recomputed
    assert applied["ok"] and applied["action"] == failure and applied["path"] == "wifi"
    assert 0 <= applied["applied_lateness_ms"] < 50 and abs(applied["scheduled_s"] - 3.0) < 0.01
    wifi = r["_manifest"]["links_at_end"]["wifi"]
    assert (not wifi["carrier"]) if failure == "link_down" else wifi["blackholed"] == ["up", "down"]


def establishment(tmp_path, strategies, conditions, timeout_s=6, hosts=None) -> dict:
    runs = run(tmp_path, {"experiment": "establishment", "calibrate": False,
                          "topology": two_path(wifi_delay_ms=5, lte_delay_ms=10),
                          "hosts": hosts or {}, "params": {"timeout_s": timeout_s},
                          "grid": {"params.strategy": strategies, "params.condition": conditions}})
    return {(r["_manifest"]["params"]["params.strategy"],
             r["_manifest"]["params"]["params.condition"]): r for r in runs}


def test_blackholed_default_path_blocks_plain_mptcp_but_healthy_connects_fast(tmp_path):
    cells = establishment(tmp_path, ["mptcp"], ["healthy", "blackhole"], timeout_s=5)
    healthy, broken = cells[("mptcp", "healthy")], cells[("mptcp", "blackhole")]
    assert healthy["outcome"] == "mptcp" and healthy["setup_s"] < 1.0
    assert broken["outcome"] == "failed" and broken["setup_s"] is None
    assert broken["syns_sent"] >= 3  # SYN+MP_CAPABLE retransmitted at 1 and 2 s
    # The experiment's own condition went through the testbed's one route, and is stored.
    [applied] = broken["_manifest"]["applied_events"]
    assert applied["ok"] and (applied["action"], applied["path"]) == ("blackhole", "wifi")
    assert broken["_manifest"]["links_at_end"]["wifi"]["blackholed"] == ["up", "down"]
    assert healthy["_manifest"]["applied_events"] == []


def test_mptcp_dropping_middlebox_is_reported_as_tcp_fallback(tmp_path):
    cells = establishment(tmp_path, ["mptcp"], ["mptcp_drop"], timeout_s=8)
    r = cells[("mptcp", "mptcp_drop")]
    assert r["outcome"] == "fallback_tcp"
    assert 2.0 < r["setup_s"] < 5.0  # after the MP_CAPABLE SYNs at 0, 1, 2 s


@pytest.mark.slow
def test_robe_sim_and_timer_survive_a_blackholed_default_path(tmp_path):
    cells = establishment(tmp_path, ["sim", "timer"], ["blackhole"],
                          hosts={"client": {"path_manager": "userspace"}})
    sim, timer = cells[("sim", "blackhole")], cells[("timer", "blackhole")]
    assert sim["outcome"] == "mptcp" and sim["winner_path"] == "lte" and sim["setup_s"] < 0.5
    assert timer["outcome"] == "mptcp" and 0.9 < timer["setup_s"] < 2.0


def test_establishment_strategy_names_are_robes_and_its_condition_is_a_param_of_its_own():
    """One meaning per name: the experiment's strategy names are the RobE library's
    registered strategies, and the default-path condition is `params.condition`
    (a scenario is the TOML file)."""
    from typing import get_args

    from experiments.establishment import Params, StrategyName
    from testbed.robe import STRATEGIES

    assert set(get_args(StrategyName)) == set(STRATEGIES)
    assert "condition" in Params.model_fields and "scenario" not in Params.model_fields
