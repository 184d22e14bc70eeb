"""The inactivity-time option (ITO, draft-hoang-mptcp-inactivity-time-00, an
experimental extension of this stack; docs/stack.md "Inactivity time (ITO)"):
its codec and what a connection does while it has no established subflow.

A connection is inactive while it has no established subflow. The option tells
the peer how long to keep the connection's state while inactive, so that a host
whose paths all went away (make-after-break mobility) can come back with an
MP_JOIN from whatever address it has then. Wire format (MPTCP's private-use
subtype 0xf; the draft's 4 reserved bits after the subtype are where our
private-use options put their discriminator, nibble 2 for ITO):

    kind 30 | length 5 | 0xf << 4 | 2 | inactivity timer (16 bits, seconds)

Timer 0 asks the peer to remove the state as soon as no subflow is up; the
draft suggests 7440 s. Another length decodes to UnknownMptcp, which the engine
ignores (RFC 8684 §3).

Semantics on this stack (`Stack(inactivity_s=..., inactivity_bounds_s=...)`;
a stack without inactivity_s neither sends nor honours the option and behaves
as before: the connection fails and closes when its last subflow dies):
- sending: not negotiated; our value rides on the initial subflow's first
  segment after the handshake (the client's MP_CAPABLE ACK) and on each new
  subflow's first segment with room for 5 option bytes, at most MAX_SENDS times
  until the peer's arrives; the first arrival of the peer's is answered once;
- adopting: the peer's value, clamped to our local bounds, is how long we keep
  the state (our own value while the peer sent none, e.g. a kernel peer);
- liveness: the draft does not say how a host learns that a subflow died. With
  ITO in force an established subflow that hears nothing from its peer for
  `probe_s(timer)` (timer/16, 0.25..60 s) sends a TCP keep-alive (one old
  byte, which any TCP answers with an ACK) every `probe_s`; after PROBES unanswered ones the subflow is
  declared dead (as are subflows reset or given up after RTOs);
- inactive: the connection keeps its token and data for the effective timer
  (`inactive` event), then is removed (`expired` event, then `closed`, token
  freed). The active opener (client) starts re-establishing a subflow after
  half the timer: every `retry_s(timer)` an MP_JOIN from each local address
  whose interface is up (the namespace is re-scanned: an address that appeared
  during the outage is attached and used; a SYN unanswered for JOIN_PATIENCE_S
  is replaced by a fresh one) until one completes (`resumed` event;
  unacknowledged data is sent again on it) or the timer ends.
  `Connection.resume()` starts that at once.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from testbed.stack.options import KIND, MP_EXPERIMENTAL, PRIVATE_USE_DECODERS

if TYPE_CHECKING:  # pragma: no cover
    from testbed.stack.connection import Connection
    from testbed.stack.subflow import Subflow

NIBBLE = 2                  # private-use subtype 0xf, low nibble 2
LENGTH = 5                  # kind, length, subtype|nibble, 16-bit timer
TIMER_MAX = 0xFFFF
DEFAULT_S = 7440            # the draft's suggestion
MAX_SENDS = 3               # the draft: at most three sends unless one is received
PROBES = 3                  # unanswered keep-alives before a subflow is declared dead
OPTION_SPACE = 40           # TCP option bytes
JOIN_PATIENCE_S = 1.0       # a re-establishing SYN unanswered this long is replaced by a fresh one


@dataclass(frozen=True)
class InactivityTime:
    """ITO: how long (seconds) the sender asks its peer to keep the connection while inactive."""
    timer_s: int

    def __post_init__(self) -> None:
        if not isinstance(self.timer_s, int) or isinstance(self.timer_s, bool) or \
                not 0 <= self.timer_s <= TIMER_MAX:
            raise ValueError(f"inactivity timer must be an integer in 0..{TIMER_MAX} s, got {self.timer_s!r}")

    def to_bytes(self) -> bytes:
        """The option's bytes (kind and length included)."""
        return struct.pack("!BBBH", KIND, LENGTH, (MP_EXPERIMENTAL << 4) | NIBBLE, self.timer_s)


def decode(raw: bytes) -> InactivityTime | None:
    """ITO from one option's bytes (kind and length included); None when malformed."""
    if len(raw) != LENGTH or raw[0] != KIND or raw[1] != LENGTH or raw[2] != (MP_EXPERIMENTAL << 4) | NIBBLE:
        return None
    return InactivityTime(struct.unpack_from("!H", raw, 3)[0])


