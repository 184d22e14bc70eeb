"""The pcap probe stores the experimental options it saw, decoded by the user-space
stack's codec (root): a rate-limit run in which the user-stack client asks for the LTE
subflow to be capped; its SRL requests appear in the packets table with their rate, on
LTE and from the client only, and no segment claims ROBE_eSIM_EN or MP_JOIN_CAP."""
from __future__ import annotations

import pytest

from tests.test_experiments import run, two_path


@pytest.mark.root
@pytest.mark.timeout(180)
def test_a_user_stack_run_stores_its_srl_requests_decoded(tmp_path):
    run(tmp_path, {"experiment": "rate-limit", "calibrate": False, "probes": ["pcap"],
                         "topology": two_path(rate_mbit=10, wifi_delay_ms=5, lte_delay_ms=10),
                         "params": {"mode": "srl", "rate_mbit": 2, "seconds": 4, "request_at_s": 1,
                                    "settle_s": 1}})
    from analysis import load
    packets = load(tmp_path / "out").packets
    assert len(packets) > 100
    srl = packets[packets["srl_kbps"].notna()]
    assert 1 <= len(srl) <= 3, srl                          # at most three sends until honoured
    assert set(srl["srl_kbps"]) == {2000.0} and set(srl["path"]) == {"lte"}
    assert srl["src"].nunique() == 1 and srl["dport"].nunique() == 1   # one subflow, client to server
    assert not packets["esim_en"].any() and not packets["join_cap"].any()
    assert packets["ito_timer_s"].isna().all()
