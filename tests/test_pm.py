"""MPTCP socket options and the path-manager netlink layer against the real kernel."""
from __future__ import annotations

import errno
import socket
import threading

import pytest

from testbed.base.errors import TestbedError
from testbed.core.model import HostSettings
from testbed.mptcp import sockopt as so
from testbed.mptcp.pm import PMError, PMEventListener, UserspacePM, pm_event_msg, _parse
from testbed.core.net import Testbed
from testbed.core.topology import load

PORT = 5000
_listeners: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_listeners():
    yield
    while _listeners:
        _listeners.pop().close()


def two_path():
    return load("two-path", wifi_delay_ms=0, lte_delay_ms=0)


def connect(tb, server_protocol: str = "mptcp", cc: str = "cubic"):
    """(client socket, accepted server socket) over the default path."""
    ls = tb.in_ns(tb.server, lambda: so.mptcp_socket(cc, protocol=server_protocol))
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((tb.server_addr, PORT))
    ls.listen(1)
    cs = tb.in_ns(tb.client, lambda: so.mptcp_socket(cc))
    cs.settimeout(10)
    cs.connect((tb.server_addr, PORT))
    ss, _ = ls.accept()
    # The listener must stay open: MP_JOIN SYNs are matched against it.
    _listeners.append(ls)
    return cs, ss


def exchange(cs, ss, n: int) -> None:
    """Send n bytes client -> server and read them (drains, so nothing blocks)."""
    t = threading.Thread(target=cs.sendall, args=(b"\x5a" * n,))
    t.start()
    got = 0
    while got < n:
        got += len(ss.recv(1 << 16))
    t.join(10)


def test_event_numbering_selfcheck_and_parse_is_pure():
    # Importing pm ran the numbering self-check; a datagram with a foreign
    # message type decodes to nothing.
    assert _parse(b"\x10\x00\x00\x00\x02\x00" + b"\x00" * 10, family_id=99, t_ns=0) == []
    assert dict(pm_event_msg.nla_map)["MPTCP_ATTR_SPORT"] == "be16"


def test_bad_protocol_is_a_one_line_error():
    with pytest.raises(TestbedError, match="protocol"):
        so.mptcp_socket(protocol="sctp")


@pytest.mark.root
@pytest.mark.timeout(60)
def test_sockopts_two_subflows_and_byte_counts():
    with Testbed(two_path(), backend="bridge") as tb, PMEventListener(tb.client.pid) as lst:
        cs, ss = connect(tb, cc="reno")
        assert so.congestion_control(cs) == "reno"
        exchange(cs, ss, 1000)  # the kernel PM joins once the MPTCP level is fully up
        assert lst.wait_for("sub_established", 5) is not None
        exchange(cs, ss, 4_000_000)
        info = so.mptcp_info(cs)
        assert so.outcome(cs) == "mptcp" and not info.fallback
        # subflows_total exists from 6.10 on; older kernels (the VM's 6.1) report None.
        assert info.subflows == 1 and info.subflows_total in (2, None) and info.token
        addrs = so.subflow_addrs(cs)
        assert {a.local[0] for a in addrs} == {p.addr.client for p in tb.paths}
        assert all(a.remote == (tb.server_addr, PORT) for a in addrs)
        assert len(so.subflow_tcpinfo(cs)) == 2
        subs = so.subflows(ss)  # MPTCP_FULL_INFO (6.5+) or TCPINFO + SUBFLOW_ADDRS
        assert len(subs) == 2
        # What the subflows carried adds up to the connection (reinjections aside).
        per_subflow = sum(s.tcp.bytes_received for s in subs)
        assert abs(per_subflow - 4_001_000) <= 0.01 * 4_001_000
        if so.full_info_supported():
            full = so.full_info(ss)
            assert full.num_subflows == 2 and full.mptcp.bytes_received == 4_001_000
            assert all(s.id is not None for s in subs)
        else:
            assert all(s.id is None for s in subs)  # absent, not invented
        cs.close()
        ss.close()


@pytest.mark.root
@pytest.mark.timeout(60)
def test_fallback_to_tcp_is_detected():
    with Testbed(two_path(), backend="bridge", server=HostSettings(enabled=0)) as tb:
        cs, ss = connect(tb, server_protocol="tcp")
        exchange(cs, ss, 1000)
        assert so.is_fallback(cs) and so.outcome(cs) == "fallback_tcp"
        assert so.outcome(ss) == "tcp"
        with pytest.raises(OSError) as err:  # a plain TCP socket underneath now
            so.mptcp_info(cs)
        assert err.value.errno == errno.EOPNOTSUPP, err.value
        cs.close()
        ss.close()


@pytest.mark.root
@pytest.mark.timeout(60)
def test_pm_events_in_order_kernel_pm():
    with Testbed(two_path(), backend="bridge") as tb, \
            PMEventListener(tb.client.pid) as lc, PMEventListener(tb.server.pid) as lsrv:
        cs, ss = connect(tb)
        exchange(cs, ss, 1000)
        assert lc.wait_for("sub_established", 5) is not None
        token = so.mptcp_info(cs).token
        cs.close()
        ss.close()
        assert lc.wait_for("closed", 5, token=token) is not None
        types = [e.type for e in lc.events() if e.token == token]
        assert types == ["created", "established", "sub_established", "closed"]
        ts = [e.t_ns for e in lc.events() if e.token == token]
        assert ts == sorted(ts)
        sub = next(e for e in lc.events() if e.type == "sub_established")
        assert sub.attrs["saddr4"] == tb.path("lte").addr.client and sub.attrs["dport"] == PORT
        assert lsrv.wait_for("sub_established", 5) is not None
        assert lsrv.wait_for("created", 1).attrs.get("server_side") == 1


@pytest.mark.root
@pytest.mark.timeout(60)
def test_userspace_pm_subflow_create_priority_destroy_and_enotconn():
    with Testbed(two_path(), backend="bridge", client=HostSettings(path_manager="userspace")) as tb, \
            PMEventListener(tb.client.pid) as lc, PMEventListener(tb.server.pid) as lsrv:
        cs, ss = connect(tb)
        token = so.mptcp_info(cs).token
        upm = UserspacePM(tb.client.pid)
        lte = tb.path("lte").addr.client
        # MP_CAPABLE's third ACK with data has not been acknowledged yet.
        with pytest.raises(PMError) as err:
            upm.subflow_create(token, lte, 5, tb.server_addr, PORT)
        assert err.value.errno == 107 and "ENOTCONN" in str(err.value)
        exchange(cs, ss, 1000)
        ss.sendall(b"ok")
        cs.recv(2)
        assert lc.wait_for("established", 5, token=token) is not None
        upm.subflow_create(token, lte, 5, tb.server_addr, PORT)
        ev = lc.wait_for("sub_established", 5, token=token)
        assert ev is not None and ev.attrs["loc_id"] == 5 and ev.attrs["saddr4"] == lte
        sf = next(a for a in so.subflow_addrs(cs) if a.local[0] == lte)
        upm.set_flags(token, *sf.local, *sf.remote, backup=True)
        prio = lsrv.wait_for("sub_priority", 5)
        assert prio is not None and prio.attrs["backup"] == 1
        upm.subflow_destroy(token, *sf.local, *sf.remote)
        assert lc.wait_for("sub_closed", 5, token=token) is not None
        with pytest.raises(PMError) as err:
            upm.subflow_create(token ^ 0x5A5A, lte, 6, tb.server_addr, PORT)
        assert err.value.errno != 0
        cs.close()
        ss.close()
