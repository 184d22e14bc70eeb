"""User-space MPTCP stack: two connections wired back to back in memory (no namespaces, no root).

Every segment goes through the real codec (encode to IPv4 bytes, decode again),
so these tests exercise the protocol engine deterministically: loss and
recovery, DATA_FIN in both directions, a corrupted payload caught by the DSS
checksum, a mapping that covers several segments.
"""
from __future__ import annotations

import os
import threading
import time
from types import SimpleNamespace

from testbed.stack.connection import Connection
from testbed.stack.options import Dss, MpFail
from testbed.stack.packet import RST, SYN, IpPacket, TcpSegment, decode_ipv4, encode_ipv4
from testbed.stack.subflow import State, Subflow


class MemoryStack:
    """The hooks a Connection needs from its Stack, with an outbox instead of a wire."""

    def __init__(self, addr: str, lock):
        self.addr = addr
        self.lock = lock   # one lock for both sides: the engine runs under its stack's lock
        self.outbox: list[tuple[Subflow, bytes]] = []
        self.events = []
        self.logs = []
        self.t0 = time.monotonic()
        self.port = SimpleNamespace(iface=SimpleNamespace(mtu=1500, addr=addr))

    def ts_now(self):
        return int((time.monotonic() - self.t0) * 1000) + 1

    def transmit(self, sf, seg):
        self.outbox.append((sf, encode_ipv4(IpPacket(sf.laddr, sf.raddr, seg))))

    def emit_event(self, ev):
        self.events.append(ev.kind)

    def log(self, msg):
        self.logs.append(msg)

    def register_token(self, conn): pass
    def unregister(self, conn): pass
    def forget_subflow(self, sf): pass
    def listener_ready(self, conn): pass
    def wake(self): pass


class Wire:
    """Client A and server B joined by a lossless-unless-told in-memory link."""

    def __init__(self, checksum: bool = False):
        self.lock = threading.RLock()
        self.lock.acquire()   # held for the wire's whole life: these tests are single-threaded
        self.a, self.b = MemoryStack("10.0.0.1", self.lock), MemoryStack("10.0.0.2", self.lock)
        self.client = Connection(self.a, active=True, checksum=checksum)
        sf = Subflow(self.client, self.a.port, "10.0.0.1", 61000, "10.0.0.2", 80, join=False, active=True)
        self.client.subflows.append(sf)
        self.server: Connection | None = None
        self.filter = lambda direction, seg: seg     # return None to drop, or a (modified) segment
        sf.send_syn()

    def server_connection(self) -> Connection:
        """The passive connection the client's first SYN creates (subclasses add options)."""
        return Connection(self.b, active=False, checksum=False)

    def _arrive(self, stack_to, raw: bytes, direction: str):
        seg = self.filter(direction, decode_ipv4(raw).tcp)
        if seg is None:
            return
        if direction == "a->b":
            if self.server is None:
                self.server = self.server_connection()
                sf = Subflow(self.server, self.b.port, "10.0.0.2", 80, "10.0.0.1", 61000, join=False, active=False)
                sf.learn_syn(seg)
                self.server.on_passive_syn(sf, seg)
                self.server.subflows.append(sf)
                sf.send_synack()
                return
            target = self.server
        else:
            target = self.client
        if target.subflows:
            target.subflows[0].on_segment(seg)

    def pump(self, rounds: int = 100000, until=lambda: False) -> None:
        """Move packets both ways, fire due timers, until nothing moves (or until())."""
        for _ in range(rounds):
            if until():
                return
            moved = False
            for stack, direction in ((self.a, "a->b"), (self.b, "b->a")):
                out, stack.outbox = stack.outbox, []
                for _sf, raw in out:
                    moved = True
                    self._arrive(None, raw, direction)
            for conn in (self.client, self.server):
                if conn is None:
                    continue
                for sf in list(conn.subflows):
                    if sf.ack_pending:
                        sf.send_ack()
                conn.push()
            if not moved and not self.a.outbox and not self.b.outbox:
                # nothing in flight: let the earliest retransmission timer expire
                timers = [(sf.rto_deadline, sf) for c in (self.client, self.server) if c
                          for sf in c.subflows if sf.rto_deadline is not None]
                timers += [(c.data_fin_deadline, c) for c in (self.client, self.server)
                           if c and c.data_fin_deadline is not None]
                if not timers:
                    return
                deadline, obj = min(timers, key=lambda t: t[0])
                obj.on_timer(max(deadline, time.monotonic()))


def transfer(wire: Wire, data: bytes) -> bytes:
    wire.pump(until=lambda: wire.client.state == "ESTABLISHED" and wire.server is not None
              and wire.server.state == "ESTABLISHED")
    with wire.a.lock:
        wire.client.tx += data
        wire.client.tx_closed = True
        wire.client.push()
    wire.pump()
    return bytes(wire.server.rx)


