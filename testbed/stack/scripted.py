"""A scripted MPTCP peer: segments built by hand with the stack's codec, sent
from one address of a namespace, and every segment that comes back.

Unlike `Stack`, nothing here reacts on its own: no retransmission, no ACK
clock, no option the script did not ask for. That is what a conformance test
against another implementation needs (in the spirit of packetdrill): put one
chosen packet on the wire, then look at exactly what the peer answers.

    with ScriptedPeer(netns, "10.0.0.1", "10.0.0.2") as peer:
        conn = peer.connect(5201)                 # MP_CAPABLE handshake, keys exchanged
        conn.initial.send(ACK, [conn.dss(payload=b"x" * 100)], b"x" * 100)
        seg = conn.initial.expect(lambda s: s.option(Dss) is not None)

Attachment is the stack's own (attach.py): AF_PACKET in, a raw socket out,
the owner nftables table that keeps the namespace's kernel TCP from answering
for the script's ports. Source ports come from the stack's client range.
"""
from __future__ import annotations

import itertools
import os
import select
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from testbed.stack.attach import CLIENT_PORTS, AttachError, NftGuard, PathPort, list_interfaces, \
    netns_path, run_in_netns
from testbed.stack.crypto import dss_checksum, idsn_of, join_ack_hmac, join_synack_hmac, new_key, \
    new_nonce, token_of
from testbed.stack.options import CAP_A_CHECKSUM, CAP_H_SHA256, Dss, MpCapable, MpJoinAck, MpJoinSyn, \
    MpJoinSynAck
from testbed.stack.packet import ACK, RST, SYN, DecodeError, IpPacket, Mss, TcpSegment, decode_ipv4, \
    encode_ipv4
from testbed.stack.trace import write_pcap

U32 = 0xFFFFFFFF
_tables = itertools.count()


class ScriptError(RuntimeError):
    """The peer did not answer as the script needs to go on (no SYN/ACK, no MP_CAPABLE, ...)."""


