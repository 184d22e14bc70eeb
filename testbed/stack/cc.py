"""Per-subflow congestion control: NewReno (RFC 5681/6582) and CUBIC (RFC 9438).

Windows are kept in bytes; CUBIC works in segments internally as its RFC does.
The subflow calls on_ack for every ACK that advances snd_una outside recovery,
on_loss when it enters fast recovery, on_rto on a retransmission timeout.
"""
from __future__ import annotations

from dataclasses import dataclass

INITIAL_WINDOW_SEGMENTS = 10  # RFC 6928, what Linux uses


@dataclass
class NewReno:
    """Slow start plus additive increase, halving on loss."""
    mss: int
    cwnd: float = 0.0
    ssthresh: float = float("inf")
    name: str = "reno"

    def __post_init__(self) -> None:
        if not self.cwnd:
            self.cwnd = INITIAL_WINDOW_SEGMENTS * self.mss

    def on_ack(self, acked: int, now: float, srtt: float) -> None:
        """Grow the window for acked bytes (slow start, then ~1 MSS per RTT)."""
        if self.cwnd < self.ssthresh:
            self.cwnd += min(acked, self.mss)
        else:
            self.cwnd += self.mss * self.mss / self.cwnd

    def on_loss(self, flight: int, now: float) -> None:
        """Fast-retransmit reaction: ssthresh = max(flight / 2, 2 MSS)."""
        self.ssthresh = max(flight / 2, 2 * self.mss)
        self.cwnd = self.ssthresh

    def on_rto(self, flight: int, now: float) -> None:
        """Timeout: back to one segment."""
        self.ssthresh = max(flight / 2, 2 * self.mss)
        self.cwnd = self.mss


@dataclass
class Cubic:
    """CUBIC window growth with the Reno-friendly region and fast convergence."""
    mss: int
    cwnd: float = 0.0
    ssthresh: float = float("inf")
    name: str = "cubic"
    beta: float = 0.7
    c: float = 0.4
    w_max: float = 0.0          # segments, window before the last reduction
    epoch_start: float | None = None
    k: float = 0.0
    w_est: float = 0.0          # segments, Reno-friendly estimate

    def __post_init__(self) -> None:
        if not self.cwnd:
            self.cwnd = INITIAL_WINDOW_SEGMENTS * self.mss

    def on_ack(self, acked: int, now: float, srtt: float) -> None:
        """Slow start below ssthresh, else move towards the cubic target."""
        if self.cwnd < self.ssthresh:
            self.cwnd += min(acked, self.mss)
            return
        cwnd_seg = self.cwnd / self.mss
        if self.epoch_start is None:
            self.epoch_start = now
            if cwnd_seg < self.w_max:
                self.k = ((self.w_max - cwnd_seg) / self.c) ** (1 / 3)
            else:
                self.k = 0.0
                self.w_max = cwnd_seg
            self.w_est = cwnd_seg
        t = now - self.epoch_start
        rtt = max(srtt, 1e-4)
        target = self.c * (t + rtt - self.k) ** 3 + self.w_max
        acked_seg = acked / self.mss
        self.w_est += 3 * (1 - self.beta) / (1 + self.beta) * acked_seg / cwnd_seg
        target = max(target, self.w_est)
        if target > cwnd_seg:
            # RFC 9438 §4.2: increase by (target - cwnd) / cwnd per acked segment, capped at 1.5x.
            target = min(target, 1.5 * cwnd_seg)
            cwnd_seg += (target - cwnd_seg) / cwnd_seg * acked_seg
        else:
            cwnd_seg += acked_seg / (100 * cwnd_seg)
        self.cwnd = cwnd_seg * self.mss

    def _reduce(self) -> None:
        cwnd_seg = self.cwnd / self.mss
        # fast convergence: release bandwidth faster when the window keeps shrinking
        self.w_max = cwnd_seg * (1 + self.beta) / 2 if cwnd_seg < self.w_max else cwnd_seg
        self.ssthresh = max(self.cwnd * self.beta, 2 * self.mss)
        self.epoch_start = None

    def on_loss(self, flight: int, now: float) -> None:
        """Multiplicative decrease by beta."""
        self._reduce()
        self.cwnd = self.ssthresh

    def on_rto(self, flight: int, now: float) -> None:
        """Timeout: remember the window, restart from one segment."""
        self._reduce()
        self.cwnd = self.mss


def make_cc(name: str, mss: int):
    """A congestion controller by name ('cubic' or 'reno')."""
    if name == "cubic":
        return Cubic(mss)
    if name in ("reno", "newreno"):
        return NewReno(mss)
    raise ValueError(f"unknown congestion control {name!r} (cubic, reno)")
