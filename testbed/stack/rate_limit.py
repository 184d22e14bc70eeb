"""The subflow rate-limit option (SRL, draft-hoang-mptcp-sub-rate-limit-00, an
experimental extension of this stack; docs/stack.md "Subflow rate limit (SRL)"):
its codec, the sender's per-subflow enforcement and the receiver's request state.

A host asks its peer to cap the peer's sending rate on the subflow that carries
the option (a cellular quota, roaming). Wire format (MPTCP's private-use subtype
0xf, told apart from the other experimental options by the low nibble of the
subtype byte, nibble 3):

    kind 30 | length 7 | 0xf << 4 | 3 | requested rate (IEEE-754 binary32, kbit/s)

Length: the draft's figure says 5, but its fields (kind, length, subtype +
4 reserved bits, a 32-bit rate) take 7 bytes; 7 is the least that holds them, so
that is our choice (the reserved nibble carries our private-use discriminator).
Rate 0 asks the peer to stop sending new data on the subflow (what is in flight
and retransmissions still go); +infinity (our choice, the draft has no way to
lift a limit) lifts it. A NaN or negative rate, or another length, is malformed
and decodes to UnknownMptcp, which the engine ignores.

Enforcement at the sender is pacing: a token bucket per limited subflow that
every data byte sent on it (new or retransmitted) drains; the scheduler sees a
subflow without tokens as having no room, so new data moves to the other
subflows. cwnd clamping (inflight <= rate x srtt) is the alternative (mode
"cwnd"); docs/stack.md says why pacing is the default.

The option is not acknowledged (the draft: resend at most once per second, at
most three sends without having received one). What "received one" means for a
one-way request, our choice: the requester sees the peer honour it, i.e. over a
whole second after a send the subflow delivered no more than 1.25 x the rate
(plus one segment); then it stops resending. A peer that ignores the option (an
unmodified kernel) gets three sends, one a second, and then no more.
"""
from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass

from testbed.stack.options import KIND, MP_EXPERIMENTAL, PRIVATE_USE_DECODERS

NIBBLE = 3                  # private-use subtype 0xf, low nibble 3
LENGTH = 7                  # kind, length, subtype|nibble, binary32 rate
RESEND_INTERVAL = 1.0       # the draft: at most once per second
MAX_SENDS = 3               # the draft: at most three sends without having received one
HONOURED_SLACK = 1.25       # a second at <= 1.25 x the rate (+ one segment) counts as received
BURST_SECONDS = 0.005       # token bucket depth: 5 ms at the rate, at least two segments
MODES = ("pacing", "cwnd")


def _float32(value: float) -> float:
    return struct.unpack("!f", struct.pack("!f", value))[0]


@dataclass(frozen=True)
class SubflowRateLimit:
    """SRL: the rate (kbit/s, binary32 on the wire) the sender of the option asks its peer
    not to exceed on the subflow carrying it; 0 = stop sending new data, inf = no limit."""
    kbps: float

    def __post_init__(self) -> None:
        if not isinstance(self.kbps, (int, float)) or math.isnan(self.kbps) or self.kbps < 0:
            raise ValueError(f"SRL rate: {self.kbps!r} kbit/s is not a number >= 0")
        try:
            object.__setattr__(self, "kbps", _float32(float(self.kbps)))
        except OverflowError:
            raise ValueError(f"SRL rate: {self.kbps!r} kbit/s does not fit binary32 "
                             f"(<= 3.4e38, or inf for no limit)") from None

    def to_bytes(self) -> bytes:
        """The option's 7 bytes (kind and length included)."""
        return struct.pack("!BBBf", KIND, LENGTH, (MP_EXPERIMENTAL << 4) | NIBBLE, self.kbps)

    @property
    def unlimited(self) -> bool:
        """True when the option lifts the limit (+infinity)."""
        return math.isinf(self.kbps)


def decode(raw: bytes) -> SubflowRateLimit | None:
    """SRL from one option's bytes (kind and length included); None when malformed."""
    if len(raw) != LENGTH or raw[0] != KIND or raw[1] != LENGTH or raw[2] != (MP_EXPERIMENTAL << 4) | NIBBLE:
        return None
    (kbps,) = struct.unpack_from("!f", raw, 3)
    if math.isnan(kbps) or kbps < 0:
        return None
    return SubflowRateLimit(kbps)


