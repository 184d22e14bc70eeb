"""Schedulers of the user-space stack (lowest-RTT, round-robin, redundant) and when a join may
be sent, without a network."""
from __future__ import annotations

import pytest

from testbed.stack.scheduler import SCHEDULERS, make_scheduler

MSS = 1000


class FakeSubflow:
    """What a scheduler reads of a subflow, and a send_data that records and fills the window."""

    def __init__(self, name, rtt, cwnd=10 * MSS, backup=False, stale=False):
        self.name, self.rtt, self.backup, self.stale = name, rtt, backup, stale
        self.mss, self.inflight = MSS, 0
        self.cc = type("CC", (), {"cwnd": cwnd})()
        self.sent: list[tuple[int, bytes]] = []

    def can_send_data(self):
        return True

    def retransmit_lost(self):
        pass

    def expected_rtt(self):
        return self.rtt

    def send_data(self, dsn, payload):
        self.sent.append((dsn, payload))
        self.inflight += len(payload)


class FakeConnection:
    """A stream with snd_una / snd_nxt and a push loop like Connection.push's."""

    def __init__(self, subflows, scheduler):
        self.subflows = subflows
        self.scheduler = make_scheduler(scheduler)
        self.stream = bytes(range(256)) * 400
        self.snd_una = self.snd_nxt = 0

    def unacked_bytes(self, dsn, n):
        assert dsn >= self.snd_una
        return self.stream[dsn:dsn + n]

    def push(self, upto):
        while self.snd_nxt < upto:
            sf = self.scheduler.pick(self, upto - self.snd_nxt)
            if sf is None:
                break
            payload = self.stream[self.snd_nxt:self.snd_nxt + MSS]
            sf.send_data(self.snd_nxt, payload)
            self.scheduler.on_sent(self, sf, self.snd_nxt, payload)
            self.snd_nxt += len(payload)
        self.scheduler.catch_up(self)


def test_registry_names_and_unknown_name():
    assert set(SCHEDULERS) == {"lowrtt", "roundrobin", "redundant"}
    assert all(make_scheduler(n).name == n for n in SCHEDULERS)
    assert make_scheduler("redundant") is not make_scheduler("redundant")   # one per connection
    with pytest.raises(ValueError, match="unknown scheduler 'fastest' .*lowrtt, roundrobin, redundant"):
        make_scheduler("fastest")


def test_lowrtt_fills_the_fastest_subflow_first():
    a, b = FakeSubflow("a", 0.05), FakeSubflow("b", 0.01)
    FakeConnection([a, b], "lowrtt").push(15 * MSS)
    assert len(b.sent) == 10 and len(a.sent) == 5


def test_roundrobin_takes_turns_and_skips_a_full_window():
    a, b, c = FakeSubflow("a", 0.05), FakeSubflow("b", 0.01), FakeSubflow("c", 0.02, cwnd=MSS)
    conn = FakeConnection([a, b, c], "roundrobin")
    conn.push(7 * MSS)
    order = sorted([(dsn, sf.name) for sf in (a, b, c) for dsn, _ in sf.sent])
    assert [n for _, n in order] == ["a", "b", "c", "a", "b", "a", "b"]   # c's window holds one segment


def test_roundrobin_keeps_backups_out_while_a_regular_subflow_works():
    a, bk = FakeSubflow("a", 0.05), FakeSubflow("bk", 0.01, backup=True)
    FakeConnection([a, bk], "roundrobin").push(5 * MSS)
    assert len(a.sent) == 5 and not bk.sent


def test_redundant_sends_every_segment_on_every_subflow():
    a, b = FakeSubflow("a", 0.01), FakeSubflow("b", 0.05)
    conn = FakeConnection([a, b], "redundant")
    conn.push(5 * MSS)
    assert a.sent == b.sent and [d for d, _ in a.sent] == [0, 1000, 2000, 3000, 4000]


def test_redundant_lagging_subflow_catches_up_with_copies_but_never_holds_the_stream():
    fast, slow = FakeSubflow("fast", 0.01, cwnd=20 * MSS), FakeSubflow("slow", 0.05, cwnd=4 * MSS)
    conn = FakeConnection([fast, slow], "redundant")
    conn.push(12 * MSS)
    assert len(fast.sent) == 12 and [d for d, _ in slow.sent] == [0, 1000, 2000, 3000]
    # the slow path's window opens after the peer acknowledged the first 6 segments at the
    # data level: it resumes at the first byte not yet acknowledged, with the same bytes
    slow.inflight = 0
    conn.snd_una = 6 * MSS
    conn.push(12 * MSS)
    assert [d for d, _ in slow.sent[4:]] == [6000, 7000, 8000, 9000]
    assert all(p == conn.stream[d:d + MSS] for d, p in slow.sent)
    assert len(fast.sent) == 12          # nothing new: the fast path is not asked to repeat itself


def test_redundant_scheduler_in_the_real_connection_copies_a_segment_onto_a_joined_subflow():
    """Through Connection.push: the hooks (on_sent, catch_up, unacked_bytes) are wired."""
    from test_stack_engine import Wire

    wire = Wire()
    wire.client.scheduler = make_scheduler("redundant")
    wire.pump(until=lambda: wire.server is not None and wire.server.state == "ESTABLISHED")
    first = wire.client.subflows[0]
    twin = FakeSubflow("twin", 0.5, cwnd=100 * MSS)
    twin.mss = first.mss
    with wire.a.lock:
        wire.client.subflows.append(twin)
        wire.client.tx += b"x" * 3000
        wire.client.push()
    start = wire.client.snd_una
    assert b"".join(p for _d, p in twin.sent) == b"x" * 3000 and twin.sent[0][0] == start
    assert first.stats.bytes_sent == 3000


def test_a_join_waits_until_the_peer_has_processed_the_third_ack():
    """add_subflow sends its MP_JOIN SYN only after the peer's first DSS (or two RTTs): an
    earlier join can overtake the third ACK on a path of equal delay, and Linux resets it
    (MPJoinNoTokenFound)."""
    import time

    from test_stack_engine import Wire
    from testbed.stack.connection import StackError

    wire = Wire()
    wire.pump(until=lambda: wire.server is not None and wire.server.state == "ESTABLISHED")
    opened = []

    def open_subflow(conn, laddr, raddr, rport, **kw):
        opened.append(time.monotonic())
        raise StackError("recorded")

    wire.a.open_subflow = open_subflow
    client = wire.client
    assert not client.peer_dss_seen
    grace = max(2 * client.subflows[0].srtt, 0.02)
    t0 = time.monotonic()
    with pytest.raises(StackError, match="recorded"):
        client.add_subflow("10.0.1.1")
    assert opened[0] - t0 >= grace * 0.9
    client.peer_dss_seen = True          # the peer has acknowledged at the data level: no wait
    t0 = time.monotonic()
    with pytest.raises(StackError, match="recorded"):
        client.add_subflow("10.0.1.1")
    assert opened[1] - t0 < grace / 2
