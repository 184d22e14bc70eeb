"""One TCP subflow: the RFC 9293 state machine, RFC 6298 RTO, NewReno fast recovery.

A Subflow knows TCP only. Everything MPTCP (which option to put on a segment,
what a received option means, where received bytes go at the data level) is
asked of its Connection through a handful of hooks (conn.on_*). All methods
run under the stack's lock.

Sequence numbers are kept unwrapped (plain growing integers) and reduced
modulo 2**32 only on the wire, so comparisons are ordinary integer ones.
"""
from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from testbed.stack.cc import make_cc
from testbed.stack.packet import (ACK, FIN, RST, SYN, Mss, Sack, SackPermitted, TcpSegment, Timestamps,
                                  WindowScale, encode_tcp_options)

if TYPE_CHECKING:  # pragma: no cover
    from testbed.stack.connection import Connection

MASK32 = 0xFFFFFFFF
RCV_WSCALE = 7            # 4 MiB windows fit in 16 bits << 7
MIN_RTO, MAX_RTO, INITIAL_RTO = 0.2, 60.0, 1.0  # min 200 ms like Linux (RFC 6298 says 1 s)
SYN_RETRIES = 5
MAX_DATA_RTOS = 10        # consecutive RTOs before the subflow is declared dead
HYSTART_SAMPLES = 8       # RTT samples per round before HyStart judges the delay
HYSTART_MIN, HYSTART_MAX = 0.004, 0.016   # its delay-increase threshold, like Linux's
OPTION_ROOM = 40          # TS (12) + the largest DSS (28): payload = MSS - 40


def unwrap32(value: int, ref: int) -> int:
    """The unwrapped integer closest to ref whose low 32 bits are value."""
    return ref + (((value - ref + 0x80000000) & MASK32) - 0x80000000)


class State:
    """TCP states (RFC 9293 §3.3.2)."""
    CLOSED = "CLOSED"
    SYN_SENT = "SYN_SENT"
    SYN_RCVD = "SYN_RCVD"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN_WAIT_1"
    FIN_WAIT_2 = "FIN_WAIT_2"
    CLOSING = "CLOSING"
    TIME_WAIT = "TIME_WAIT"
    CLOSE_WAIT = "CLOSE_WAIT"
    LAST_ACK = "LAST_ACK"


SYNCHRONIZED = {State.ESTABLISHED, State.FIN_WAIT_1, State.FIN_WAIT_2, State.CLOSING,
                State.TIME_WAIT, State.CLOSE_WAIT, State.LAST_ACK}
CAN_SEND = {State.ESTABLISHED, State.CLOSE_WAIT}


@dataclass
class TxSegment:
    """A sent segment kept until acknowledged: its bytes and the data-level range it maps."""
    seq: int
    payload: bytes
    flags: int
    dsn: int | None
    sent_at: float
    retransmitted: bool = False
    lost: bool = False
    mpc_form: bool = False   # sent with MP_CAPABLE+data instead of DSS: repeat that form
    sacked: bool = False     # inside a SACK block of the peer: delivered, neither in flight nor lost

    @property
    def end(self) -> int:
        """Sequence number after this segment."""
        return self.seq + len(self.payload) + (1 if self.flags & (SYN | FIN) else 0)


@dataclass
class SubflowStats:
    """Byte and event counters of one subflow."""
    bytes_sent: int = 0
    bytes_retransmitted: int = 0
    bytes_acked: int = 0
    bytes_received: int = 0
    segments_sent: int = 0
    segments_received: int = 0
    fast_retransmits: int = 0
    timeouts: int = 0