def test_transfer_with_data_fin_both_ways_closes_cleanly():
    w = Wire()
    data = os.urandom(300_000)
    assert transfer(w, data) == data
    assert w.server.eof
    w.server.tx_closed = True
    w.server.push()
    w.pump()
    assert w.client.eof and w.client.data_fin_acked and w.server.data_fin_acked
    assert w.client.state == w.server.state == "CLOSED"
    assert w.client.error is None and w.server.error is None
    assert "closed" in w.a.events and "closed" in w.b.events


def test_lost_segments_are_recovered_by_fast_retransmit():
    w = Wire()
    dropped = set()

    def lossy(direction, seg):
        # drop every 9th data segment, once
        if direction == "a->b" and seg.payload and (seg.seq // 1420) % 9 == 4 and seg.seq not in dropped:
            dropped.add(seg.seq)
            return None
        return seg

    w.filter = lossy
    data = os.urandom(400_000)
    assert transfer(w, data) == data
    sf = w.client.subflows[0] if w.client.subflows else None
    info = w.client.info()
    subs = info.subflows + info.closed_subflows
    assert dropped and subs[0].bytes_retransmitted >= len(dropped) * 1000
    assert subs[0].fast_retransmits >= 1
    assert sf is None or sf.state in (State.ESTABLISHED, State.FIN_WAIT_1, State.FIN_WAIT_2)


def test_corrupted_payload_is_caught_by_the_dss_checksum():
    # One subflow (§3.7): the receiver sends MP_FAIL, the sender answers with the
    # infinite mapping, and both continue as plain TCP; the rewritten bytes are
    # delivered as the middlebox left them (the subflow acknowledged them).
    w = Wire(checksum=True)
    seen = {"fail": [], "infinite": [], "rst": [], "rewritten": 0}

    def corrupt(direction, seg):
        dss = seg.option(Dss)
        if direction == "a->b" and seg.payload and dss is not None and dss.dsn is not None and \
                seg.seq - w.client.subflows[0].iss > 5000 and not seen["rewritten"]:
            # a middlebox rewriting payload (and fixing the TCP checksum, as NATs do)
            seg.payload = bytes([seg.payload[0] ^ 0xFF]) + seg.payload[1:]
            seen["rewritten"] += 1
        if direction == "a->b" and dss is not None and dss.infinite:
            seen["infinite"].append(dss)
        if direction == "b->a" and seg.option(MpFail) is not None:
            seen["fail"].append(seg.option(MpFail))
        if seg.flags & RST:
            seen["rst"].append(seg)
        return seg

    w.filter = corrupt
    data = os.urandom(20_000)
    got = transfer(w, data)
    assert len(seen["fail"]) == 1 and len(seen["infinite"]) == 1 and not seen["rst"]
    assert len(got) == len(data) and sum(a != b for a, b in zip(got, data)) == 1
    assert w.client.fallback_reason == w.server.fallback_reason == "infinite mapping"
    assert any("checksum" in line for line in w.b.logs)


def test_a_mapping_may_cover_several_segments_and_arrive_before_its_data():
    w = Wire()
    w.pump(until=lambda: w.server is not None and w.server.state == "ESTABLISHED")
    w.pump()
    server_sf = w.server.subflows[0]
    dsn0 = w.server.rcv_nxt
    data = os.urandom(3000)
    base = server_sf.rcv_nxt
    one_mapping = Dss(data_ack=w.server.snd_una, dsn=dsn0, subflow_seq=base - server_sf.irs, data_len=3000)
    first = TcpSegment(61000, 80, base, server_sf.snd_nxt, 0x10, 1000, [one_mapping], data[:1000])
    rest = [TcpSegment(61000, 80, base + off, server_sf.snd_nxt, 0x10, 1000, [], data[off:off + 1000])
            for off in (1000, 2000)]
    for seg in (rest[1], first, rest[0]):   # out of order at the subflow level, too
        server_sf.on_segment(decode_ipv4(encode_ipv4(IpPacket("10.0.0.1", "10.0.0.2", seg))).tcp)
    assert bytes(w.server.rx) == data
    assert w.server.rcv_nxt == dsn0 + 3000


def test_syn_without_answer_fails_after_retries():
    w = Wire()
    w.filter = lambda direction, seg: None if seg.flags & SYN else seg
    w.pump()
    assert w.client.state == "CLOSED" and w.client.error == "no answer to SYN"


def test_a_full_receive_window_stops_the_sender_until_the_application_reads():
    from testbed.stack.connection import RCVBUF
    w = Wire()
    data = os.urandom(3 * RCVBUF)
    w.pump(until=lambda: w.server is not None and w.server.state == "ESTABLISHED")
    w.client.tx += data
    w.client.tx_closed = True
    w.client.push()
    w.pump()
    # nobody read: the sender stopped at the advertised window, not beyond
    assert len(w.server.rx) <= RCVBUF
    assert w.client.snd_nxt - w.client.snd_una <= RCVBUF
    got = bytearray()
    for _ in range(1000):
        if w.server.rx:
            got += w.server.recv(1 << 20, timeout=0.01)   # the window update goes out with the next pump
        w.pump()
        if w.server.eof and not w.server.rx:
            break
    assert bytes(got) == data
