"""Middleboxes and MP_PRIO: each fault does what it says, and can be undone."""
from __future__ import annotations

import socket
import time

import pytest

from testbed.core import faults
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
    faults.apply(tb, EventSpec(at_s=0, action="mptcp_strip", path="wifi"))
    c, took = connect(tb, 7001)
    assert c is not None and took < 1.0  # nothing dropped: no retransmission
    assert is_fallback(c)
    c.close()
    faults.apply(tb, EventSpec(at_s=0, action="middlebox_off", path="wifi"))
    c, _ = connect(tb, 7001)
    assert c is not None and not is_fallback(c)
    c.close()
    ls.close()


def test_syn_drop_blocks_connections_until_removed(tb):
    ls = tb.in_ns(tb.server, lambda: listener(7002))
    faults.apply(tb, EventSpec(at_s=0, action="syn_drop", path="wifi"))
    c, took = connect(tb, 7002, timeout=1.5)
    assert c is None and took >= 1.4
    faults.apply(tb, EventSpec(at_s=0, action="syn_pass", path="wifi"))
    c, took = connect(tb, 7002)
    assert c is not None and took < 1.0
    c.close()
    ls.close()


def test_backup_flag_flips_the_client_endpoint(tb):
    faults.apply(tb, EventSpec(at_s=0, action="backup_on", path="lte"))
    assert tb.describe()["hosts"]["client"]["endpoints"][0]["flags"] == ["subflow", "backup"]
    faults.apply(tb, EventSpec(at_s=0, action="backup_off", path="lte"))
    assert tb.describe()["hosts"]["client"]["endpoints"][0]["flags"] == ["subflow"]