class Subflow:
    """TCP endpoint state of one subflow, attached to a path port of the stack."""

    def __init__(self, conn: "Connection", port, laddr: str, lport: int, raddr: str, rport: int,
                 *, join: bool, active: bool, backup: bool = False, addr_id: int = 0, cc: str = "cubic"):
        self.conn = conn
        self.port = port
        self.laddr, self.lport, self.raddr, self.rport = laddr, lport, raddr, rport
        self.join, self.active, self.backup, self.addr_id = join, active, backup, addr_id
        self.state = State.CLOSED
        self.iss = int.from_bytes(os.urandom(4), "big")
        self.snd_una = self.snd_nxt = self.iss
        self.snd_wnd = 65535
        self.irs = 0
        self.rcv_nxt = 0
        self.snd_wscale = 0
        self.ws_ok = False
        self.ts_ok = False
        self.ts_recent = 0
        local_mss = port.iface.mtu - 40
        self.local_mss = local_mss
        self.mss = local_mss - OPTION_ROOM
        self.rtx: deque[TxSegment] = deque()
        self.inflight = 0
        self.lost_count = 0
        self.srtt: float | None = None
        self.min_rtt: float | None = None
        self.rttvar = 0.0
        self.rto = INITIAL_RTO
        self.rto_deadline: float | None = None
        self.rto_count = 0
        self.syn_tries = 0
        self.dupacks = 0
        self.in_recovery = False
        self.recover = 0
        self.sack_ok = False              # both SYNs carried SACK-permitted: the peer may send SACK blocks
        self.sack_seen = False            # ... and it does: loss detection by RACK, not duplicate ACKs
        self.rack_sent_at = 0.0           # RACK: send time of the latest segment known delivered
        self.round_end = 0                # HyStart: the round ends when this sequence is acked
        self.last_ooo = 0                 # sequence of the latest out-of-order segment (first SACK block)
        self.round_rtts: list[float] = []
        self.cc_name = cc
        self.cc = make_cc(cc, self.mss, conn.coupling)
        self.rx_ooo: dict[int, tuple[bytes, bool]] = {}
        self.ack_pending = False
        self.fin_queued = False
        self.stale = False
        self.reset_reason: int | None = None
        self.stats = SubflowStats()
        # MP_JOIN handshake state
        self.local_nonce = 0
        self.remote_nonce = 0
        self.join_third_ack = None       # option to repeat until the peer's fourth ACK
        self.fully_established = not join
        self.syn_sent_at = 0.0
        self.rx_maps: list = []          # data-level mappings received (connection-owned type)
        self.unmapped: list[tuple[int, bytes]] = []   # bytes that arrived before their mapping
        self.remote_addr_id: int | None = None   # the peer's address ID (0: its initial address)
        self.srl_limiter = None          # rate_limit.SubflowLimiter: the peer's SRL, enforced on our sending
        self.srl_request = None          # rate_limit.RateRequest: the SRL we sent the peer on this subflow

    # ------------------------------------------------------------------ info
    @property
    def key(self) -> tuple[str, int, str, int]:
        """Demultiplexing key: local address/port, remote address/port."""
        return (self.laddr, self.lport, self.raddr, self.rport)

    def can_send_data(self) -> bool:
        """True when new data may be scheduled here (RFC 8684: joins wait for the fourth ACK)."""
        return self.state in CAN_SEND and self.fully_established and not self.fin_queued

    def expected_rtt(self) -> float:
        """RTT a new segment should see: srtt, or the path's minimum when nothing is queued on it.

        An idle subflow gets no new samples, so its srtt keeps the queueing delay
        of its last busy period; without this, a scheduler limited by the peer's
        window (not by cwnd) would keep choosing the subflow it happened to use last.
        """
        if self.srtt is None:
            return 1.0
        if self.inflight == 0 and self.min_rtt is not None:
            return self.min_rtt
        return self.srtt

    def cwnd_room(self) -> int:
        """Bytes the congestion window still allows in flight."""
        return int(self.cc.cwnd) - self.inflight

    # ------------------------------------------------------------------ output
    def segment(self, flags: int, seq: int, payload: bytes = b"", mptcp=()) -> TcpSegment:
        """A segment of this subflow with TS/window fields filled in."""
        opts: list = []
        now = self.conn.stack.ts_now()
        if flags & SYN:
            opts.append(Mss(self.local_mss))
            if self.active or self.ts_ok:
                opts.append(Timestamps(now, self.ts_recent))
            if self.active or self.ws_ok:
                opts.append(WindowScale(RCV_WSCALE))
            if self.active or self.sack_ok:
                opts.append(SackPermitted())
            window = min(self.conn.rcv_window(), 0xFFFF)
        else:
            if self.ts_ok:
                opts.append(Timestamps(now, self.ts_recent))
            window = self.conn.rcv_window() >> (RCV_WSCALE if self.ws_ok else 0)
        ito = getattr(self.conn, "ito", None)
        if ito is not None and not flags & (SYN | RST):
            mptcp = ito.attach(self, list(mptcp))   # our ITO when due (stack/inactivity.py)
        offsets = self.conn.dsn_offsets   # per-subflow DSN offsets agreed (stack/privacy.py)
        opts.extend(mptcp if offsets is None else offsets.outgoing(self, list(mptcp)))
        return TcpSegment(self.lport, self.rport, seq & MASK32, self.rcv_nxt & MASK32 if flags & ACK else 0,
                          flags, min(window, 0xFFFF), opts, payload)

    def emit(self, seg: TcpSegment) -> None:
        """Hand a segment to the stack for transmission."""
        self.stats.segments_sent += 1
        self.conn.stack.transmit(self, seg)

    def send_syn(self) -> None:
        """First SYN (active open)."""
        self.state = State.SYN_SENT
        self.syn_sent_at = time.monotonic()
        self.snd_nxt = self.iss + 1
        self.rtx.append(TxSegment(self.iss, b"", SYN, None, time.monotonic()))
        self._send_syn_or_synack()
        self.arm_rto()

    def send_synack(self) -> None:
        """SYN/ACK (passive open)."""
        self.state = State.SYN_RCVD
        self.snd_nxt = self.iss + 1
        self.rtx.append(TxSegment(self.iss, b"", SYN | ACK, None, time.monotonic()))
        self._send_syn_or_synack()
        self.arm_rto()

    def _send_syn_or_synack(self) -> None:
        flags = SYN | (ACK if self.state == State.SYN_RCVD else 0)
        self.emit(self.segment(flags, self.iss, b"", self.conn.handshake_options(self, flags)))

    def send_ack(self, extra=()) -> None:
        """A pure ACK carrying the connection's current options (DATA_ACK)."""
        self.ack_pending = False
        opts = list(extra) if extra else self.conn.ack_options(self)
        if self.sack_ok and self.rx_ooo and not extra:
            opts = self._with_sack(opts)
        self.emit(self.segment(ACK, self.snd_nxt, b"", opts))

    def _with_sack(self, opts: list) -> list:
        """opts plus a SACK block (RFC 2018) around the latest out-of-order segment, when
        the 40 bytes of options have room (with timestamps and a 64-bit DATA_ACK: one block).
        A peer that negotiated SACK relies on the blocks to find its losses (Linux counts
        no duplicate ACKs then), so a receiver that sent none made it wait for RTOs."""
        start = self.last_ooo if self.last_ooo in self.rx_ooo else min(self.rx_ooo)
        end = start + len(self.rx_ooo[start][0])
        while end in self.rx_ooo and self.rx_ooo[end][0]:
            end += len(self.rx_ooo[end][0])
        ends = {s + len(v[0]): s for s, v in self.rx_ooo.items() if v[0]}
        while start in ends:
            start = ends[start]
        if end <= start:
            return opts
        with_sack = [*opts, Sack(((start & MASK32, end & MASK32),))]
        ts = [Timestamps(0, 0)] if self.ts_ok else []
        try:
            encode_tcp_options([*ts, *with_sack])
        except ValueError:
            return opts
        return with_sack

    def send_keepalive(self) -> None:
        """A TCP keep-alive (RFC 9293 §3.8.4): one already acknowledged byte, which the peer's
        TCP answers with an ACK; the answer shows the path and the peer are still there."""
        self.emit(self.segment(ACK, self.snd_una - 1, b"\0", self.conn.ack_options(self)))

    def send_rst(self, mptcp=()) -> None:
        """A RST for this subflow (optionally with MP_TCPRST / MP_FASTCLOSE)."""
        self.emit(self.segment(RST | ACK, self.snd_nxt, b"", mptcp))

    def send_data(self, dsn: int, payload: bytes) -> None:
        """Send new data mapped at data sequence dsn."""
        seq = self.snd_nxt
        seg = TxSegment(seq, payload, 0, dsn, time.monotonic())
        self.rtx.append(seg)
        self.snd_nxt += len(payload)
        self.inflight += len(payload)
        self.stats.bytes_sent += len(payload)
        self._transmit_data(seg)
        if self.rto_deadline is None:
            self.arm_rto()

    def _transmit_data(self, seg: TxSegment) -> None:
        if self.srl_limiter is not None:
            self.srl_limiter.consume(len(seg.payload))
        flags = ACK | (seg.flags & FIN)
        if seg.payload:
            flags |= 0x08  # PSH: the receiver may deliver at once
        opts = self.conn.data_options(self, seg)
        self.emit(self.segment(flags, seg.seq, seg.payload, opts))

    def send_fin(self) -> None:
        """Queue and send our FIN (after all data)."""
        if self.fin_queued:
            return
        self.fin_queued = True
        seg = TxSegment(self.snd_nxt, b"", FIN, None, time.monotonic())
        self.rtx.append(seg)
        self.snd_nxt += 1
        if self.state == State.ESTABLISHED:
            self.state = State.FIN_WAIT_1
        elif self.state == State.CLOSE_WAIT:
            self.state = State.LAST_ACK
        self._transmit_data(seg)
        if self.rto_deadline is None:
            self.arm_rto()

    def retransmit_lost(self) -> None:
        """Resend segments marked lost while the congestion window allows."""
        if not self.lost_count:
            return
        for seg in self.rtx:
            if not seg.lost:
                continue
            if self.inflight and self.inflight + len(seg.payload) > self.cc.cwnd:
                break
            seg.lost = False
            self.lost_count -= 1
            seg.retransmitted = True
            seg.sent_at = time.monotonic()
            self.inflight += len(seg.payload)
            self.stats.bytes_retransmitted += len(seg.payload)
            if seg.flags & SYN:
                self._send_syn_or_synack()
            else:
                self._transmit_data(seg)
            if not self.lost_count:
                break

    # ------------------------------------------------------------------ timers
    def arm_rto(self) -> None:
        """(Re)start the retransmission timer."""
        self.rto_deadline = time.monotonic() + self.rto

    def on_timer(self, now: float) -> None:
        """Retransmission timeout (RFC 6298 §5)."""
        self.rto_deadline = None
        if self.state in (State.SYN_SENT, State.SYN_RCVD):
            self.syn_tries += 1
            if self.syn_tries > SYN_RETRIES:
                self.conn.on_subflow_failed(self, "no answer to SYN" if self.active else "no ACK to SYN/ACK")
                return
            self.rto = min(self.rto * 2, MAX_RTO)
            self._send_syn_or_synack()
            self.arm_rto()
            return
        if self.join_third_ack is not None and not self.rtx:
            self.syn_tries += 1
            if self.syn_tries > SYN_RETRIES:
                self.conn.on_subflow_failed(self, "no fourth ACK to MP_JOIN")
                return
            self.send_ack([self.join_third_ack])
            self.rto = min(self.rto * 2, MAX_RTO)
            self.arm_rto()
            return
        if not self.rtx:
            return
        self.stats.timeouts += 1
        self.rto_count += 1
        self.cc.on_rto(self.inflight, now)
        for seg in self.rtx:
            if not seg.lost and not seg.sacked:
                seg.lost = True
                self.lost_count += 1
        self.inflight = 0
        self.in_recovery = False
        self.recover = self.snd_nxt
        self.dupacks = 0
        self.rto = min(self.rto * 2, MAX_RTO)
        if self.rto_count >= MAX_DATA_RTOS:
            self.conn.on_subflow_failed(self, "retransmission timeouts")
            return
        if not self.stale:
            # Like Linux, reinject at the first RTO: the peer drops duplicates at the
            # data level, and a dead path would otherwise hold the window's left edge.
            self.stale = True
            self.conn.on_subflow_stale(self)
        self.retransmit_lost()
        self.arm_rto()

    # ------------------------------------------------------------------ input
    def on_segment(self, seg: TcpSegment) -> None:
        """Process one received segment (RFC 9293 §3.10.7)."""
        self.stats.segments_received += 1
        if self.conn.dsn_offsets is not None:
            seg.options = self.conn.dsn_offsets.incoming(self, seg.options)
        if self.state == State.SYN_SENT:
            self._on_segment_syn_sent(seg)
            return
        if self.state == State.CLOSED:
            return
        if self.state == State.SYN_RCVD and seg.flags & SYN and not seg.flags & ACK:
            self._send_syn_or_synack()  # our SYN/ACK was lost: the peer repeats its SYN
            return
        seq = unwrap32(seg.seq, self.rcv_nxt)
        if seg.flags & RST:
            # RFC 5961: only an in-window RST counts; anything else is ignored.
            if self.rcv_nxt <= seq < self.rcv_nxt + max(self.conn.rcv_window(), 1):
                self.conn.on_subflow_reset(self, seg)
            return
        if seg.flags & SYN:
            self.send_ack()  # a duplicate SYN/ACK: our ACK was lost
            return
        if not seg.flags & ACK:
            return
        ts = seg.option(Timestamps)
        if ts is not None and self.ts_ok and seq <= self.rcv_nxt:
            self.ts_recent = ts.value
        ack = unwrap32(seg.ack, self.snd_una)
        if self.state == State.SYN_RCVD:
            if ack != self.iss + 1:
                self.send_rst()
                return
            if not self.conn.on_handshake_ack(self, seg):
                return
            self.state = State.ESTABLISHED
            self.syn_tries = 0
        self._process_ack(seg, ack)
        if self.state == State.CLOSED:
            return
        self.conn.on_options(self, seg, seq)
        if self.state == State.CLOSED:
            return
        if seg.payload or seg.flags & FIN:
            self._process_data(seg, seq)

    def _on_segment_syn_sent(self, seg: TcpSegment) -> None:
        if not seg.flags & ACK:
            return  # simultaneous open is not supported
        ack = unwrap32(seg.ack, self.snd_una)
        if ack != self.iss + 1:
            if not seg.flags & RST:
                self.emit(TcpSegment(self.lport, self.rport, seg.ack, 0, RST, 0))
            return
        if seg.flags & RST:
            self.conn.on_subflow_failed(self, "connection refused (RST)")
            return
        if not seg.flags & SYN:
            return
        self.irs = seg.seq
        self.rcv_nxt = seg.seq + 1
        self._learn_syn_options(seg)
        self.snd_una = ack
        self.rtx.clear()
        self.rto_deadline = None
        self._sample_rtt(time.monotonic() - self.syn_sent_at, retransmitted=self.syn_tries > 0)
        self.rto = max(self.rto, MIN_RTO)
        self.state = State.ESTABLISHED
        self.syn_tries = 0
        self.snd_wnd = seg.window
        self.conn.on_synack(self, seg)

    def learn_syn(self, seg: TcpSegment) -> None:
        """Passive open: remember the peer's SYN."""
        self.irs = seg.seq
        self.rcv_nxt = seg.seq + 1
        self._learn_syn_options(seg)
        self.snd_wnd = seg.window

    def _learn_syn_options(self, seg: TcpSegment) -> None:
        mss = seg.option(Mss)
        peer_mss = mss.value if mss else 536
        self.mss = max(min(peer_mss, self.local_mss) - OPTION_ROOM, 64)
        self.cc.detach()
        self.cc = make_cc(self.cc_name, self.mss, self.conn.coupling)
        ws = seg.option(WindowScale)
        self.ws_ok = ws is not None
        self.snd_wscale = min(ws.shift, 14) if ws else 0
        self.sack_ok = seg.option(SackPermitted) is not None
        ts = seg.option(Timestamps)
        self.ts_ok = ts is not None
        if ts:
            self.ts_recent = ts.value

    def _sample_rtt(self, rtt: float, retransmitted: bool = False) -> None:
        if retransmitted:
            return  # Karn: an ambiguous sample
        self._hystart(rtt)
        self.min_rtt = rtt if self.min_rtt is None else min(self.min_rtt, rtt)
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.rto = min(max(self.srtt + max(0.001, 4 * self.rttvar), MIN_RTO), MAX_RTO)

    def _process_ack(self, seg: TcpSegment, ack: int) -> None:
        now = time.monotonic()
        window = seg.window << self.snd_wscale
        if ack > self.snd_nxt:
            self.send_ack()  # acks something never sent
            return
        if ack > self.snd_una:
            acked = ack - self.snd_una
            self.snd_una = ack
            self.stats.bytes_acked += acked
            sample = None
            while self.rtx and self.rtx[0].end <= ack:
                done = self.rtx.popleft()
                if done.lost:
                    self.lost_count -= 1
                elif not done.sacked:
                    self.inflight -= len(done.payload)
                if not done.retransmitted and not done.sacked:
                    # The most recently sent of the newly acked segments: one acked only
                    # because a hole below it got repaired would add the repair time.
                    sample = now - done.sent_at if sample is None else min(sample, now - done.sent_at)
                    self.rack_sent_at = max(self.rack_sent_at, done.sent_at)
                if done.flags & FIN:
                    self._on_fin_acked()
            if sample is not None:
                self._sample_rtt(sample)
            self.rto_count = 0
            if self.stale:
                self.stale = False
                self.conn.on_subflow_recovered(self)
            if self.join_third_ack is not None:
                self._on_fourth_ack()
            if self.in_recovery:
                if ack >= self.recover:
                    self.in_recovery = False
                    self.cc.cwnd = self.cc.ssthresh
                elif not self.sack_seen:   # with SACK blocks coming, RACK below finds the holes
                    # NewReno partial ACK (RFC 6582 §3.2): the next hole is lost too.
                    if self.rtx and not self.rtx[0].lost:
                        self.rtx[0].lost = True
                        self.lost_count += 1
                        self.inflight -= len(self.rtx[0].payload)
                    self.cc.cwnd = max(self.cc.cwnd - acked + self.cc.mss, self.cc.mss)
            else:
                self.cc.on_ack(acked, now, self.srtt or 0.001)
            self.dupacks = 0
            self.rto_deadline = None
            if self.rtx:
                self.arm_rto()
        elif (ack == self.snd_una and not seg.payload and not seg.flags & FIN and self.rtx and not self.sack_seen
              and window == self.snd_wnd and not self.conn.ack_advanced_data(seg)):
            self.dupacks += 1
            if self.dupacks == 3 and not self.in_recovery and self.inflight > 0:
                self.stats.fast_retransmits += 1
                self.in_recovery = True
                self.recover = self.snd_nxt
                self.cc.on_loss(self.inflight, now)
                head = self.rtx[0]
                if not head.lost:
                    head.lost = True
                    self.lost_count += 1
                    self.inflight -= len(head.payload)
                self.cc.cwnd = self.cc.ssthresh + 3 * self.cc.mss
            elif self.in_recovery:
                self.cc.cwnd += self.cc.mss
        elif self.join_third_ack is not None and ack == self.snd_una:
            self._on_fourth_ack()
        if self.sack_ok and self.rtx:
            self._on_sack(seg, now)
        self.snd_wnd = window
        self.retransmit_lost()

    def _on_sack(self, seg: TcpSegment, now: float) -> None:
        """SACK blocks (RFC 2018) mark segments delivered; RACK (RFC 8985, without its
        timers) then marks lost every segment sent more than a quarter of the minimum
        RTT before one known delivered, and the first loss starts a recovery in which
        lost segments are resent as the pipe (inflight without SACKed and lost bytes,
        RFC 6675) falls below cwnd. Without this, a slow start that overshot a path's
        queue by a hundred segments took a hundred RTTs (NewReno: one hole per RTT)."""
        sack = seg.option(Sack)
        if sack is None or not sack.blocks:
            return
        self.sack_seen = True
        blocks = [(unwrap32(left, self.snd_una), unwrap32(right, self.snd_una)) for left, right in sack.blocks]
        lo = min(b[0] for b in blocks)
        sample = None
        for s in self.rtx:
            if s.sacked or not s.payload or s.end <= lo:
                continue
            if any(left <= s.seq and s.end <= right for left, right in blocks):
                s.sacked = True
                if s.lost:
                    s.lost = False
                    self.lost_count -= 1
                else:
                    self.inflight -= len(s.payload)
                if not s.retransmitted:
                    sample = now - s.sent_at if sample is None else min(sample, now - s.sent_at)
                if not s.retransmitted or now - s.sent_at >= (self.min_rtt or 0.0):
                    self.rack_sent_at = max(self.rack_sent_at, s.sent_at)
        if sample is not None:
            self._sample_rtt(sample)
        reorder = (self.min_rtt or 0.004) / 4
        flight = self.snd_nxt - self.snd_una
        newly_lost = False
        for s in self.rtx:
            if s.sacked or s.lost or not s.payload or s.sent_at + reorder >= self.rack_sent_at:
                continue
            s.lost = True
            self.lost_count += 1
            self.inflight -= len(s.payload)
            newly_lost = True
        if newly_lost and not self.in_recovery:
            self.stats.fast_retransmits += 1
            self.in_recovery = True
            self.recover = self.snd_nxt
            self.cc.on_loss(flight, now)

    def _hystart(self, rtt: float) -> None:
        """Leave slow start when a round's RTTs rise above the path's minimum (HyStart's
        delay increase, as Linux's CUBIC does): a slow start that waits for loss
        overshoots a path's queue by up to a window and loses a window's worth."""
        if self.cc.cwnd >= self.cc.ssthresh or self.min_rtt is None:
            return
        if self.snd_una >= self.round_end:
            self.round_end = self.snd_nxt
            self.round_rtts = []
        self.round_rtts.append(rtt)
        if len(self.round_rtts) == HYSTART_SAMPLES:
            threshold = min(max(self.min_rtt / 8, HYSTART_MIN), HYSTART_MAX)
            if min(self.round_rtts) >= self.min_rtt + threshold:
                self.cc.ssthresh = self.cc.cwnd

    def _on_fourth_ack(self) -> None:
        self.join_third_ack = None
        self.syn_tries = 0
        self.rto_deadline = None
        if not self.fully_established:
            self.fully_established = True
            self.conn.on_subflow_established(self)

    def _on_fin_acked(self) -> None:
        if self.state == State.FIN_WAIT_1:
            self.state = State.FIN_WAIT_2
        elif self.state == State.CLOSING:
            self._closed()
        elif self.state == State.LAST_ACK:
            self._closed()

    def _closed(self) -> None:
        # TIME_WAIT is skipped: the stack's 4-tuples come from a private port range
        # it does not reuse quickly, which is what TIME_WAIT protects.
        self.state = State.CLOSED
        self.rto_deadline = None
        self.conn.on_subflow_closed(self)

    def _process_data(self, seg: TcpSegment, seq: int) -> None:
        payload = seg.payload
        fin = bool(seg.flags & FIN)
        if seq > self.rcv_nxt:
            if len(self.rx_ooo) < 4096:
                self.rx_ooo[seq] = (payload, fin)
                self.last_ooo = seq
            self.send_ack()  # a duplicate ACK tells the sender about the hole at once
            return
        if seq + len(payload) < self.rcv_nxt or (seq + len(payload) == self.rcv_nxt and not fin):
            self.send_ack()  # all old: our ACK was lost
            return
        self._accept(seq, payload, fin)
        while self.rx_ooo:
            nxt = self.rx_ooo.pop(self.rcv_nxt, None)
            if nxt is None:
                stale = [s for s in self.rx_ooo if s < self.rcv_nxt]
                if not stale:
                    break
                s = min(stale)
                nxt = self.rx_ooo.pop(s)
                if s + len(nxt[0]) < self.rcv_nxt:
                    continue
                self._accept(s, nxt[0], nxt[1])
                continue
            self._accept(self.rcv_nxt, nxt[0], nxt[1])
        self.ack_pending = True
        if fin or self.rx_ooo:
            self.send_ack()

    def _accept(self, seq: int, payload: bytes, fin: bool) -> None:
        skip = self.rcv_nxt - seq
        if skip > 0:
            payload = payload[skip:]
        if payload:
            rel = self.rcv_nxt - self.irs
            self.rcv_nxt += len(payload)
            self.stats.bytes_received += len(payload)
            self.conn.on_subflow_data(self, rel, payload)
        if fin and self.state in SYNCHRONIZED:
            self.rcv_nxt += 1
            if self.state == State.ESTABLISHED:
                self.state = State.CLOSE_WAIT
            elif self.state == State.FIN_WAIT_1:
                self.state = State.CLOSING
            elif self.state == State.FIN_WAIT_2:
                self.state = State.TIME_WAIT
            self.send_ack()
            self.conn.on_subflow_fin(self)
            if self.state == State.TIME_WAIT:
                self._closed()

    def abort(self) -> None:
        """Forget the subflow without sending anything."""
        self.cc.detach()
        self.state = State.CLOSED
        self.rto_deadline = None
        self.rtx.clear()
        self.inflight = 0
        self.lost_count = 0
