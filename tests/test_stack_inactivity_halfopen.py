"""ITO liveness with a half-open MP_JOIN (root): a join whose handshake never completes must
not keep a connection whose established subflows all died from going inactive and expiring.

The inactivity experiment's 200 idle connections (every path down while some joins were
still completing) left 15 connections held forever: each still had a join in SYN_RCVD
(retrying its SYN/ACK for about a minute), which the keep-alives do not probe because it
never got established. Here the server drops the join's third ACK, so the join stays
half-open on both sides (server SYN_RCVD, client waiting for the fourth ACK).
"""
from __future__ import annotations

import time

import pytest

from testbed.stack.options import MpJoinAck
from testbed.stack.stack import Stack
from tests.test_stack_inactivity import events_of, links
from tests.test_stack_interop import A_ADDRS, pair  # noqa: F401  (fixture)

pytestmark = pytest.mark.root

ITO_S = 2


def test_a_half_open_join_does_not_keep_a_dead_connection(pair):
    with Stack(pair.b, inactivity_s=ITO_S) as server, Stack(pair.a, inactivity_s=ITO_S) as client:
        server.tamper_rx = lambda _sf, seg: None if seg.option(MpJoinAck) is not None else seg
        lst = server.listen(6000)
        conn = client.connect(("10.0.0.2", 6000), paths=A_ADDRS[:1], timeout=5)
        srv = lst.accept(timeout=5)
        conn.send(b"hello")
        assert srv.recv(5, timeout=5) == b"hello"
        with client.lock:
            conn.open_join_to("10.0.0.2", 6000, 0)
        deadline = time.monotonic() + 3
        while len(srv.info().subflows) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        for c in (srv, conn):   # the join stays half-open on both sides
            assert [s.fully_established for s in c.info().subflows] == [True, False], c.info().subflows
        tokens = srv.info().token, conn.info().token
        down = time.monotonic()
        links(pair, up=False)
        try:
            # the initial subflow is found dead after 4 x 0.25 s of silence, then the timer runs
            timeline = {name: events_of(stack, token, down + 1.0 + ITO_S + 1.5)
                        for name, stack, token in (("server", server, tokens[0]), ("client", client, tokens[1]))}
        finally:
            links(pair, up=True)
        for name, ev in timeline.items():
            kinds = [e.kind for e in ev]
            assert "inactive" in kinds and "expired" in kinds, (name, [(e.kind, e.reason) for e in ev])
            inactive = next(e.time for e in ev if e.kind == "inactive")
            expired = next(e.time for e in ev if e.kind == "expired")
            assert ITO_S - 0.1 <= expired - inactive <= ITO_S + 1, (name, expired - inactive)
        assert tokens[0] not in server.tokens and srv.info().state == "CLOSED"