PRIVATE_USE_DECODERS[NIBBLE] = decode


def option_in(options: list) -> InactivityTime | None:
    """The ITO among a segment's decoded options."""
    return next((o for o in options if isinstance(o, InactivityTime)), None)


def check_policy(timer_s: int | None, bounds_s: tuple[int, int]) -> None:
    """ValueError naming the parameter and its bound unless the local policy is valid."""
    if timer_s is not None and (not isinstance(timer_s, int) or isinstance(timer_s, bool)
                                or not 0 <= timer_s <= TIMER_MAX):
        raise ValueError(f"inactivity_s: {timer_s!r} is not an integer in 0..{TIMER_MAX}")
    try:
        lo, hi = bounds_s
    except (TypeError, ValueError):
        raise ValueError(f"inactivity_bounds_s: {bounds_s!r} is not a pair (low, high)") from None
    for v in (lo, hi):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= TIMER_MAX:
            raise ValueError(f"inactivity_bounds_s: {v!r} is not an integer in 0..{TIMER_MAX}")
    if lo > hi:
        raise ValueError(f"inactivity_bounds_s: low {lo} is above high {hi}")


def probe_s(timer_s: int) -> float:
    """Silence on a subflow before a keep-alive, and between keep-alives: timer/16 within
    0.25..60 s (a dead subflow is found after 4 of these: a quarter of the timer)."""
    return min(max(timer_s / 16, 0.25), 60.0)


def retry_s(timer_s: int) -> float:
    """Interval of the client's re-establishing rounds: timer/16 within 0.5..30 s."""
    return min(max(timer_s / 16, 0.5), 30.0)


@dataclass(frozen=True)
class InactivityInfo:
    """A connection's ITO values and state (ConnectionInfo.inactivity)."""
    local_s: int                    # our value, sent to the peer
    peer_s: int | None              # the peer's value as received (None: none arrived)
    adopted_s: int                  # how long we keep the state while inactive (peer's within bounds, else ours)
    bounds_s: tuple[int, int]       # our local policy's bounds on the peer's value
    sends: int                      # our options sent
    inactive_for_s: float | None    # seconds since the last subflow died (None: a subflow is up)
    resumed: int                    # inactive periods ended by a subflow coming back


@dataclass
class _Liveness:
    """What a subflow has heard: the peer's segment count when it last moved, keep-alives since."""
    heard: int
    at: float
    probes: int = 0