class ScriptedPeer:
    """Hand-built segments from `local` to `remote` in a namespace, and the segments that come back."""

    def __init__(self, netns: str | int | None, local: str, remote: str,
                 ports: tuple[int, int] = CLIENT_PORTS):
        """ports: the source ports to use (both ends included); another range than the
        stack's client ports lets the peer share an address with a running Stack, which
        answers segments to its own range only."""
        self.local, self.remote = local, remote
        self.received: list[TcpSegment] = []   # every segment from remote to local, in order
        self.wire: list[tuple[float, bytes]] = []  # (wall time, IPv4 packet) both ways, for write_pcap
        self._ports = itertools.cycle(range(ports[0], ports[1] + 1))

        def attach() -> tuple[NftGuard, PathPort]:
            iface = next((i for i in list_interfaces() if i.addr == local), None)
            if iface is None:
                raise AttachError(f"no interface with address {local} in the namespace")
            guard = NftGuard(f"mptb_script_{os.getpid()}_{next(_tables)}")
            try:
                guard.add_addresses([local])
                if tuple(ports) != CLIENT_PORTS:
                    guard.add_ports(*ports)
                return guard, PathPort(iface, [local])
            except BaseException:
                guard.close()
                raise

        self._guard, self._port = run_in_netns(netns_path(netns), attach)
        self._poll = select.poll()
        self._poll.register(self._port.fileno(), select.POLLIN)

    def new_port(self) -> int:
        """A source port of the stack's client range not used before by this peer."""
        return next(self._ports)

    def send(self, seg: TcpSegment) -> None:
        """Put one segment on the wire, exactly as given."""
        packet = encode_ipv4(IpPacket(self.local, self.remote, seg))
        self.wire.append((time.time(), packet))
        self._port.send(packet, self.remote)

    def _read(self, timeout: float) -> None:
        """Move whatever arrives within timeout into `received`."""
        if not self._poll.poll(max(0, timeout) * 1000):
            return
        while (got := self._port.receive()) is not None:
            data, verify = got
            try:
                pkt = decode_ipv4(data, verify_tcp_checksum=verify)
            except DecodeError:
                continue
            if pkt.src == self.remote and pkt.dst == self.local:
                self.received.append(pkt.tcp)
                self.wire.append((time.time(), bytes(data)))

    def expect(self, match: Callable[[TcpSegment], bool], timeout: float = 1.0,
               since: int = 0) -> TcpSegment | None:
        """The first segment received (from index `since` of `received`) that matches,
        waiting up to timeout; None when none came."""
        deadline = time.monotonic() + timeout
        while True:
            for seg in self.received[since:]:
                if match(seg):
                    return seg
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._read(min(left, 0.05))

    def settle(self, seconds: float) -> list[TcpSegment]:
        """Everything that arrives within the next `seconds`."""
        start = len(self.received)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._read(min(left, 0.05))
        return self.received[start:]

    def subflow(self, dport: int, sport: int | None = None) -> "ScriptedSubflow":
        """A TCP four-tuple of this peer, nothing sent yet."""
        return ScriptedSubflow(self, sport or self.new_port(), dport,
                               int.from_bytes(os.urandom(4), "big"))

    def connect(self, dport: int, checksum: bool = False, syn_options: list | None = None,
                third_ack: bool = True, timeout: float = 1.0) -> "ScriptedConnection":
        """An MPTCP v1 connection by the book: SYN with MP_CAPABLE (or syn_options
        instead), the SYN/ACK's key read, and (unless third_ack=False) the third ACK
        carrying both keys. ScriptError if the SYN/ACK does not come or has no key."""
        sf = self.subflow(dport)
        flags = CAP_H_SHA256 | (CAP_A_CHECKSUM if checksum else 0)
        opts = syn_options if syn_options is not None else [MpCapable(flags)]
        synack = sf.handshake(opts, timeout)
        if synack is None:
            raise ScriptError(f"no SYN/ACK from {self.remote}:{dport} within {timeout} s")
        cap = synack.option(MpCapable)
        if cap is None or cap.sender_key is None:
            raise ScriptError(f"the SYN/ACK from {self.remote}:{dport} carries no MP_CAPABLE key")
        conn = ScriptedConnection(self, sf, new_key(), cap.sender_key,
                                  checksum=bool((flags | cap.flags) & CAP_A_CHECKSUM))
        if third_ack:
            sf.send(ACK, [MpCapable(cap.flags & CAP_A_CHECKSUM | CAP_H_SHA256, conn.local_key,
                                    conn.remote_key)])
        return conn

    def write_pcap(self, path: str | Path) -> None:
        """Every packet sent and received so far, as a pcap (raw IPv4) for tshark or Wireshark."""
        write_pcap(path, [p for _, p in self.wire], [t for t, _ in self.wire])

    def close(self) -> None:
        """Close the sockets and drop the nftables table."""
        self._port.close()
        self._guard.close()

    def __enter__(self) -> "ScriptedPeer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class ScriptedSubflow:
    """One four-tuple: the next sequence number to send and the next one expected."""
    peer: ScriptedPeer
    sport: int
    dport: int
    isn: int
    snd_nxt: int = -1
    rcv_nxt: int = 0
    peer_isn: int = 0
    join_nonces: tuple[int, int] | None = None   # (ours, the peer's) once an MP_JOIN SYN/ACK came

    def __post_init__(self) -> None:
        if self.snd_nxt < 0:
            self.snd_nxt = self.isn

    def send(self, flags: int, options: list | None = None, payload: bytes = b"",
             seq: int | None = None) -> TcpSegment:
        """Send one segment at snd_nxt (or at seq) acknowledging rcv_nxt; snd_nxt moves on."""
        seg = TcpSegment(self.sport, self.dport,
                         (self.snd_nxt if seq is None else seq) & U32,
                         self.rcv_nxt & U32 if flags & ACK else 0, flags, 65535,
                         list(options or []), payload)
        self.peer.send(seg)
        if seq is None:
            self.snd_nxt = (self.snd_nxt + seg.seg_len()) & U32
        return seg

    def mine(self, seg: TcpSegment) -> bool:
        """True when seg belongs to this four-tuple."""
        return seg.sport == self.dport and seg.dport == self.sport

    def expect(self, match: Callable[[TcpSegment], bool] = lambda s: True, timeout: float = 1.0,
               since: int = 0) -> TcpSegment | None:
        """The first segment of this four-tuple that matches; rcv_nxt follows in-order data."""
        seg = self.peer.expect(lambda s: self.mine(s) and match(s), timeout, since)
        if seg is not None and not seg.flags & RST and seg.seq == self.rcv_nxt and seg.seg_len():
            self.rcv_nxt = (seg.seq + seg.seg_len()) & U32
        return seg

    def handshake(self, options: list, timeout: float = 1.0) -> TcpSegment | None:
        """Send a SYN with these options (and an MSS); the SYN/ACK, or an RST, or None."""
        start = len(self.peer.received)
        self.syn(options)
        return self.synack(timeout, since=start)

    def syn(self, options: list) -> TcpSegment:
        """Send a SYN with these options (and an MSS), nothing awaited: many subflows'
        SYNs can be in flight before their answers are read with synack()."""
        return self.send(SYN, [Mss(1460), *options])

    def synack(self, timeout: float = 1.0, since: int = 0) -> TcpSegment | None:
        """The answer to this subflow's SYN (SYN/ACK or RST, from index `since` of the
        peer's received segments) or None; a SYN/ACK sets the sequence numbers to go on."""
        seg = self.expect(lambda s: bool(s.flags & RST) or s.flags & (SYN | ACK) == SYN | ACK,
                          timeout, since=since)
        if seg is not None and seg.flags & SYN:
            self.peer_isn = seg.seq
            self.rcv_nxt = (seg.seq + 1) & U32
        return seg

    def relative(self, seq: int) -> int:
        """Sequence number relative to this side's ISN (what a DSS mapping carries)."""
        return (seq - self.isn) & U32