PRIVATE_USE_DECODERS[NIBBLE] = decode


def rate_limit_in(options: list) -> SubflowRateLimit | None:
    """The SRL among a segment's decoded options, or None."""
    return next((o for o in options if isinstance(o, SubflowRateLimit)), None)


def describe(mode: str = "pacing") -> dict:
    """The choices made where the draft leaves them open, for a run's manifest."""
    return {"option": "mptcp private-use subtype 0xf, nibble 3", "length": LENGTH,
            "length_why": "the draft's figure says 5; kind, length, subtype and a 32-bit rate take 7",
            "rate": "binary32 kbit/s (0: no new data, inf: limit lifted)", "enforcement": mode,
            "resend": f"at most every {RESEND_INTERVAL:g} s, at most {MAX_SENDS} sends until honoured",
            "honoured": f"a second at <= {HONOURED_SLACK:g} x the rate + one segment"}


class SubflowLimiter:
    """The sender's enforcement of the peer's SRL on one subflow (pacing or cwnd clamping)."""

    def __init__(self, kbps: float, mss: int, mode: str = "pacing", now: float | None = None):
        if mode not in MODES:
            raise ValueError(f"SRL enforcement: {mode!r} is not one of {', '.join(MODES)}")
        self.kbps = kbps
        self.mode = mode
        self.mss = mss
        self.rate = kbps * 1000 / 8                     # bytes per second
        self.depth = max(2 * mss, self.rate * BURST_SECONDS)
        self.tokens = float(mss)                        # no burst when the limit arrives
        self.stamp = time.monotonic() if now is None else now
        self.wake_at: float | None = None               # a send was refused: when tokens suffice

    def _refill(self, now: float) -> None:
        self.tokens = min(self.depth, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def allows(self, size: int, inflight: int, srtt: float | None, now: float | None = None) -> bool:
        """Whether min(size, MSS) more new bytes may go out now."""
        if self.rate <= 0:
            return False
        need = min(size, self.mss) if size else self.mss
        if self.mode == "cwnd":
            # cwnd <= rate x srtt (one segment at least, so the subflow keeps RTT samples)
            return inflight + need <= max(self.rate * (srtt or 0.1), self.mss)
        now = time.monotonic() if now is None else now
        self._refill(now)
        if self.tokens >= need:
            return True
        self.wake_at = now + (need - self.tokens) / self.rate
        return False

    def consume(self, n: int, now: float | None = None) -> None:
        """n data bytes went out on the subflow (new or retransmitted)."""
        if self.mode != "pacing" or self.rate <= 0 or not n:
            return
        self._refill(time.monotonic() if now is None else now)
        self.tokens -= n

    def deadline(self) -> float | None:
        """When a refused send may go (None when nothing waits on this limiter)."""
        return self.wake_at

    def woke(self) -> None:
        """The connection's timer ran at deadline(): the next refusal sets a new one."""
        self.wake_at = None


@dataclass
class RateRequest:
    """The receiver's side: an SRL it sent on one subflow and whether the peer honours it."""
    kbps: float
    sends: int = 0
    sent_at: float = 0.0
    received_at_send: int = 0       # the subflow's bytes received when it was last sent
    honoured: bool = False
    given_up: bool = False

    def due(self) -> float | None:
        """When to check the peer's rate (and maybe resend); None when done."""
        if self.honoured or self.given_up:
            return None
        return self.sent_at + RESEND_INTERVAL

    def sent(self, now: float, received: int) -> None:
        """The option went out on the subflow."""
        self.sends += 1
        self.sent_at = now
        self.received_at_send = received

    def check(self, now: float, received: int, mss: int) -> str:
        """At due(): 'honoured', 'resend' or 'given_up', from the bytes received since the last send."""
        elapsed = max(now - self.sent_at, 1e-3)
        allowed = HONOURED_SLACK * self.kbps * 1000 / 8 * elapsed + mss
        if math.isinf(self.kbps) or received - self.received_at_send <= allowed:
            self.honoured = True
            return "honoured"
        if self.sends >= MAX_SENDS:
            self.given_up = True
            return "given_up"
        return "resend"
