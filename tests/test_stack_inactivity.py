"""The inactivity-time option (ITO) on the wire (root): user<->user over two paths
whose links all go down, and a user client against an unmodified kernel server.

Namespaces, paths and captures come from tests/test_stack_interop.py's Pair
(two veth pairs: 10.0.0.1/10.0.1.1 in A, 10.0.0.2/10.0.1.2 in B). Links go down
with `ip link set ... down` in A (the veth peers in B lose their carrier too).
"""
from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

from testbed.stack.inactivity import InactivityTime
from testbed.stack.stack import Stack, StackError
from tests.test_stack_interop import A_ADDRS, check_trace, kernel_server, pair  # noqa: F401  (fixture)

pytestmark = pytest.mark.root

ITO_S = 4


def events_of(stack: Stack, token: int, until: float) -> list:
    """Every event of the stack so far (and until `until`), those of token kept."""
    out = []
    while True:
        ev = stack.next_event(timeout=max(0.0, until - time.monotonic()))
        if ev is None:
            return out
        if ev.token == token:
            out.append(ev)
        if time.monotonic() >= until and stack.events.empty():
            return out


def links(pair, up: bool, devs=("va0", "va1")) -> None:
    pair.sh(pair.a, " && ".join(f"ip link set {d} {'up' if up else 'down'}" for d in devs))


def two_path_connection(pair, server: Stack, client: Stack):
    """An established user<->user connection with subflows on both paths, and its server side."""
    lst = server.listen(6000)
    conn = client.connect(("10.0.0.2", 6000), paths=A_ADDRS, timeout=5)
    srv = lst.accept(timeout=5)
    assert len(conn.info().subflows) == 2
    return conn, srv


def read_all(conn, n: int, box: dict) -> None:
    got = bytearray()
    try:
        while len(got) < n:
            chunk = conn.recv(65536, timeout=30)
            if not chunk:
                break
            got += chunk
    finally:
        box["data"] = bytes(got)


def test_all_paths_down_for_2s_the_client_resumes_from_a_new_address(pair):
    before, during = os.urandom(200_000), os.urandom(100_000)
    with Stack(pair.b, inactivity_s=ITO_S) as server, Stack(pair.a, inactivity_s=ITO_S) as client:
        conn, srv = two_path_connection(pair, server, client)
        box: dict = {}
        reader = threading.Thread(target=read_all, args=(srv, len(before) + len(during), box), daemon=True)
        reader.start()
        conn.send(before)
        deadline = time.monotonic() + 10
        while conn.info().bytes_sent < len(before) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        info = conn.info().inactivity
        assert (info.local_s, info.peer_s, info.adopted_s) == (ITO_S, ITO_S, ITO_S)
        down = time.monotonic()
        links(pair, up=False)
        # during the outage path 1 gets a new address; the app keeps writing
        pair.sh(pair.a, "ip addr flush dev va1 && ip addr add 10.0.1.11/24 dev va1")
        conn.send(during)
        ev = events_of(client, conn.info().token, down + 1.8)
        assert "inactive" in [e.kind for e in ev], [(e.kind, e.reason) for e in ev]
        time.sleep(max(0.0, down + 2.0 - time.monotonic()))
        links(pair, up=True, devs=("va1",))   # only path 1 comes back, with its new address
        pair.sh(pair.a, "ip route add 10.0.0.0/24 dev va1 metric 200")
        ev += events_of(client, conn.info().token, time.monotonic() + 4)
        kinds = [e.kind for e in ev]
        assert "resumed" in kinds, [(e.kind, e.reason) for e in ev]
        conn.close()
        reader.join(20)
        assert hashlib.sha256(box["data"]).digest() == hashlib.sha256(before + during).digest()
        sub = [s for s in conn.info().subflows if s.state != "CLOSED"]
        assert [s.local[0] for s in sub] == ["10.0.1.11"], sub
        assert conn.info().inactivity.resumed == 1 and srv.info().inactivity.resumed == 1
        assert srv.info().state == "ESTABLISHED" and srv.info().token in server.tokens


