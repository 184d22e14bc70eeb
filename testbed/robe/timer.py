"""The RobE_TIMER timer: how long one path gets before the next is tried.

The draft leaves the value TBD ("preferably TCP's own retransmission timer").
Our default is exactly that: Linux's initial SYN RTO of 1 s (RFC 6298 2.1),
the moment the kernel would retransmit the SYN on the same broken path — RobE
sends it as a fresh SYN+MP_CAPABLE on the next path instead. Alternatives:
- fixed: any value in seconds;
- rtt: from the IPS history of the path being tried, RFC 6298 RTO =
  srtt + 4*rttvar, clamped to [floor, 1 s] (floor 200 ms = Linux TCP_RTO_MIN);
  falls back to the initial RTO for a path without history.
A shorter timer bounds setup on a broken path better but costs an extra
handshake whenever the first path is merely slow (draft Table 1: "bounded by
the timer").
"""
from __future__ import annotations

from dataclasses import dataclass

from testbed.mptcp.linux import INITIAL_SYN_RTO_S, TCP_RTO_MIN_S
from testbed.robe.history import History
from testbed.robe.sockets import LocalPath


@dataclass
class TimerPolicy:
    """How long RobE_TIMER gives one path: the initial SYN RTO, a fixed value, or from RTT history."""
    mode: str = "initial-rto"     # initial-rto | fixed | rtt
    fixed_s: float = INITIAL_SYN_RTO_S
    floor_s: float = TCP_RTO_MIN_S
    ceil_s: float = INITIAL_SYN_RTO_S

    def __post_init__(self) -> None:
        if self.mode not in ("initial-rto", "fixed", "rtt"):
            raise ValueError(f"timer mode must be initial-rto, fixed or rtt, got {self.mode!r}")
        if not 0 < self.fixed_s <= 600:
            raise ValueError(f"timer must be in (0, 600] s, got {self.fixed_s}")

    @classmethod
    def parse(cls, text: str) -> "TimerPolicy":
        """'rto' / 'initial-rto', 'rtt', or a number of seconds ('0.5', '300ms')."""
        t = text.strip().lower()
        if t in ("rto", "initial-rto", "default"):
            return cls()
        if t == "rtt":
            return cls(mode="rtt")
        try:
            v = float(t[:-2]) / 1000 if t.endswith("ms") else float(t.rstrip("s"))
        except ValueError:
            raise ValueError(f"bad timer {text!r}: use rto, rtt, or seconds like 0.5 or 300ms") from None
        return cls(mode="fixed", fixed_s=v)

    def value(self, path: LocalPath, history: History | None) -> float:
        """The timer for this path, in seconds."""
        if self.mode == "fixed":
            return self.fixed_s
        if self.mode == "rtt" and history is not None:
            rec = history.records.get(path.name)
            rto = rec.rto_s(self.floor_s, self.ceil_s) if rec else None
            if rto is not None:
                return rto
        return INITIAL_SYN_RTO_S

    def describe(self) -> dict:
        """The policy as a JSON-able dict."""
        if self.mode == "fixed":
            return {"mode": "fixed", "s": self.fixed_s}
        if self.mode == "rtt":
            return {"mode": "rtt", "floor_s": self.floor_s, "ceil_s": self.ceil_s}
        return {"mode": "initial-rto", "s": INITIAL_SYN_RTO_S}
