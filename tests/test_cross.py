"""Cross traffic: TCP with its own congestion control, constant-rate and on/off
UDP, each started and stopped while the testbed runs."""
from __future__ import annotations

import time

import pytest

from testbed.base.errors import TestbedError
from testbed.core.cross import CrossFlow, CrossTraffic
from testbed.core.topology import load


def test_bad_cross_flows_are_refused_when_written():
    with pytest.raises(ValueError, match="needs rate_mbit"):
        CrossFlow(name="u", src="t1", kind="udp")
    with pytest.raises(ValueError, match="both on_s and off_s"):
        CrossFlow(name="u", src="t1", kind="udp", rate_mbit=1, on_s=1)
    with pytest.raises(ValueError, match="for udp"):
        CrossFlow(name="t", src="t1", kind="tcp", rate_mbit=1)


@pytest.mark.root
def test_cross_traffic_starts_stops_and_delivers_at_its_rate():
    from testbed.core.net import Testbed
    flows = [CrossFlow(name="bulk", src="t1", kind="tcp", cc="reno", port=5601),
             CrossFlow(name="cbr", src="t2", kind="udp", rate_mbit=2, port=5602),
             CrossFlow(name="onoff", src="t2", kind="udp", rate_mbit=4, on_s=0.5, off_s=0.5, port=5603)]
    with Testbed(load("dumbbell", m=2, bottleneck_mbit=20, delay_ms=2)) as tb:
        cross = CrossTraffic(tb, flows)
        with pytest.raises(TestbedError, match="no cross-traffic flow 'nope'"):
            cross.start("nope")
        for name in ("cbr", "onoff", "bulk"):
            cross.start(name)
        sender = cross._running["bulk"].sockets[1]
        assert sender.getsockopt(6, 13, 16).split(b"\0")[0] == b"reno"  # TCP_CONGESTION, per socket
        time.sleep(0.5)
        a, t0 = cross.delivered(), time.monotonic()
        time.sleep(4.0)
        b, t1 = cross.delivered(), time.monotonic()
        rate = {n: (b[n] - a[n]) * 8 / (t1 - t0) / 1e6 for n in b}
        assert 1.8 < rate["cbr"] < 2.2, rate
        assert 1.6 < rate["onoff"] < 2.4, rate  # 4 Mbit/s half of the time
        assert 10 < rate["bulk"] < 20, rate  # the rest of the 20 Mbit/s bottleneck
        cross.stop("bulk")
        cross.stop("cbr")
        time.sleep(0.3)
        c = cross.delivered()
        time.sleep(1.0)
        d = cross.delivered()
        assert d["bulk"] == c["bulk"] and d["cbr"] == c["cbr"] and d["onoff"] > c["onoff"]
        assert not cross.errors()
