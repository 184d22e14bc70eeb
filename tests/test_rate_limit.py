"""The rate-limit experiment: its parameters refused at load, its rate and convergence
arithmetic, the analysis's answer row, the client's own shaping installed and removed,
and a short real sweep of all four modes (generous bounds; docs/rate-limit.md)."""
from __future__ import annotations

import subprocess
import time

import pandas as pd
import pytest

from analysis import rate_limit as RL
from experiments.rate_limit import convergence_s, rates
from tests.conftest import assert_one_line_error, run_tb
from tests.test_experiments import run


# ---- no root ----------------------------------------------------------------------
@pytest.mark.parametrize("sets, needle", [
    (["params.request_at_s=11"], "must fit in seconds"),
    (["params.mode=srl", "params.sender=kernel"], "needs sender 'user'"),
    (["params.mode=none", "params.window_bytes=5000"], "window_bytes is for modes 'window'"),
    (["params.rate_mbit=0"], "rate_mbit"),
])
def test_bad_parameters_are_refused_at_load_in_one_line(tmp_path, sets, needle):
    args = ["run", "experiments/rate-limit.toml", "--out", str(tmp_path / "store")]
    for s in sets:
        args += ["--set", s]
    assert_one_line_error(run_tb(*args, timeout=60), needle)
    assert not (tmp_path / "store").exists()


def test_rates_bin_delivered_bytes_per_key_and_drop_the_partial_tail():
    ts = pd.DataFrame({"t": [0.1, 0.2, 0.6, 0.7, 1.1], "host": "client", "series": "delivered_bytes",
                       "key": ["lte", "lte", "lte", "wifi", "lte"], "value": [62_500, 62_500, 62_500, 125_000, 1]})
    b = rates(ts, "client", 0.5, 1.0)
    lte = b[b["key"] == "lte"]
    assert list(lte["t"]) == [0.0, 0.5] and list(lte["value"]) == [2.0, 1.0]  # 125 kB per 0.5 s = 2 Mbit/s
    assert list(b[b["key"] == "wifi"]["value"]) == [0.0, 2.0]


def test_convergence_is_the_first_bin_from_which_the_rate_stays_in_band():
    t = [0, 1, 2, 3, 4, 5]
    assert convergence_s(t, [20, 20, 1.0, 5, 2.1, 1.9], 2, 0.25, since=1) == 3
    assert convergence_s(t, [20, 20, 20, 20, 20, 20], 2, 0.25, since=1) is None
    assert convergence_s(t, [20, 2, 2, 2, 2, 2], 2, 0.25, since=1) == 0


def _summ(srl_total: float, window_total: float) -> pd.DataFrame:
    row = {"R": 2.0, "other": "wifi", "metric.accuracy": 0.05, "metric.limited_after_mbit": 1.9,
           "stalled": 0.0, "metric.last_data_s": 12.0,
           "other_before": 18.0, "metric.total_after_mbit": 0.0, "other_after": 0.0}
    return pd.DataFrame([{**row, "mode": "srl", "metric.total_after_mbit": srl_total, "other_after": srl_total - 1.9},
                         {**row, "mode": "window", "metric.total_after_mbit": window_total,
                          "other_after": window_total - 1.0}])


def test_answer_row_states_the_answer_with_numbers_and_can_fail():
    row = RL.answer_row(_summ(20.5, 4.0))
    assert row[6] is True and "20.5 Mbit/s" in row[5] and "4.0 Mbit/s" in row[5]
    assert RL.answer_row(_summ(20.5, 18.0))[6] is False
    assert RL.answer_row(pd.DataFrame(columns=["mode", "R"]))[6] is None


# ---- root ------------------------------------------------------------------------
def _qdiscs(pid: int, ifname: str) -> str:
    return subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "tc", "qdisc", "show", "dev", ifname],
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.root
def test_host_shaper_installs_both_directions_and_removes_everything():
    from testbed.core.host_shaping import HostShaper
    ns = subprocess.Popen(["unshare", "-n", "sh", "-c", "ip link add va type veth peer name vb && "
                           "ip link set va up && ip link set vb up && exec sleep 30"])
    try:
        time.sleep(0.3)
        h = HostShaper(ns.pid, "va")
        h.install(2000, 10)
        q = _qdiscs(ns.pid, "va")
        assert "htb 1:" in q and "ingress ffff:" in q, q
        assert "htb 1:" in _qdiscs(ns.pid, h.ifb)
        assert set(h.stats()) == {"egress", "ingress"}
        h.remove()
        h.remove()  # twice is harmless
        q = _qdiscs(ns.pid, "va")
        assert "htb" not in q and "ingress" not in q, q
        links = subprocess.run(["nsenter", f"--net=/proc/{ns.pid}/ns/net", "ip", "-br", "link"],
                               capture_output=True, text=True).stdout
        assert h.ifb not in links
    finally:
        ns.kill()
        ns.wait()


@pytest.mark.root
@pytest.mark.slow
def test_each_mode_limits_lte_its_way(tmp_path):
    runs = run(tmp_path, {"experiment": "rate-limit", "calibrate": False, "timeout_s": 120,
                          "topology": {"name": "two-path", "params": {"rate_mbit": 20, "wifi_delay_ms": 10,
                                                                      "lte_delay_ms": 25}},
                          "params": {"seconds": 6, "request_at_s": 2, "settle_s": 1.5, "stall_s": 3,
                                     "rate_mbit": 2},
                          "grid": {"params.mode": ["srl", "window", "window_start", "shaping", "none"]}})
    by = {r["mode"]: r for r in runs}
    assert set(by) == {"srl", "window", "window_start", "shaping", "none"}
    for r in runs:
        assert r["subflows_max"] == 2
        # a window clamp may stall a kernel receiver (docs/rate-limit.md): what arrived is measured
        assert r["sha256_match"] is True or (r["mode"].startswith("window") and r["stalled"]), r["mode"]
        if r["mode"] != "window_start":
            assert r["before_mbit.lte"] > 8, r  # both paths carried data before the request
    # no limit: LTE keeps its rate; SRL and shaping bring it near R, WiFi untouched
    assert by["none"]["limited_after_mbit"] > 8
    for mode in ("srl", "shaping"):
        assert by[mode]["accuracy"] < 0.5, (mode, by[mode]["limited_after_mbit"])
        assert by[mode]["after_mbit.wifi"] > 0.7 * by[mode]["before_mbit.wifi"], mode
    assert by["srl"]["total_after_mbit"] < by["none"]["total_after_mbit"] - 5
    # the connection-level window clamp slows WiFi too, set at the request or from the start
    assert by["window"]["after_mbit.wifi"] < 0.5 * by["window"]["before_mbit.wifi"]
    assert by["window_start"]["after_mbit.wifi"] < 0.5 * by["none"]["after_mbit.wifi"]
    assert by["srl"]["_manifest"]["protocol"]["srl"]["length"] == 7
