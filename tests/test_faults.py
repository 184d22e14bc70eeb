"""Changes during a run through Testbed.apply_event: middleboxes, MP_PRIO, and the record of each."""
from __future__ import annotations

import socket
import time

import pytest

from testbed.base.errors import TestbedError
from testbed.mptcp.sockopt import is_fallback, listener, mptcp_socket
from testbed.core.net import Testbed
from testbed.core.events import EventSpec
from testbed.core.topology import load

pytestmark = pytest.mark.root


def connect(tb, port: int, timeout: float = 2.0) -> tuple[socket.socket | None, float]:
    c = tb.in_ns(tb.client, mptcp_socket)
    c.settimeout(timeout)
    t0 = time.monotonic()
    try:
        c.connect((tb.server_addr, port))
    except OSError:
        c.close()
        return None, time.monotonic() - t0
    return c, time.monotonic() - t0


@pytest.fixture
def tb():
    with Testbed(load("two-path", wifi_delay_ms=2, lte_delay_ms=2)) as bed:
        yield bed


def test_stripping_the_mptcp_option_gives_an_immediate_tcp_fallback(tb):
    ls = tb.in_ns(tb.server, lambda: listener(7001))
    tb.apply_event(EventSpec(at_s=0, action="mptcp_strip", path="wifi"))
    c, took = connect(tb, 7001)
    assert c is not None and took < 1.0  # nothing dropped: no retransmission
    assert is_fallback(c)
    c.close()
    tb.apply_event(EventSpec(at_s=0, action="middlebox_off", path="wifi"))
    c, _ = connect(tb, 7001)
    assert c is not None and not is_fallback(c)
    c.close()
    ls.close()


def test_syn_drop_blocks_connections_until_removed(tb):
    ls = tb.in_ns(tb.server, lambda: listener(7002))
    tb.apply_event(EventSpec(at_s=0, action="syn_drop", path="wifi"))
    c, took = connect(tb, 7002, timeout=1.5)
    assert c is None and took >= 1.4
    tb.apply_event(EventSpec(at_s=0, action="syn_pass", path="wifi"))
    c, took = connect(tb, 7002)
    assert c is not None and took < 1.0
    c.close()
    ls.close()


def test_backup_flag_flips_the_client_endpoint(tb):
    tb.apply_event(EventSpec(at_s=0, action="backup_on", path="lte"))
    assert tb.describe()["hosts"]["client"]["endpoints"][0]["flags"] == ["subflow", "backup"]
    tb.apply_event(EventSpec(at_s=0, action="backup_off", path="lte"))
    assert tb.describe()["hosts"]["client"]["endpoints"][0]["flags"] == ["subflow"]


def test_every_change_is_recorded_with_its_times_and_the_link_after(tb):
    wifi = tb.link_state("wifi")
    assert wifi.carrier and wifi.blackholed == () and wifi.middlebox is None and wifi.backup is None
    assert tb.link_state("lte").backup is False  # an endpoint, not flagged backup
    due = time.monotonic()
    steps = [EventSpec(at_s=1, action="set_link", path="wifi", direction="up", changes={"loss_pct": 5}),
             EventSpec(at_s=2, action="blackhole", path="wifi", direction="down"),
             EventSpec(at_s=3, action="link_down", path="lte"),
             EventSpec(at_s=4, action="mptcp_drop", path="wifi")]
    for e in steps:
        rec = tb.apply_event(e, scheduled=due)
        assert rec.ok and rec.error is None and rec.event is e
        assert due == rec.scheduled <= rec.began <= rec.applied <= rec.done
    wifi, lte = tb.link_state("wifi"), tb.link_state("lte")
    assert wifi.up.loss_pct == 5 and wifi.down.loss_pct == 0  # the other direction untouched
    assert wifi.blackholed == ("down",) and wifi.middlebox == "mptcp_drop" and wifi.carrier
    assert not lte.carrier
    assert [r.event.action for r in tb.applied_events] == [e.action for e in steps]
    assert tb.applied_events[0].link.up.loss_pct == 5 and tb.applied_events[0].link.blackholed == ()
    if tb.backend.name == "userspace":  # the forwarder acknowledges with its own clock
        assert tb.applied_events[1].emulator_clock
    assert tb.link_states()["wifi"] == wifi


def test_a_failing_change_is_recorded_and_raised(tb):
    with pytest.raises(TestbedError, match="'dsl'"):
        tb.apply_event(EventSpec(at_s=0, action="link_down", path="dsl"))
    rec = tb.applied_events[-1]
    assert not rec.ok and "dsl" in rec.error and rec.link is None


def _counter(tb, node, name: str) -> int:
    def read() -> int:
        lines = open("/proc/thread-self/net/netstat").read().splitlines()
        for head, vals in zip(lines[::2], lines[1::2]):
            if head.startswith("MPTcpExt:"):
                return dict(zip(head.split()[1:], map(int, vals.split()[1:])))[name]
        raise AssertionError("no MPTcpExt counters")
    return tb.in_ns(node, read)


def test_backup_on_sends_mp_prio_on_an_established_subflow(tb):
    ls = tb.in_ns(tb.server, lambda: listener(7003))
    c, _ = connect(tb, 7003)
    assert c is not None
    srv, _ = ls.accept()
    c.send(b"hello")  # the connection is fully established (and lte may join) once data flowed
    srv.recv(5)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and _counter(tb, tb.server, "MPJoinAckRx") < 1:
        time.sleep(0.05)
    assert _counter(tb, tb.server, "MPJoinAckRx") == 1, "the lte subflow never joined"
    before = _counter(tb, tb.server, "MPPrioRx")
    tb.apply_event(EventSpec(at_s=0, action="backup_on", path="lte"))
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and _counter(tb, tb.server, "MPPrioRx") == before:
        c.send(b"x")  # MP_PRIO rides on an ACK
        time.sleep(0.05)
    assert _counter(tb, tb.server, "MPPrioRx") > before
    assert tb.link_state("lte").backup is True
    c.close()
    srv.close()
    ls.close()


def test_a_change_built_in_code_is_held_to_the_models_ranges_too(tb):
    before = tb.link_state("wifi")
    huge = EventSpec(at_s=0, action="set_link", path="wifi",
                     changes={"rate_mbit": 100_000, "delay_ms": 10_000, "queue_bdp": 100})
    with pytest.raises(TestbedError, match=r"set_link on 'wifi': queue of \d+ packets .* 1000000"):
        tb.apply_event(huge)
    assert tb.link_state("wifi") == before and not tb.applied_events[-1].ok