@dataclass
class ScriptedConnection:
    """The MPTCP connection of a ScriptedPeer: keys, data sequence numbers, subflows."""
    peer: ScriptedPeer
    initial: ScriptedSubflow
    local_key: int
    remote_key: int
    checksum: bool = False
    snd_dsn: int = -1         # next data sequence number to send (64-bit)
    subflows: list[ScriptedSubflow] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.snd_dsn < 0:
            self.snd_dsn = (idsn_of(self.local_key) + 1) & 0xFFFFFFFFFFFFFFFF
        self.subflows = [self.initial, *self.subflows]

    @property
    def remote_token(self) -> int:
        """The peer's connection token (what an MP_JOIN SYN names)."""
        return token_of(self.remote_key)

    @property
    def remote_idsn(self) -> int:
        """The peer's initial data sequence number."""
        return idsn_of(self.remote_key)

    def dss(self, sf: ScriptedSubflow | None = None, payload: bytes = b"", dsn: int | None = None,
            data_ack: int | None = None, data_fin: bool = False, checksum: int | None = None,
            seq: int | None = None) -> Dss:
        """A DSS mapping `payload` at dsn (default: the next one) for a segment sent at
        seq (default: the subflow's snd_nxt); checksum computed when negotiated unless
        given. data_fin adds one to the data-level length."""
        sf = sf or self.initial
        dsn = self.snd_dsn if dsn is None else dsn
        ssn = sf.relative(sf.snd_nxt if seq is None else seq)
        length = len(payload) + int(data_fin)
        if checksum is None and self.checksum:
            checksum = dss_checksum(dsn, ssn, length, payload)
        return Dss(data_ack=self.remote_idsn + 1 if data_ack is None else data_ack,
                   dsn=dsn, subflow_seq=ssn, data_len=length, checksum=checksum, data_fin=data_fin)

    def send_data(self, payload: bytes, sf: ScriptedSubflow | None = None, **dss_args) -> TcpSegment:
        """Send payload with a DSS mapping at the next data sequence number; it moves on."""
        sf = sf or self.initial
        opt = self.dss(sf, payload, **dss_args)
        seg = sf.send(ACK, [opt], payload)
        if dss_args.get("dsn") is None:
            self.snd_dsn = (self.snd_dsn + len(payload)) & 0xFFFFFFFFFFFFFFFF
        return seg

    def join(self, addr_id: int = 1, backup: bool = False, hmac160: bytes | None = None,
             token: int | None = None, timeout: float = 1.0, third_ack_options: list | None = None,
             payload: bytes = b"") -> tuple[ScriptedSubflow, TcpSegment | None]:
        """Open a subflow with MP_JOIN: SYN (token, nonce), and when a SYN/ACK comes, the
        third ACK with the HMAC (hmac160 overrides the right one; third_ack_options and
        payload ride along). Returns the subflow and the SYN/ACK (or RST, or None)."""
        sf = self.peer.subflow(self.initial.dport)
        nonce = new_nonce()
        answer = sf.handshake([MpJoinSyn(self.remote_token if token is None else token, nonce,
                                         addr_id, backup)], timeout)
        if answer is not None and answer.flags & SYN:
            synack = answer.option(MpJoinSynAck)
            if synack is not None:
                mac = join_ack_hmac(self.local_key, self.remote_key, nonce, synack.nonce)
                sf.send(ACK, [MpJoinAck(mac if hmac160 is None else hmac160), *(third_ack_options or [])],
                        payload)
                sf.join_nonces = (nonce, synack.nonce)
            self.subflows.append(sf)
        return sf, answer

    def synack_hmac_valid(self, sf: ScriptedSubflow, synack: TcpSegment) -> bool:
        """Whether a join SYN/ACK's truncated HMAC is the one RFC 8684 §3.2 defines."""
        opt = synack.option(MpJoinSynAck)
        return opt is not None and sf.join_nonces is not None and opt.hmac64 == join_synack_hmac(
            self.remote_key, self.local_key, opt.nonce, sf.join_nonces[0])
