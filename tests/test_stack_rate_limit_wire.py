"""The subflow rate-limit option (SRL) on the wire (root): a user-space stack receiver on the
two-path topology (2 x 20 Mbit/s) asks its user-space stack sender to cap the lte subflow;
the sender's pacing holds lte near the rate and moves the rest of the data to wifi, and
rate 0 stops new data on lte. (What an unmodified kernel does with SRL: the conformance
case module tools/conformance/cases/rate_limit.py; pacing vs cwnd clamping measured by
./tb bench.rate-limit.)"""
from __future__ import annotations

import time

import pytest

from testbed.stack import Stack
from testbed.tools.bench.rate_limit import RATE_MBIT, UserTransfer, two_path


@pytest.mark.root
@pytest.mark.timeout(90)
def test_receiver_caps_lte_and_the_sender_paces_it():
    with two_path() as tb, Stack(netns=tb.server.pid) as server, Stack(netns=tb.client.pid) as client:
        t = UserTransfer(tb, server, client)
        try:
            time.sleep(2)
            before = t.rates(1.5)
            assert before["lte"] > 5, before        # both paths carry data before the request
            assert t.conn.request_rate_limit(t.paths["lte"], 2000) == 1
            time.sleep(2)                            # what was queued on lte drains
            capped = t.rates(3)
            (lte_sf,) = [s for s in t.peer.info().subflows if s.remote[0] == t.paths["lte"]]
            assert lte_sf.rate_limit_enforced_kbps == 2000
            assert abs(capped["lte"] - 2) <= 0.5, capped                  # within +-25 % of 2 Mbit/s
            assert capped["total"] >= 0.8 * (capped["wifi"] + 2), capped
            assert capped["total"] >= 0.8 * (0.9 * RATE_MBIT + 2), capped  # wifi takes the rest
            t.conn.request_rate_limit(t.paths["lte"], 0)
            time.sleep(1.5)
            stopped = t.rates(2)
            assert stopped["lte"] < 0.05 and stopped["total"] > 0.7 * RATE_MBIT, stopped
        finally:
            t.close()