def test_all_paths_down_for_6s_the_server_drops_the_state_after_the_timer(pair):
    with Stack(pair.b, inactivity_s=ITO_S) as server, Stack(pair.a, inactivity_s=ITO_S) as client:
        conn, srv = two_path_connection(pair, server, client)
        conn.send(b"hello")
        assert srv.recv(5, timeout=5) == b"hello"
        token = srv.info().token
        assert token in server.tokens
        down = time.monotonic()
        links(pair, up=False)
        ev = events_of(server, token, down + 6.0)
        links(pair, up=True)
        at = {}
        for e in ev:
            at.setdefault(e.kind, []).append(e.time)
        assert {"inactive", "expired", "closed"} <= set(at), [(e.kind, e.reason) for e in ev]
        last_dead = max(at["sf_closed"])
        # the state goes after the timer, within timer + 1 s of the last subflow's death
        assert ITO_S - 0.1 <= min(at["expired"]) - last_dead <= ITO_S + 1, (last_dead, at)
        assert token not in server.tokens and srv.info().state == "CLOSED"
        with pytest.raises(StackError, match="inactivity timer"):
            srv.recv(10, timeout=1)
        assert conn.wait_closed(3), conn.info()


def test_the_app_resumes_before_half_the_timer(pair):
    """Connection.resume() re-establishes as soon as a path is back (ITO 8 s: the automatic
    rounds would start only 4 s after the last subflow died)."""
    with Stack(pair.b, inactivity_s=8) as server, Stack(pair.a, inactivity_s=8) as client:
        conn, srv = two_path_connection(pair, server, client)
        with pytest.raises(StackError, match="only the connection's opener"):
            srv.resume(timeout=0.1)
        down = time.monotonic()
        links(pair, up=False)
        ev = events_of(client, conn.info().token, down + 2.6)   # dead after 4 x 0.5 s of silence
        assert "inactive" in [e.kind for e in ev], [(e.kind, e.reason) for e in ev]
        links(pair, up=True, devs=("va0",))
        conn.resume(timeout=3)
        took = time.monotonic() - down
        assert took < 5.0, took   # the automatic rounds start at 2 + 4 s
        assert conn.info().inactivity.inactive_for_s is None
        conn.send(b"after")
        assert srv.recv(5, timeout=5) == b"after"


def test_without_ito_nothing_is_probed_and_the_last_subflow_dying_closes(pair):
    """The stack as before: no keep-alives, no option on the wire, and a connection whose
    last subflow is reset fails at once (what the inactivity experiment compares against)."""
    with Stack(pair.b, record=True) as server, Stack(pair.a, record=True) as client:
        conn, srv = two_path_connection(pair, server, client)
        time.sleep(1.0)   # idle: nothing but the handshakes' segments
        sent = [s.segment for st in (server, client) for s in st.sent]
        assert not any(isinstance(o, InactivityTime) for seg in sent for o in seg.options)
        assert not any(seg.payload == b"\0" for seg in sent)
        assert conn.info().inactivity is None
        for sf in list(srv.subflows):
            with server.lock:
                srv.close_subflow(sf, 0, "test: reset")
        assert srv.wait_closed(2) and conn.wait_closed(2)


def test_user_client_with_ito_against_a_kernel_server(pair):
    pcap = pair.capture(pair.a, "va0")
    t, result = kernel_server(pair)
    data = os.urandom(300_000)
    with Stack(pair.a, record=True, inactivity_s=ITO_S) as st:
        conn = st.connect(("10.0.0.2", 5000), timeout=5)
        conn.send(data)
        conn.close()
        answer = conn.recv(100, timeout=20)
        t.join(10)
        assert answer.decode() == hashlib.sha256(data).hexdigest(), result
        info = conn.info().inactivity
        assert info.sends >= 1 and info.peer_s is None and info.adopted_s == ITO_S
        sent = [o for s in st.sent for o in s.segment.options if isinstance(o, InactivityTime)]
        assert sent and len(sent) <= 3
        pair.stop_captures()
        check_trace(pair, [pcap], [st])