class Inactivity:
    """One connection's ITO state: the values, the sends, liveness, the inactive period."""

    def __init__(self, conn: "Connection", local_s: int, bounds_s: tuple[int, int]):
        self.conn = conn
        self.local_s = local_s
        self.bounds_s = bounds_s
        self.peer_s: int | None = None     # the peer's value as received
        self.sends = 0                     # our options sent
        self.answer_due = False            # the peer's first arrived: answer once
        self.due: set = set()              # subflows whose next segment with room carries ours
        self.inactive_since: float | None = None
        self.resuming_from: float | None = None   # when the client's re-establishing rounds start
        self.next_round: float | None = None
        self.resumed = 0                   # times a subflow came back after an inactive period
        self.live: dict = {}               # Subflow -> _Liveness

    # ------------------------------------------------------------------ values
    @property
    def effective_s(self) -> int:
        """How long the state is kept while inactive: the peer's value within our bounds, else ours."""
        if self.peer_s is None:
            return self.local_s
        lo, hi = self.bounds_s
        return min(max(self.peer_s, lo), hi)

    def info(self, now: float) -> InactivityInfo:
        """A snapshot for ConnectionInfo."""
        return InactivityInfo(self.local_s, self.peer_s, self.effective_s, tuple(self.bounds_s), self.sends,
                              None if self.inactive_since is None else now - self.inactive_since, self.resumed)

    # ------------------------------------------------------------------ the option out and in
    def mark_due(self, sf: "Subflow") -> None:
        """A subflow got established: its next segment with room may carry our value."""
        if self.peer_s is None and self.sends < MAX_SENDS:
            self.due.add(sf)

    def attach(self, sf: "Subflow", options: list) -> list:
        """options plus our ITO when it is due on sf (or an answer is) and the segment has room for it."""
        sending = sf in self.due and self.peer_s is None and self.sends < MAX_SENDS
        if not (sending or self.answer_due):
            self.due.discard(sf)
            return options
        with_ito = [*options, InactivityTime(self.local_s)]
        if _option_bytes(sf, with_ito) > OPTION_SPACE:
            return options   # a later segment of this subflow carries it
        self.due.discard(sf)
        self.answer_due = False
        self.sends += 1
        return with_ito

    def on_option(self, opt: InactivityTime) -> None:
        """The peer's value arrived: adopt it (within bounds); answer its first arrival once."""
        first = self.peer_s is None
        self.peer_s = opt.timer_s
        self.due.clear()
        if first:
            self.answer_due = True
            for sf in self.conn.subflows:
                if sf.fully_established:
                    sf.ack_pending = True   # the answer rides on the next ACK
            self.conn.stack.wake()

    # ------------------------------------------------------------------ liveness and the inactive period
    def keeps_state(self) -> bool:
        """The last subflow died: True when the connection stays (inactive) instead of failing."""
        c = self.conn
        if c.state != "ESTABLISHED" or c.fallback or c.error is not None or self.effective_s == 0:
            return False
        return not (c.eof and c.data_fin_acked)

    def any_up(self) -> bool:
        """True while one of the connection's subflows is established and not found dead
        (half-open joins do not count: they are not probed)."""
        return any(sf in self.live for sf in self.conn.subflows)

    def enter_inactive(self, now: float) -> None:
        """No established subflow is left: keep the state for the effective timer."""
        self.inactive_since = now
        self.live.clear()
        self.due.clear()
        self.resuming_from = now + self.effective_s / 2 if self.conn.active else None
        self.next_round = self.resuming_from
        self.conn.emit("inactive", reason=f"kept for {self.effective_s} s")

    def start_resuming(self, now: float) -> None:
        """Begin the client's re-establishing rounds now (the app asked)."""
        if self.inactive_since is not None and self.conn.active:
            self.resuming_from = min(self.resuming_from or now, now)
            self.next_round = now

    def on_subflow_up(self, sf: "Subflow", now: float) -> bool:
        """A subflow got established; True when it ended an inactive period."""
        self.live[sf] = _Liveness(sf.stats.segments_received, now)
        self.mark_due(sf)
        if self.inactive_since is None:
            return False
        self.inactive_since = self.resuming_from = self.next_round = None
        self.resumed += 1
        return True

    def deadline(self) -> float | None:
        """When on_timer must run next."""
        if self.inactive_since is not None:
            end = self.inactive_since + self.effective_s
            return min(end, self.next_round) if self.next_round is not None else end
        if not self.live:
            return None
        step = probe_s(self.effective_s)
        return min(v.at + step * (v.probes + 1) for v in self.live.values())

    def on_timer(self, now: float) -> None:
        """Keep-alives and dead subflows; while inactive: re-establishing rounds, expiry."""
        c = self.conn
        if self.inactive_since is not None:
            if now >= self.inactive_since + self.effective_s:
                c.expire_inactive(f"no subflow for {self.effective_s} s (inactivity timer)")
            elif self.next_round is not None and now >= self.next_round:
                self.next_round = now + retry_s(self.effective_s)
                c.resume_round()
            return
        step = probe_s(self.effective_s)
        for sf, v in list(self.live.items()):
            if sf not in c.subflows:
                del self.live[sf]
                continue
            if sf.stats.segments_received != v.heard:
                v.heard, v.at, v.probes = sf.stats.segments_received, now, 0
                continue
            if now < v.at + step * (v.probes + 1):
                continue
            if v.probes >= PROBES:
                del self.live[sf]
                c.on_subflow_failed(sf, f"silent for {now - v.at:.1f} s ({PROBES} keep-alives unanswered)")
                if self.inactive_since is not None:
                    return
                continue
            v.probes += 1
            if not sf.rtx:   # data in flight: its retransmissions are the probes
                sf.send_keepalive()


def _option_bytes(sf: "Subflow", options: list) -> int:
    from testbed.stack.packet import Timestamps, encode_tcp_options
    ts = [Timestamps(0, 0)] if sf.ts_ok else []
    try:
        return len(encode_tcp_options([*ts, *options]))
    except ValueError:
        return OPTION_SPACE + 1

