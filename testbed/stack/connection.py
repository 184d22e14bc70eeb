"""An MPTCP connection (RFC 8684): keys, subflows, data-level send and receive.

The Connection decides every MPTCP option its subflows put on the wire and
interprets every one they receive: MP_CAPABLE v1 in both roles (data on the
first data packet with the MP_CAPABLE+length form), MP_JOIN with HMAC-SHA256
and the fourth ACK, DSS mappings with 64-bit DSNs and subflow-relative
sequence numbers, DATA_ACK, DATA_FIN, the DSS checksum when either side asked
for it, MP_TCPRST, MP_FASTCLOSE, MP_PRIO, and fallback to plain TCP when the
handshake's options were stripped. All methods run under the stack's lock;
the public ones (send, recv, close, ...) take it themselves.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from testbed.stack import crypto, esim, inactivity, privacy, rate_limit
from testbed.stack.cc import Coupling
from testbed.stack.options import (CAP_A_CHECKSUM, CAP_C_NO_INITIAL, CAP_H_SHA256, RST_ADMIN, RST_MIDDLEBOX,
                                   RST_MPTCP_ERROR, RST_UNSPECIFIED, AddAddr, Dss, MpCapable, MpFail, MpFastclose,
                                   MpJoinAck, MpJoinSyn, MpJoinSynAck, MpPrio, MpTcpRst, RemoveAddr)
from testbed.stack.packet import ACK, TcpSegment
from testbed.stack.pm import PathManager, PmLimits
from testbed.stack.scheduler import make_scheduler
from testbed.stack.subflow import State, Subflow, TxSegment, unwrap32

if TYPE_CHECKING:  # pragma: no cover
    from testbed.stack.stack import Stack

MASK64 = 0xFFFFFFFFFFFFFFFF
RCVBUF = 4 << 20
SNDBUF = 4 << 20


class StackError(RuntimeError):
    """A connection-level failure reported to the API user in one line."""


def unwrap64(value: int, ref: int) -> int:
    """The unwrapped integer closest to ref whose low 64 bits are value."""
    return ref + (((value - ref + (1 << 63)) & MASK64) - (1 << 63))


@dataclass
class RxMapping:
    """A data sequence mapping received on a subflow (§3.3.1)."""
    ssn: int            # subflow-relative sequence number of the first byte
    dsn: int            # unwrapped data sequence number of the first byte
    length: int         # payload bytes (the DATA_FIN's byte excluded)
    data_len: int       # data-level length as on the wire (for the checksum)
    checksum: int | None
    buf: bytearray = field(default_factory=bytearray)  # only used when checksums are on


@dataclass(frozen=True)
class Event:
    """A path-manager style event: created, established, sf_established, sf_closed, closed
    (and with ITO: inactive, resumed, expired; stack/inactivity.py)."""
    kind: str
    token: int
    time: float
    subflow: tuple[str, int, str, int] | None = None
    backup: bool = False
    reason: str | None = None
    rate_kbps: float | None = None    # sf_rate_limit* events: the SRL rate concerned


@dataclass(frozen=True)
class SubflowInfo:
    """A snapshot of one subflow."""
    local: tuple[str, int]
    remote: tuple[str, int]
    state: str
    join: bool
    backup: bool
    fully_established: bool
    srtt_ms: float | None
    rto_ms: float
    cwnd: int
    ssthresh: float
    inflight: int
    bytes_sent: int
    bytes_retransmitted: int
    bytes_acked: int
    bytes_received: int
    fast_retransmits: int
    timeouts: int
    reset_reason: int | None
    addr_id: int = 0
    remote_addr_id: int | None = None
    rate_limit_requested_kbps: float | None = None   # SRL we asked the peer for on this subflow
    rate_limit_enforced_kbps: float | None = None    # SRL the peer asked for, enforced by our sending


@dataclass(frozen=True)
class ConnectionInfo:
    """A snapshot of a connection: identifiers, state, data-level counters, subflows."""
    token: int
    remote_token: int | None
    state: str
    fallback: bool
    checksum: bool
    bytes_sent: int
    bytes_received: int
    subflows: list[SubflowInfo]
    closed_subflows: list[SubflowInfo]
    fallback_reason: str | None = None      # "handshake" or "infinite mapping" (§3.7)
    peer_addresses: tuple = ()              # PeerAddress of every ADD_ADDR the peer sent and not removed
    announced: tuple[int, ...] = ()         # our address IDs announced and echoed by the peer
    inactivity: "inactivity.InactivityInfo | None" = None   # ITO values and state (None: ITO not in force)


class Connection:
    """One MPTCP connection and the socket-like API on it."""

    def __init__(self, stack: "Stack", *, active: bool, checksum: bool, cc: str = "cubic", mptcp: bool = True,
                 scheduler: str = "lowrtt", pm_limits: PmLimits | None = None, deny_join_initial: bool = False,
                 obfuscate_dsn: bool = False, external_keys: bool = False):
        self.stack = stack
        # privacy extensions (stack/privacy.py): asked for, agreed in the handshake, in force
        self.privacy_wanted = privacy.flags(obfuscate_dsn, external_keys)
        self.privacy_agreed = 0
        if getattr(stack, "esim", False) and not active:
            self.privacy_wanted |= esim.FLAG_ESIM    # a RobE_eSIM server (stack/esim.py)
        self.esim_winner: Connection | None = None   # RobE_eSIM client: a losing attempt joins this one
        # the inactivity-time option (stack/inactivity.py): None unless the stack has a local value
        self.ito = (inactivity.Inactivity(self, stack.inactivity_s, stack.inactivity_bounds_s)
                    if getattr(stack, "inactivity_s", None) is not None else None)
        self.dsn_offsets: privacy.DsnOffsets | None = None
        self.active = active
        self.want_checksum = checksum
        self.checksum = checksum
        self.cc = cc
        self.coupling = Coupling()             # the subflows' coupled controllers (lia, olia) share it
        self.scheduler = make_scheduler(scheduler)
        self.local_key = crypto.new_key()
        self.local_token = crypto.token_of(self.local_key)
        self.remote_key: int | None = None
        self.remote_token: int | None = None
        self.fallback = not mptcp              # plain TCP from the first SYN on
        self.state = "SYN_SENT" if active else "SYN_RCVD"
        self.error: str | None = None
        self.subflows: list[Subflow] = []
        self.closed_subflows: list[SubflowInfo] = []
        self.cond = threading.Condition(stack.lock)
        # data-level send side
        self.snd_una = self.snd_nxt = (crypto.idsn_of(self.local_key) + 1)
        self.snd_right = self.snd_una + 65535
        self.tx = bytearray()
        self.tx_off = 0                        # index of snd_una in tx
        self.tx_closed = False
        self.data_fin_dsn: int | None = None
        self.data_fin_acked = False
        self.data_fin_deadline: float | None = None
        self.data_fin_rto = 0.2
        self.reinject: deque[tuple[int, bytes]] = deque()
        self.mpc_data_pending = active and mptcp  # the client's first data carries MP_CAPABLE
        self.peer_dss_seen = False
        self.bytes_sent = 0
        # data-level receive side
        self.rcv_nxt = 0
        self.rx = bytearray()
        self.rx_ooo: dict[int, bytes] = {}
        self.rx_fin_dsn: int | None = None
        self.eof = False
        self.bytes_received = 0
        self.fallback_rx_base = 0
        self.fallback_tx_base = 0
        self.last_window_sent = RCVBUF
        self.accept_queue = None               # set by the listener for server connections
        self.established_at: float | None = None
        # path management (§3.4, §3.1's C flag) and the checksum-failure path (§3.7)
        self.pm = PathManager(self, pm_limits or PmLimits())
        self.deny_join_initial = deny_join_initial   # server: C flag, no joins to our initial address/port
        self.peer_deny_join_initial = False          # client: the server's SYN/ACK carried the C flag
        self.joined = False                          # a second subflow ever existed: no infinite mapping
        self.fallback_reason: str | None = None
        self.infinite_map_seq: int | None = None     # subflow seq of our segment carrying the infinite mapping
        self.mp_fail_sent: int | None = None         # DSN of our MP_FAIL
        # subflow rate limit (stack/rate_limit.py): how we enforce the peer's requests
        self.rate_limit_enforcement = getattr(stack, "rate_limit_enforcement", "pacing")

    # ================================================================ options out
    def handshake_options(self, sf: Subflow, flags: int) -> list:
        """MPTCP options of a SYN or SYN/ACK."""
        if sf.join:
            if flags & ACK:
                mac = crypto.join_synack_hmac(self.local_key, self.remote_key, sf.local_nonce, sf.remote_nonce)
                return [MpJoinSynAck(mac, sf.local_nonce, sf.addr_id, sf.backup)]
            return [MpJoinSyn(self.remote_token, sf.local_nonce, sf.addr_id, sf.backup)]
        if self.fallback:
            return []
        cap_flags = CAP_H_SHA256 | (CAP_A_CHECKSUM if self.checksum else 0)
        if flags & ACK:
            # §3.1: C tells the client not to join our initial address and port.
            echo = [privacy.request_option(self.privacy_agreed)] if self.privacy_agreed else []
            return [MpCapable(cap_flags | (CAP_C_NO_INITIAL if self.deny_join_initial else 0),
                              sender_key=self.local_key), *echo]
        return [MpCapable(cap_flags), *([privacy.request_option(self.privacy_wanted)] if self.privacy_wanted else [])]

    def _data_ack_option(self) -> Dss:
        return Dss(data_ack=self.rcv_nxt & MASK64)

    def ack_options(self, sf: Subflow) -> list:
        """Options of a pure ACK: the DATA_ACK once the connection is MPTCP."""
        if self.fallback or self.remote_key is None or sf.state == State.SYN_SENT:
            return []
        return [self._data_ack_option()]

    def data_options(self, sf: Subflow, seg: TxSegment) -> list:
        """Options of a data (or FIN) segment: the mapping and the DATA_ACK."""
        if self.fallback:
            if seg.seq == self.infinite_map_seq and seg.dsn is not None and seg.payload:
                # §3.7: the infinite mapping (data-level length 0) on the first data
                # segment after a mid-stream fallback; the checksum field is zero.
                return [Dss(data_ack=self.rcv_nxt & MASK64, dsn=seg.dsn & MASK64,
                            subflow_seq=(seg.seq - sf.iss) & 0xFFFFFFFF, data_len=0,
                            checksum=0 if self.checksum else None)]
            return []
        if seg.dsn is None:
            return [self._data_ack_option()]
        length = len(seg.payload)
        ssn = seg.seq - sf.iss
        csum = crypto.dss_checksum(seg.dsn, ssn, length, seg.payload) if self.checksum else None
        if seg.mpc_form:
            flags = CAP_H_SHA256 | (CAP_A_CHECKSUM if self.checksum else 0)
            return [MpCapable(flags, self.local_key, self.remote_key, length, csum)]
        return [Dss(data_ack=self.rcv_nxt & MASK64, dsn=seg.dsn & MASK64, subflow_seq=ssn & 0xFFFFFFFF,
                    data_len=length, checksum=csum)]

    # ================================================================ handshake in
    def on_synack(self, sf: Subflow, seg: TcpSegment) -> None:
        """Active open: the SYN/ACK arrived (MP_CAPABLE or MP_JOIN, or neither: fallback)."""
        if sf.join:
            opt = seg.option(MpJoinSynAck)
            expected = crypto.join_synack_hmac(self.remote_key, self.local_key, opt.nonce if opt else 0,
                                               sf.local_nonce)
            if opt is None or opt.hmac64 != expected:
                # §3.2: a join that fails authentication is reset.
                sf.send_rst([MpTcpRst(RST_MPTCP_ERROR)])
                self._drop_subflow(sf, "MP_JOIN SYN/ACK without a valid HMAC")
                return
            sf.remote_nonce = opt.nonce
            sf.remote_addr_id = opt.addr_id
            mac = crypto.join_ack_hmac(self.local_key, self.remote_key, sf.local_nonce, sf.remote_nonce)
            sf.join_third_ack = MpJoinAck(mac)
            sf.send_ack([sf.join_third_ack])
            sf.arm_rto()   # repeated until the fourth ACK
            return
        if self.esim_winner is not None and esim.complete_as_join(self, sf, seg):
            return   # RobE_eSIM: this losing attempt became a subflow of the winner
        cap = seg.option(MpCapable)
        self.pm.set_initial(sf)
        if cap is None or cap.version != 1 or cap.sender_key is None or not cap.flags & CAP_H_SHA256:
            self._fall_back(sf)
            sf.send_ack()
        else:
            self.peer_deny_join_initial = bool(cap.flags & CAP_C_NO_INITIAL)
            self.remote_key = cap.sender_key
            self.remote_token = crypto.token_of(cap.sender_key)
            self.rcv_nxt = crypto.idsn_of(cap.sender_key) + 1
            self.checksum = self.want_checksum or bool(cap.flags & CAP_A_CHECKSUM)
            flags = CAP_H_SHA256 | (CAP_A_CHECKSUM if self.checksum else 0)
            if self.ito is not None:
                self.ito.on_subflow_up(sf, time.monotonic())   # our ITO rides on the MP_CAPABLE ACK
            sf.send_ack([MpCapable(flags, self.local_key, self.remote_key)])
            self.privacy_agreed = self.privacy_wanted & privacy.requested(seg.options)
            if self.privacy_agreed & privacy.FLAG_DSN_OFFSET:
                self.dsn_offsets = privacy.DsnOffsets(self.local_key, self.remote_key, active=True)
        self.snd_right = self.snd_una + seg.window
        self._established()

    def on_passive_syn(self, sf: Subflow, seg: TcpSegment) -> None:
        """Passive open of the initial subflow: read MP_CAPABLE from the SYN."""
        cap = seg.option(MpCapable)
        self.pm.set_initial(sf)
        if cap is None or cap.version != 1 or not cap.flags & CAP_H_SHA256:
            # No (or another version of) MP_CAPABLE: plain TCP (§3.1, v0 is not spoken).
            self.fallback = True
            self.fallback_reason = "handshake"
        else:
            self.checksum = self.want_checksum or bool(cap.flags & CAP_A_CHECKSUM)
            self.privacy_agreed = self.privacy_wanted & privacy.requested(seg.options)

    def on_handshake_ack(self, sf: Subflow, seg: TcpSegment) -> bool:
        """Passive open: the ACK completing the handshake. False when the subflow was refused."""
        if sf.join:
            opt = seg.option(MpJoinAck)
            expected = crypto.join_ack_hmac(self.remote_key, self.local_key, sf.remote_nonce, sf.local_nonce)
            if opt is None or opt.hmac160 != expected:
                sf.send_rst([MpTcpRst(RST_MPTCP_ERROR)])
                self._drop_subflow(sf, "MP_JOIN third ACK without a valid HMAC")
                return False
            sf.fully_established = True
            sf.state = State.ESTABLISHED
            sf.send_ack()   # the fourth ACK: the joining side may now send data
            self.on_subflow_established(sf)
            return True
        if esim.agreed(self) and (join_cap := esim.join_cap_in(seg.options)) is not None:
            return esim.accept_as_join(self, sf, join_cap)   # RobE_eSIM: a losing attempt joins its winner
        if not self.fallback:
            cap = seg.option(MpCapable)
            if cap is None or cap.sender_key is None or cap.receiver_key is None:
                self._fall_back(sf)   # a middlebox removed MP_CAPABLE from the third ACK
            elif cap.receiver_key != self.local_key:
                sf.send_rst([MpTcpRst(RST_MPTCP_ERROR)])
                self._drop_subflow(sf, "MP_CAPABLE ACK echoes a wrong key")
                return False
            else:
                self.remote_key = cap.sender_key
                self.remote_token = crypto.token_of(cap.sender_key)
                self.rcv_nxt = crypto.idsn_of(cap.sender_key) + 1
                self.checksum = self.checksum or bool(cap.flags & CAP_A_CHECKSUM)
                if self.privacy_agreed & privacy.FLAG_DSN_OFFSET:
                    self.dsn_offsets = privacy.DsnOffsets(self.local_key, self.remote_key, active=False)
        else:
            self.fallback_rx_base = self.rcv_nxt
        self.snd_right = self.snd_una + (seg.window << sf.snd_wscale)
        self._established()
        return True

    def _fall_back(self, sf: Subflow) -> None:
        self.fallback = True
        self.fallback_reason = "handshake"
        self.mpc_data_pending = False
        self.fallback_rx_base = self.rcv_nxt
        self.fallback_tx_base = self.snd_una

    def _established(self) -> None:
        if self.state in ("SYN_SENT", "SYN_RCVD"):
            self.state = "ESTABLISHED"
            self.established_at = time.monotonic()
            self.stack.register_token(self)
            if self.ito is not None and self.subflows and self.subflows[0] not in self.ito.live \
                    and not self.fallback:
                self.ito.on_subflow_up(self.subflows[0], self.established_at)
            self.stack.emit_event(Event("established", self.local_token, time.time(),
                                        self.subflows[0].key if self.subflows else None,
                                        reason="fallback" if self.fallback else None))
            if self.accept_queue is not None:
                self.accept_queue.append(self)
                self.stack.listener_ready(self)
            self.cond.notify_all()

    # ================================================================ options in
    def ack_advanced_data(self, seg: TcpSegment) -> bool:
        """True when the segment's DATA_ACK moves snd_una (so it is no duplicate ACK)."""
        dss = seg.option(Dss)
        if dss is None or dss.data_ack is None:
            return False
        da = unwrap64(dss.data_ack, self.snd_una) if dss.data_ack64 else unwrap32(dss.data_ack, self.snd_una)
        return da > self.snd_una

    def on_options(self, sf: Subflow, seg: TcpSegment, seq: int) -> None:
        """Interpret the MPTCP options of a segment on an established subflow."""
        if self.fallback:
            acked_rel = sf.snd_una - sf.iss - 1
            self._on_data_ack(self.fallback_tx_base + acked_rel, seg.window << sf.snd_wscale)
            return
        for opt in seg.options:
            if isinstance(opt, Dss):
                self.peer_dss_seen = True
                self.mpc_data_pending = False
                if opt.data_ack is not None:
                    da = unwrap64(opt.data_ack, self.snd_una) if opt.data_ack64 else \
                        unwrap32(opt.data_ack, self.snd_una)
                    self._on_data_ack(da, seg.window << sf.snd_wscale)
                if opt.infinite:
                    self._on_infinite_mapping(sf, opt, seq)
                    return
                if opt.dsn is not None:
                    self._on_mapping(sf, opt, seq)
            elif isinstance(opt, MpCapable) and opt.data_len is not None and self.remote_key is not None:
                # MP_CAPABLE carrying data: its mapping is implied (§3.1): the
                # peer's first data byte, subflow sequence 1.
                if opt.sender_key == self.remote_key and seq - sf.irs == 1:
                    self._add_mapping(sf, RxMapping(1, crypto.idsn_of(self.remote_key) + 1, opt.data_len,
                                                    opt.data_len, opt.checksum))
            elif isinstance(opt, MpFastclose):
                if opt.receiver_key == self.local_key:
                    self._fail("connection reset by peer (MP_FASTCLOSE)")
                    for other in list(self.subflows):
                        other.send_rst()
                        self._drop_subflow(other, "MP_FASTCLOSE")
                    return
            elif isinstance(opt, MpPrio):
                # §3.3.8: the peer changes the priority of the subflow it sends this on.
                sf.backup = opt.backup
                self.emit("sf_priority", sf)
            elif isinstance(opt, AddAddr):
                self.pm.on_add_addr(sf, opt)
            elif isinstance(opt, RemoveAddr):
                self.pm.on_remove_addr(opt)
                if sf not in self.subflows:
                    return
            elif isinstance(opt, MpFail):
                self._on_mp_fail(sf, opt)
                if self.fallback or sf not in self.subflows:
                    return
            elif isinstance(opt, rate_limit.SubflowRateLimit):
                self._on_rate_limit(sf, opt)
            elif isinstance(opt, inactivity.InactivityTime):
                if self.ito is not None:   # without a local value the option is ignored
                    self.ito.on_option(opt)
            # Unknown subtypes are ignored (§3: an implementation that does not
            # understand an option ignores it).

    # ================================================================ checksum failure (§3.7)
    def _on_checksum_failure(self, sf: Subflow, m: RxMapping) -> bool:
        """A mapping failed its DSS checksum. True when its bytes are delivered anyway (fallback)."""
        self.stack.log(f"DSS checksum mismatch on {sf.key} at DSN {m.dsn}")
        self.mp_fail_sent = m.dsn
        if self.joined or len(self.subflows) > 1:
            # Several subflows: reset this one with MP_FAIL; the mapping is not
            # DATA_ACKed, so the peer sends it again on another subflow.
            sf.send_rst([MpFail(m.dsn & MASK64), MpTcpRst(RST_MIDDLEBOX)])
            self.on_subflow_stale(sf)
            self._drop_subflow(sf, "DSS checksum mismatch (MP_FAIL)")
            return False
        # One subflow: MP_FAIL, and plain TCP from this mapping on. Like Linux, the
        # mapping's bytes are delivered as they arrived (the subflow acknowledged
        # them; a middlebox that rewrites payload is a fact of this path).
        sf.send_ack([self._data_ack_option(), MpFail(m.dsn & MASK64)])
        sf.rx_maps.clear()
        self._fall_back_mid_stream(sf, rx_base=m.dsn - m.ssn + 1)
        self._deliver(m.dsn, bytes(m.buf))
        return True

    def _on_mp_fail(self, sf: Subflow, opt: MpFail) -> None:
        """MP_FAIL on an established subflow: the peer's checksum failed on data we sent."""
        dsn = unwrap64(opt.dsn, self.snd_una)
        if self.mp_fail_sent is not None:
            return   # the peer's echo of our own MP_FAIL
        self.stack.log(f"MP_FAIL at DSN {dsn} on {sf.key}")
        if self.joined or len(self.subflows) > 1:
            self._reinject_from(dsn, sf)
            self._reset_subflow(sf, RST_MIDDLEBOX, "MP_FAIL from the peer")
            return
        # §3.7 single subflow: echo MP_FAIL, send the infinite mapping on the next
        # data segment and continue as plain TCP.
        self.mp_fail_sent = dsn
        sf.send_ack([self._data_ack_option(), MpFail(opt.dsn)])
        self._fall_back_mid_stream(sf)

    def _on_infinite_mapping(self, sf: Subflow, opt: Dss, seq: int) -> None:
        """The peer fell back to plain TCP (§3.7): its bytes from this segment on are the data stream."""
        dsn = unwrap64(opt.dsn, self.rcv_nxt) if opt.dsn64 else unwrap32(opt.dsn, self.rcv_nxt)
        ssn = unwrap32(opt.subflow_seq, seq - sf.irs)
        self.stack.log(f"infinite mapping at DSN {dsn} on {sf.key}")
        sf.rx_maps.clear()
        self._fall_back_mid_stream(sf, rx_base=dsn - ssn + 1)

    def _fall_back_mid_stream(self, sf: Subflow, rx_base: int | None = None) -> None:
        # One subflow carried every byte in order, so subflow and data sequence
        # numbers differ by a constant in each direction.
        self.fallback = True
        self.fallback_reason = "infinite mapping"
        self.mpc_data_pending = False
        self.fallback_tx_base = self.snd_nxt - (sf.snd_nxt - sf.iss - 1)
        self.fallback_rx_base = rx_base if rx_base is not None else self.rcv_nxt - (sf.rcv_nxt - sf.irs - 1)
        if self.infinite_map_seq is None:
            self.infinite_map_seq = sf.snd_nxt   # our next new data segment tells the peer
        self.emit("fallback", sf, "infinite mapping")
        pending, sf.unmapped = sf.unmapped, []
        for rel, payload in pending:
            self.on_subflow_data(sf, rel, payload)

    def _reinject_from(self, dsn: int, failed: Subflow) -> None:
        """Queue every sent byte from dsn on for the other subflows (the peer discarded them)."""
        others = [o for o in self.subflows if o is not failed]
        mss = min((o.mss for o in others), default=1200)
        start = max(dsn, self.snd_una)
        while start < self.snd_nxt:
            n = min(mss, self.snd_nxt - start)
            off = self.tx_off + (start - self.snd_una)
            self.reinject.append((start, bytes(self.tx[off:off + n])))
            start += n
        self.stack.wake()

    def _on_mapping(self, sf: Subflow, opt: Dss, seq: int) -> None:
        dsn = unwrap64(opt.dsn, self.rcv_nxt) if opt.dsn64 else unwrap32(opt.dsn, self.rcv_nxt)
        if opt.data_fin:
            self.rx_fin_dsn = dsn + opt.data_len - 1
        length = opt.data_len - (1 if opt.data_fin else 0)
        if opt.data_fin and opt.subflow_seq == 0 and opt.data_len == 1:
            if self.checksum and opt.checksum is not None and \
                    crypto.dss_checksum(dsn, 0, 1, b"") != opt.checksum:
                self.stack.log(f"DATA_FIN with a bad DSS checksum on {sf.key}")
            self._check_eof()
            sf.ack_pending = True
            return
        if self.checksum and opt.checksum is None:
            # §3.3: a mapping without the negotiated checksum is a protocol error.
            self._reset_subflow(sf, RST_MPTCP_ERROR, "DSS without the negotiated checksum")
            return
        # subflow_seq is relative to the subflow ISN; unwrap it near the segment's own.
        ssn = unwrap32(opt.subflow_seq, seq - sf.irs)
        if length > 0:
            self._add_mapping(sf, RxMapping(ssn, dsn, length, opt.data_len, opt.checksum))
        if opt.data_fin:
            self._check_eof()

    def _add_mapping(self, sf: Subflow, m: RxMapping) -> None:
        for old in sf.rx_maps:
            if old.ssn == m.ssn:
                return
        if len(sf.rx_maps) >= 4096:
            del sf.rx_maps[0]   # mappings without data: bound the table, not the peer's luck
        sf.rx_maps.append(m)
        if sf.unmapped:
            pending, sf.unmapped = sf.unmapped, []
            for rel, payload in pending:
                self.on_subflow_data(sf, rel, payload)

    def on_subflow_data(self, sf: Subflow, rel: int, payload: bytes) -> None:
        """In-order subflow bytes starting at subflow-relative sequence rel."""
        if self.fallback:
            self._deliver(self.fallback_rx_base + rel - 1, payload)
            return
        while payload:
            m = None
            for cand in sf.rx_maps:
                if cand.ssn <= rel < cand.ssn + cand.length:
                    m = cand
                    break
            if m is None:
                sf.unmapped.append((rel, payload))   # its mapping may come in a later segment
                return
            take = min(len(payload), m.ssn + m.length - rel)
            chunk, payload = payload[:take], payload[take:]
            if m.checksum is None or not self.checksum:
                self._deliver(m.dsn + (rel - m.ssn), chunk)
            else:
                m.buf += chunk
                if len(m.buf) == m.length:
                    if crypto.dss_checksum(m.dsn, m.ssn, m.data_len, bytes(m.buf)) != m.checksum:
                        if self._on_checksum_failure(sf, m) and payload:
                            self.on_subflow_data(sf, rel + take, payload)   # the rest, as plain TCP
                        return
                    self._deliver(m.dsn, bytes(m.buf))
                    m.buf = bytearray()
            rel += take
            if rel >= m.ssn + m.length:
                sf.rx_maps.remove(m)

    def _deliver(self, dsn: int, data: bytes) -> None:
        end = dsn + len(data)
        if end <= self.rcv_nxt:
            return
        if dsn > self.rcv_nxt:
            if end > self.rcv_nxt + RCVBUF:
                return   # beyond anything we advertised: a broken or hostile peer
            old = self.rx_ooo.get(dsn)
            if old is None or len(old) < len(data):
                self.rx_ooo[dsn] = data
            return
        self.rx += data[self.rcv_nxt - dsn:]
        self.bytes_received += end - self.rcv_nxt
        self.rcv_nxt = end
        while self.rx_ooo:
            ready = [d for d in self.rx_ooo if d <= self.rcv_nxt]
            if not ready:
                break
            for d in sorted(ready):
                chunk = self.rx_ooo.pop(d)
                if d + len(chunk) > self.rcv_nxt:
                    self.rx += chunk[self.rcv_nxt - d:]
                    self.bytes_received += d + len(chunk) - self.rcv_nxt
                    self.rcv_nxt = d + len(chunk)
        self._check_eof()
        self.cond.notify_all()

    def _check_eof(self) -> None:
        if self.rx_fin_dsn is not None and not self.eof and self.rcv_nxt == self.rx_fin_dsn:
            self.rcv_nxt += 1          # the DATA_FIN occupies one data sequence number
            self.eof = True
            for sf in self.subflows:
                sf.ack_pending = True
            self.stack.wake()
            self.cond.notify_all()
            self._maybe_close_subflows()

    def _on_data_ack(self, da: int, window: int) -> None:
        end = self.snd_nxt + (1 if self.data_fin_dsn is not None else 0)
        if da > end:
            return   # acknowledges data never sent: ignore (§3.3.2)
        if da > self.snd_una:
            n = min(da, self.snd_nxt) - self.snd_una
            self.tx_off += n
            self.snd_una = da if da <= self.snd_nxt else self.snd_nxt
            if self.tx_off > (1 << 20):
                del self.tx[:self.tx_off]
                self.tx_off = 0
            while self.reinject and self.reinject[0][0] + len(self.reinject[0][1]) <= self.snd_una:
                self.reinject.popleft()
            self.cond.notify_all()
            if self.data_fin_dsn is not None and da > self.data_fin_dsn and not self.data_fin_acked:
                self.data_fin_acked = True
                self.data_fin_deadline = None
                self._maybe_close_subflows()
        if da >= self.snd_una:
            self.snd_right = max(self.snd_right, da + window) if da == self.snd_una else da + window

    def rcv_window(self) -> int:
        """Receive window (bytes) advertised on every subflow, relative to the DATA_ACK."""
        win = max(0, RCVBUF - len(self.rx))
        self.last_window_sent = win
        return win

    # ================================================================ output
    def push(self) -> None:
        """Send what the data-level window, the scheduler and the subflows' cwnd allow."""
        if self.state != "ESTABLISHED":
            return
        for sf in self.subflows:
            sf.retransmit_lost()
        while self.reinject:
            dsn, payload = self.reinject[0]
            sf = self.scheduler.pick(self, len(payload), exclude_stale=True)
            if sf is None:
                break
            self.reinject.popleft()
            if dsn + len(payload) <= self.snd_una:
                continue
            sf.send_data(dsn, payload)
        tx_end = self.snd_una + len(self.tx) - self.tx_off
        while self.snd_nxt < tx_end:
            room = self.snd_right - self.snd_nxt
            if room <= 0:
                break
            sf = self.scheduler.pick(self, min(room, tx_end - self.snd_nxt))
            if sf is None:
                break
            n = min(sf.mss, tx_end - self.snd_nxt, room)
            start = self.tx_off + (self.snd_nxt - self.snd_una)
            payload = bytes(self.tx[start:start + n])
            if self.mpc_data_pending and not sf.join and self.snd_nxt == crypto.idsn_of(self.local_key) + 1:
                self.mpc_data_pending = False
                self._send_mpc_data(sf, payload)
            else:
                sf.send_data(self.snd_nxt, payload)
            self.scheduler.on_sent(self, sf, self.snd_nxt, payload)
            self.snd_nxt += n
            self.bytes_sent += n
        self.scheduler.catch_up(self)
        if self.tx_closed and self.snd_nxt == tx_end and self.data_fin_dsn is None:
            self._send_data_fin()

    def unacked_bytes(self, dsn: int, n: int) -> bytes:
        """n bytes of the stream from data sequence number dsn (sent, not yet DATA_ACKed)."""
        start = self.tx_off + (dsn - self.snd_una)
        return bytes(self.tx[start:start + n])

    def _send_mpc_data(self, sf: Subflow, payload: bytes) -> None:
        seg = TxSegment(sf.snd_nxt, payload, 0, self.snd_nxt, time.monotonic(), mpc_form=True)
        sf.rtx.append(seg)
        sf.snd_nxt += len(payload)
        sf.inflight += len(payload)
        sf.stats.bytes_sent += len(payload)
        sf._transmit_data(seg)
        if sf.rto_deadline is None:
            sf.arm_rto()

    def _send_data_fin(self) -> None:
        if self.fallback:
            self.data_fin_dsn = self.snd_nxt
            for sf in self.subflows:
                sf.send_fin()
            return
        sf = self.scheduler.pick(self, 0, ignore_cwnd=True)
        if sf is None:
            return
        self.data_fin_dsn = self.snd_nxt
        self._emit_data_fin(sf)
        self.data_fin_deadline = time.monotonic() + max(self.data_fin_rto, sf.rto)

    def _emit_data_fin(self, sf: Subflow) -> None:
        dsn = self.data_fin_dsn
        csum = crypto.dss_checksum(dsn, 0, 1, b"") if self.checksum else None
        sf.send_ack([Dss(data_ack=self.rcv_nxt & MASK64, dsn=dsn & MASK64, subflow_seq=0, data_len=1,
                         checksum=csum, data_fin=True)])

    def on_timer(self, now: float) -> None:
        """Data-level timer: repeat an unacknowledged DATA_FIN (and unechoed ADD_ADDRs, unhonoured SRLs)."""
        self.pm.on_timer(now)
        self._rate_limit_timer(now)
        if self.ito is not None and (d := self.ito.deadline()) is not None and now >= d:
            self.ito.on_timer(now)
        if self.data_fin_deadline is not None and now >= self.data_fin_deadline and not self.data_fin_acked:
            sf = self.scheduler.pick(self, 0, ignore_cwnd=True)
            self.data_fin_rto = min(self.data_fin_rto * 2, 30)
            self.data_fin_deadline = now + self.data_fin_rto
            if sf is not None:
                self._emit_data_fin(sf)

    def deadline(self) -> float | None:
        """Earliest timer of this connection's own (subflow timers are separate)."""
        due = [d for d in (self.data_fin_deadline, self.pm.deadline(),
                           self.ito and self.ito.deadline()) if d is not None]
        due += [d for sf in self.subflows for d in (sf.srl_limiter and sf.srl_limiter.deadline(),
                                                    sf.srl_request and sf.srl_request.due()) if d is not None]
        return min(due) if due else None

    def _maybe_close_subflows(self) -> None:
        # §3.3.3: once both DATA_FINs are acknowledged, the subflows close with FIN.
        done_tx = self.data_fin_acked or (self.fallback and self.data_fin_dsn is not None)
        if self.fallback:
            return
        if done_tx and self.eof:
            for sf in list(self.subflows):
                if sf.state in (State.ESTABLISHED, State.CLOSE_WAIT):
                    sf.send_ack()
                    sf.send_fin()

    # ================================================================ subflow lifecycle
    def on_subflow_fin(self, sf: Subflow) -> None:
        """The peer closed a subflow (TCP FIN)."""
        if self.fallback:
            self.eof = True
            self.cond.notify_all()
            if self.tx_closed and self.data_fin_dsn is not None:
                pass
            return
        self._maybe_close_subflows()

    def on_subflow_established(self, sf: Subflow) -> None:
        """An MP_JOIN subflow completed its four-way handshake."""
        self.joined = True
        self.stack.emit_event(Event("sf_established", self.local_token, time.time(), sf.key, sf.backup))
        if self.ito is not None and self.ito.on_subflow_up(sf, time.monotonic()):
            self.emit("resumed", sf)
            self._reinject_from(self.snd_una, None)   # what the dead subflows held goes again
        self.cond.notify_all()
        self.stack.wake()

    def on_subflow_stale(self, sf: Subflow) -> None:
        """Repeated RTOs: reinject what the subflow holds on the others (§3.3.6)."""
        others = [o for o in self.subflows if o is not sf and o.can_send_data()]
        if not others:
            return
        for seg in sf.rtx:
            if seg.dsn is not None and seg.payload and seg.dsn + len(seg.payload) > self.snd_una:
                self.reinject.append((seg.dsn, seg.payload))
        self.stack.wake()

    def on_subflow_recovered(self, sf: Subflow) -> None:
        """A stale subflow got an ACK again."""

    def on_subflow_reset(self, sf: Subflow, seg: TcpSegment) -> None:
        """The peer reset a subflow."""
        rst = seg.option(MpTcpRst)
        sf.reset_reason = rst.reason if rst else None
        fast = seg.option(MpFastclose)
        if fast is not None and fast.receiver_key == self.local_key:
            self._fail("connection reset by peer (MP_FASTCLOSE)")
            for other in list(self.subflows):
                self._drop_subflow(other, "MP_FASTCLOSE")
            return
        fail = seg.option(MpFail)
        if fail is not None and not self.fallback:
            # §3.7: the peer's checksum failed on this subflow and it discarded
            # what followed, though the subflow acknowledged it: send it again.
            self.stack.log(f"RST with MP_FAIL at DSN {fail.dsn} on {sf.key}")
            self._reinject_from(unwrap64(fail.dsn, self.snd_una), sf)
            self.on_subflow_stale(sf)
            self._drop_subflow(sf, f"reset by peer with MP_FAIL (reason {sf.reset_reason})")
            return
        self.on_subflow_stale(sf)
        self._drop_subflow(sf, f"reset by peer (reason {sf.reset_reason})" if rst else "reset by peer")

    def on_subflow_failed(self, sf: Subflow, reason: str) -> None:
        """The subflow gave up (handshake unanswered, too many RTOs)."""
        if sf.state not in (State.SYN_SENT, State.SYN_RCVD):
            self.on_subflow_stale(sf)
            sf.send_rst([MpTcpRst(RST_UNSPECIFIED)] if not self.fallback else [])
        self._drop_subflow(sf, reason)

    def _reset_subflow(self, sf: Subflow, reason_code: int, why: str) -> None:
        self.stack.log(f"resetting subflow {sf.key}: {why}")
        sf.send_rst([MpTcpRst(reason_code)])
        self.on_subflow_stale(sf)
        self._drop_subflow(sf, why)

    def close_subflow(self, sf: Subflow, reason_code: int, why: str) -> None:
        """Reset one subflow with MP_TCPRST (its unacknowledged data goes to the others)."""
        self._reset_subflow(sf, reason_code, why)

    # ================================================================ inactivity (stack/inactivity.py)
    def expire_inactive(self, reason: str) -> None:
        """The inactivity timer ran out without a subflow: remove the connection (token freed)."""
        self.emit("expired", reason=reason)
        self._fail(reason)
        for sf in list(self.subflows):   # re-establishing attempts still pending
            self._drop_subflow(sf, reason)
        self._closed()

    def resume_round(self) -> None:
        """One re-establishing round of an inactive client: an MP_JOIN from every usable local address."""
        now = time.monotonic()
        # every subflow left is half-open (none is up while inactive): a join whose SYN, or
        # third ACK, went unanswered (also one half-open when the paths went down)
        for sf in [s for s in self.subflows if s.state in (State.SYN_SENT, State.SYN_RCVD) or not s.fully_established]:
            if now - sf.syn_sent_at >= inactivity.JOIN_PATIENCE_S:
                sf.abort()   # a fresh SYN replaces its backed-off retries
                self.subflows.remove(sf)
                self.stack.forget_subflow(sf)
        pending = {s.laddr for s in self.subflows}
        if self.peer_deny_join_initial and self.pm.peer_addrs:
            peer = next(iter(self.pm.peer_addrs.values()))
            remote = (peer.addr, peer.port or self.remote_port())
        else:
            remote = self.pm.initial_remote
        for laddr in self.stack.rescan():
            if laddr in pending:
                continue
            try:
                self.stack.open_subflow(self, laddr, remote[0], remote[1], join=True,
                                        addr_id=self.pm.local_id(laddr))
            except StackError as exc:
                self.stack.log(f"re-establishing from {laddr}: {exc}")

    def emit(self, kind: str, sf: Subflow | None = None, reason: str | None = None,
             rate_kbps: float | None = None) -> None:
        """Publish an event of this connection (sf_priority, announced, removed, fallback, ...)."""
        self.stack.emit_event(Event(kind, self.local_token, time.time(), sf.key if sf else None,
                                    sf.backup if sf else False, reason, rate_kbps))

    def accepts_join_to(self, laddr: str, lport: int) -> bool:
        """False for a join to our initial address and port when our SYN/ACK carried the C flag."""
        return not (self.deny_join_initial and (laddr, lport) == self.pm.initial_local)

    def remote_port(self) -> int:
        """The peer's port of the initial subflow (where joins go unless an ADD_ADDR names one)."""
        return self.pm.initial_remote[1]

    def open_join_to(self, raddr: str, rport: int, remote_addr_id: int) -> None:
        """Start (without waiting) a join to a peer address, from the local address routing picks."""
        try:
            laddr = self.stack.source_for(raddr)
            sf = self.stack.open_subflow(self, laddr, raddr, rport, join=True, addr_id=self.pm.local_id(laddr))
        except StackError as exc:
            self.stack.log(f"join to {raddr}:{rport}: {exc}")
            return
        sf.remote_addr_id = remote_addr_id

    def on_subflow_closed(self, sf: Subflow) -> None:
        """A subflow finished its FIN exchange."""
        self._drop_subflow(sf, None)

    def _drop_subflow(self, sf: Subflow, reason: str | None) -> None:
        if sf not in self.subflows:
            return
        info = self._subflow_info(sf)
        sf.abort()
        self.subflows.remove(sf)
        self.closed_subflows.append(info)
        self.stack.forget_subflow(sf)
        self.stack.emit_event(Event("sf_closed", self.local_token, time.time(), sf.key, sf.backup, reason))
        # With ITO the connection is inactive once no *established* subflow is left: a
        # half-open join (SYN/ACK or third ACK unanswered, retried for about a minute) is
        # not probed by keep-alives and must not keep a dead connection from expiring.
        if self.ito is not None and not self.ito.any_up():
            if self.ito.inactive_since is not None:
                return   # a failed re-establishing attempt: the timer decides
            if self.ito.keeps_state():
                self.ito.enter_inactive(time.monotonic())
                return
        if not self.subflows:
            if self.state in ("SYN_SENT", "SYN_RCVD"):
                self._fail(reason or "handshake failed")
            elif not (self.eof and (self.data_fin_acked or self.fallback)) and self.error is None:
                self._fail(reason or "all subflows closed")
            self._closed()
        else:
            self.stack.wake()

    def _fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        self.cond.notify_all()

    def _closed(self) -> None:
        if self.state == "CLOSED":
            return
        self.state = "CLOSED"
        self.stack.unregister(self)
        self.stack.emit_event(Event("closed", self.local_token, time.time(), reason=self.error))
        self.cond.notify_all()

    # ================================================================ API (takes the lock)
    def wait_established(self, timeout: float) -> None:
        """Block until the connection is established; StackError when it failed or timed out."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.state != "SYN_SENT" or self.error, timeout):
                self.abort()
                raise StackError(f"connect timed out after {timeout:g} s")
            if self.error or self.state != "ESTABLISHED":
                raise StackError(self.error or "connection closed during the handshake")

    def send(self, data: bytes, timeout: float = 30.0) -> int:
        """Queue all of data for sending; blocks while the send buffer is full."""
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        with self.cond:
            while view:
                if self.error:
                    raise StackError(self.error)
                if self.tx_closed or self.state == "CLOSED":
                    raise StackError("send on a closed connection")
                room = SNDBUF - (len(self.tx) - self.tx_off)
                if room <= 0:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise StackError(f"send timed out after {timeout:g} s (peer not reading?)")
                    self.cond.wait(min(left, 0.5))
                    continue
                chunk = view[:room]
                self.tx += chunk
                view = view[len(chunk):]
                self.push()
        return len(data)

    def recv(self, bufsize: int = 65536, timeout: float = 30.0) -> bytes:
        """Up to bufsize bytes; b"" at end of stream; StackError on reset or timeout."""
        with self.cond:
            ok = self.cond.wait_for(lambda: self.rx or self.eof or self.error or self.state == "CLOSED",
                                    timeout)
            if not ok:
                raise StackError(f"recv timed out after {timeout:g} s")
            if self.rx:
                out = bytes(self.rx[:bufsize])
                del self.rx[:len(out)]
                if self.last_window_sent < RCVBUF // 4 and RCVBUF - len(self.rx) >= RCVBUF // 2:
                    for sf in self.subflows:
                        sf.ack_pending = True   # a window update unblocks the sender
                    self.stack.wake()
                return out
            if self.error:
                raise StackError(self.error)
            return b""

    def close(self) -> None:
        """Graceful close: DATA_FIN after all queued data, then the subflows' FINs."""
        with self.cond:
            if self.tx_closed or self.state == "CLOSED":
                return
            self.tx_closed = True
            self.push()
            self.stack.wake()

    def wait_closed(self, timeout: float) -> bool:
        """Block until the connection reached CLOSED; False on timeout."""
        with self.cond:
            return self.cond.wait_for(lambda: self.state == "CLOSED", timeout)

    def abort(self) -> None:
        """Abortive close (§3.5): RST with MP_FASTCLOSE on every subflow."""
        with self.cond:
            self._fail("aborted")   # first: an aborted connection is not kept as inactive (ITO)
            for sf in list(self.subflows):
                if sf.state != State.SYN_SENT:
                    opts = [] if self.fallback or self.remote_key is None else [MpFastclose(self.remote_key)]
                    sf.send_rst(opts)
                self._drop_subflow(sf, "aborted")
            self._closed()

    def add_subflow(self, local_addr: str, backup: bool = False, timeout: float = 5.0,
                    remote: tuple[str, int] | None = None) -> None:
        """Open an MP_JOIN subflow from local_addr to remote (default: the peer's initial address/port)."""
        with self.cond:
            self._require_mptcp("join")
            if not self.subflows:
                raise StackError("cannot join: no subflow left")
            if remote is None:
                if self.peer_deny_join_initial:
                    # §3.1 C flag: the peer accepts joins only to addresses it announced.
                    raise StackError("cannot join: the peer does not accept joins to its initial address "
                                     "and port (C flag); join an address it announced")
                remote = self.pm.initial_remote
            # A join must not overtake the third ACK of the handshake: the peer knows our token
            # only once it has processed that ACK (Linux answers an earlier MP_JOIN with a RST and
            # counts MPJoinNoTokenFound; on two paths of equal delay that was every other join).
            # Wait until the peer's first DSS shows it has, or two RTTs of the initial subflow.
            grace = max(2 * (self.subflows[0].srtt or 0.05), 0.02)
            self.cond.wait_for(lambda: self.peer_dss_seen or self.state != "ESTABLISHED", grace)
            self._require_mptcp("join")
            if not self.subflows:
                raise StackError("cannot join: no subflow left")
            sf = self.stack.open_subflow(self, local_addr, remote[0], remote[1], join=True,
                                         backup=backup, addr_id=self.pm.local_id(local_addr))
            ok = self.cond.wait_for(lambda: sf.fully_established or sf not in self.subflows, timeout)
            if not ok or sf not in self.subflows:
                # A join given up on goes (silently, like a kernel subflow never answered): its SYNs
                # would go on for their retries and a graceful close would wait for them.
                self._drop_subflow(sf, "MP_JOIN not established in time")
                raise StackError(f"MP_JOIN from {local_addr} failed")

    def resume(self, timeout: float = 10.0) -> None:
        """Re-establish a subflow of an inactive connection now (MP_JOIN from every usable
        local address, new ones included) instead of after half the inactivity timer, and
        wait until one is up. Returns at once while a subflow is up; StackError when the
        inactivity-time option is not in force, on the passive side, once the connection
        is closed, or on timeout (the rounds go on until the timer ends)."""
        with self.cond:
            if self.ito is None:
                raise StackError("cannot resume: the inactivity-time option is not in force (Stack(inactivity_s=...))")
            if not self.active:
                raise StackError("cannot resume: only the connection's opener re-establishes subflows")
            if self.state == "CLOSED":
                raise StackError(f"cannot resume: connection closed ({self.error or 'closed'})")
            self.ito.start_resuming(time.monotonic())
            self.stack.wake()
            ok = self.cond.wait_for(lambda: self.ito.inactive_since is None or self.state == "CLOSED", timeout)
            if self.state == "CLOSED":
                raise StackError(f"cannot resume: connection closed ({self.error or 'closed'})")
            if not ok:
                raise StackError(f"no subflow re-established within {timeout:g} s")

    def _require_mptcp(self, what: str) -> None:
        if self.fallback or self.remote_key is None or self.state != "ESTABLISHED":
            raise StackError(f"cannot {what}: the connection is not an established MPTCP connection")

    def announce(self, addr: str, port: int | None = None) -> int:
        """Announce a local address (ADD_ADDR, repeated until echoed); returns its address ID."""
        with self.cond:
            self._require_mptcp("announce")
            if addr not in self.stack.by_addr:
                raise StackError(f"cannot announce {addr}: not an address of an attached interface")
            if port is not None and port not in self.stack.listeners:
                raise StackError(f"cannot announce port {port}: the stack does not listen on it")
            try:
                addr_id = self.pm.announce(addr, port)
            except ValueError as exc:
                raise StackError(f"cannot announce {addr}: {exc}") from None
            return addr_id

    def withdraw(self, addr_id: int) -> None:
        """Withdraw a local address ID (REMOVE_ADDR) and reset the subflows using it."""
        with self.cond:
            self._require_mptcp("withdraw")
            if not 0 <= addr_id <= 255:
                raise StackError(f"cannot withdraw address ID {addr_id}: not in 0..255")
            self.pm.withdraw(addr_id)

    def set_backup(self, local_addr: str, backup: bool) -> int:
        """Change the priority of the subflows from local_addr and tell the peer (MP_PRIO); returns how many."""
        with self.cond:
            self._require_mptcp("change priority")
            subs = [sf for sf in self.subflows if sf.laddr == local_addr and sf.fully_established]
            if not subs:
                raise StackError(f"cannot change priority: no established subflow from {local_addr}")
            for sf in subs:
                sf.backup = backup
                # §3.3.8: MP_PRIO applies to the subflow it is sent on.
                sf.send_ack([self._data_ack_option(), MpPrio(backup)])
            self.stack.wake()
            return len(subs)

    def request_rate_limit(self, subflow: str | tuple, kbps: float) -> int:
        """Ask the peer to send at most kbps kbit/s on our subflows from a local address (or on
        the one subflow whose key is given): the SRL option rides on that subflow, resent at most
        once a second and at most three times until the peer is seen to honour it. 0: no new
        data there; math.inf: lift the limit. Returns how many subflows it concerns."""
        try:
            opt = rate_limit.SubflowRateLimit(kbps)
        except ValueError as exc:
            raise StackError(f"cannot request a rate limit: {exc}") from None
        with self.cond:
            self._require_mptcp("request a rate limit")
            subs = [sf for sf in self.subflows if sf.fully_established and
                    (sf.key == tuple(subflow) if isinstance(subflow, tuple) else sf.laddr == subflow)]
            if not subs:
                raise StackError(f"cannot request a rate limit: no established subflow {subflow}")
            for sf in subs:
                sf.srl_request = rate_limit.RateRequest(opt.kbps)
                self._send_rate_limit(sf, time.monotonic())
            self.stack.wake()
            return len(subs)

    def _send_rate_limit(self, sf: Subflow, now: float) -> None:
        req = sf.srl_request
        sf.send_ack([self._data_ack_option(), rate_limit.SubflowRateLimit(req.kbps)])
        req.sent(now, sf.stats.bytes_received)
        self.emit("sf_rate_limit_requested", sf, f"send {req.sends}", req.kbps)

    def _rate_limit_timer(self, now: float) -> None:
        for sf in self.subflows:
            wake = sf.srl_limiter.deadline() if sf.srl_limiter is not None else None
            if wake is not None and wake <= now:
                sf.srl_limiter.woke()     # push() runs next and sends what the tokens allow
            req = sf.srl_request
            if req is None or req.due() is None or req.due() > now:
                continue
            verdict = req.check(now, sf.stats.bytes_received, sf.mss)
            if verdict == "resend":
                self._send_rate_limit(sf, now)
            else:
                self.emit(f"sf_rate_limit_{verdict}", sf, f"after {req.sends} sends", req.kbps)

    def _on_rate_limit(self, sf: Subflow, opt: "rate_limit.SubflowRateLimit") -> None:
        """The peer asks us to cap our sending on sf (a repeat of the same rate changes nothing)."""
        current = sf.srl_limiter.kbps if sf.srl_limiter is not None else math.inf
        if opt.kbps == current:
            return
        sf.srl_limiter = None if opt.unlimited else rate_limit.SubflowLimiter(opt.kbps, sf.mss,
                                                                             self.rate_limit_enforcement)
        self.emit("sf_rate_limit", sf, self.rate_limit_enforcement, opt.kbps)
        self.stack.wake()

    def rekey(self, local_key: int, remote_key: int) -> None:
        """Use keys agreed outside MPTCP (e.g. a TLS exporter; docs/privacy.md) from
        now on: tokens, MP_JOIN HMACs and later subflows' DSN offsets; the data
        sequence spaces stay. StackError unless both ends agreed to external keys."""
        with self.cond:
            if not self.privacy_agreed & privacy.FLAG_EXTERNAL_KEYS:
                raise StackError("external keys were not agreed in the MP_CAPABLE handshake")
            old = self.local_token
            self.local_key, self.remote_key = local_key, remote_key
            self.local_token, self.remote_token = crypto.token_of(local_key), crypto.token_of(remote_key)
            if self.dsn_offsets is not None:
                self.dsn_offsets.rekey(local_key, remote_key)
            with self.stack.lock:
                if self.stack.tokens.get(old) is self:
                    del self.stack.tokens[old]
                self.stack.register_token(self)

    def info(self) -> ConnectionInfo:
        """A snapshot of the connection and its subflows."""
        with self.cond:
            return ConnectionInfo(self.local_token, self.remote_token, self.state, self.fallback, self.checksum,
                                  self.bytes_sent, self.bytes_received,
                                  [self._subflow_info(sf) for sf in self.subflows], list(self.closed_subflows),
                                  self.fallback_reason, tuple(self.pm.peer_addrs.values()),
                                  tuple(i for i, a in self.pm.announced.items() if a.echoed),
                                  None if self.ito is None else self.ito.info(time.monotonic()))

    @staticmethod
    def _subflow_info(sf: Subflow) -> SubflowInfo:
        return SubflowInfo((sf.laddr, sf.lport), (sf.raddr, sf.rport), sf.state, sf.join, sf.backup,
                           sf.fully_established, None if sf.srtt is None else sf.srtt * 1000, sf.rto * 1000,
                           int(sf.cc.cwnd), sf.cc.ssthresh, sf.inflight, sf.stats.bytes_sent,
                           sf.stats.bytes_retransmitted, sf.stats.bytes_acked, sf.stats.bytes_received,
                           sf.stats.fast_retransmits, sf.stats.timeouts, sf.reset_reason, sf.addr_id,
                           sf.remote_addr_id, sf.srl_request.kbps if sf.srl_request else None,
                           sf.srl_limiter.kbps if sf.srl_limiter else None)
