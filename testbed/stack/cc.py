"""Per-subflow congestion control: NewReno (RFC 5681/6582), CUBIC (RFC 9438), and
the coupled controllers LIA (RFC 6356) and OLIA (Khalili et al., "MPTCP is not
Pareto-optimal", IEEE/ACM ToN 2013).

Windows are kept in bytes; CUBIC and OLIA work in segments internally as their
papers do. The subflow calls on_ack for every ACK that advances snd_una outside
recovery, on_loss when it enters fast recovery, on_rto on a retransmission
timeout, and detach when it goes away. The coupled controllers of one
connection's subflows share a Coupling (the connection owns it): their increase
reads every member's window and RTT; slow start and the decrease stay
per-subflow NewReno, as RFC 6356 section 3 says.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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
            # Counted in bytes (RFC 3465 style, like Linux's per-segment count): a
            # receiver acking every second segment must not halve the growth.
            self.cwnd += self.mss * acked / self.cwnd

    def on_loss(self, flight: int, now: float) -> None:
        """Fast-retransmit reaction: ssthresh = max(flight / 2, 2 MSS)."""
        self.ssthresh = max(flight / 2, 2 * self.mss)
        self.cwnd = self.ssthresh

    def on_rto(self, flight: int, now: float) -> None:
        """Timeout: back to one segment."""
        self.ssthresh = max(flight / 2, 2 * self.mss)
        self.cwnd = self.mss

    def detach(self) -> None:
        """The subflow is gone (uncoupled: nothing to leave)."""


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

    def detach(self) -> None:
        """The subflow is gone (uncoupled: nothing to leave)."""


class Coupling:
    """The coupled controllers of one connection's subflows (what LIA and OLIA sum over)."""

    def __init__(self) -> None:
        self.members: list["Coupled"] = []

    def join(self, cc: "Coupled") -> None:
        """A new subflow's controller takes part."""
        self.members.append(cc)

    def leave(self, cc: "Coupled") -> None:
        """A subflow's controller stops taking part (subflow closed or its controller replaced)."""
        self.members = [m for m in self.members if m is not cc]   # identity: equal-valued twins exist

    def active(self) -> list["Coupled"]:
        """Members with an RTT estimate (a subflow still in its handshake has none and does not count)."""
        return [m for m in self.members if m.rtt > 0]


@dataclass
class Coupled(NewReno):
    """Base of the coupled controllers: NewReno slow start and decrease, a coupled
    congestion-avoidance increase, membership in the connection's Coupling."""
    coupling: Coupling = field(default_factory=Coupling)
    rtt: float = 0.0              # the subflow's smoothed RTT at its last ACK (seconds)
    recovering: bool = False      # cwnd is inflated by fast recovery: window() is ssthresh

    def __post_init__(self) -> None:
        super().__post_init__()
        self.coupling.join(self)

    def window(self) -> float:
        """The window other subflows' increase rules see (not the fast-recovery inflation)."""
        return min(self.cwnd, self.ssthresh) if self.recovering else self.cwnd

    def on_ack(self, acked: int, now: float, srtt: float) -> None:
        """Slow start as NewReno; in congestion avoidance, the coupled increase."""
        self.rtt = max(srtt, 1e-6)
        self.recovering = False
        if self.cwnd < self.ssthresh:
            self.cwnd += min(acked, self.mss)
            return
        self.cwnd = max(self.cwnd + self.increase(acked), self.mss)

    def increase(self, acked: int) -> float:
        """Bytes to add to cwnd for `acked` bytes acknowledged in congestion avoidance."""
        raise NotImplementedError

    def on_loss(self, flight: int, now: float) -> None:
        """Halve this subflow's window (RFC 6356: the decrease is unchanged)."""
        super().on_loss(flight, now)
        self.recovering = True

    def detach(self) -> None:
        """Leave the connection's coupling."""
        self.coupling.leave(self)


@dataclass
class Lia(Coupled):
    """RFC 6356's Linked Increases Algorithm."""
    name: str = "lia"

    def alpha(self) -> float:
        """RFC 6356 section 4: cwnd_total * max(cwnd_i / rtt_i^2) / (sum(cwnd_i / rtt_i))^2."""
        members = self.coupling.active() or [self]
        total = sum(m.window() for m in members)
        best = max(m.window() / (m.rtt * m.rtt) for m in members)
        denom = sum(m.window() / m.rtt for m in members) ** 2
        return total * best / denom if denom else 1.0

    def increase(self, acked: int) -> float:
        """min(alpha * acked * MSS / cwnd_total, acked * MSS / cwnd_i) (RFC 6356 section 3)."""
        members = self.coupling.active() or [self]
        total = sum(m.window() for m in members)
        return min(self.alpha() * acked * self.mss / total, acked * self.mss / self.cwnd)


@dataclass
class Olia(Coupled):
    """The Opportunistic Linked Increases Algorithm (Khalili et al.)."""
    name: str = "olia"
    acked_total: int = 0          # bytes acknowledged on this subflow so far
    loss_prev: int = 0            # acked_total at the loss before the last
    loss_last: int = 0            # acked_total at the last loss

    def on_ack(self, acked: int, now: float, srtt: float) -> None:
        """Count acknowledged bytes (the inter-loss distance), then grow."""
        self.acked_total += acked
        super().on_ack(acked, now, srtt)

    def _loss_mark(self) -> None:
        if self.acked_total != self.loss_last:
            self.loss_prev, self.loss_last = self.loss_last, self.acked_total

    def on_loss(self, flight: int, now: float) -> None:
        """Halve the window and remember where the loss happened."""
        self._loss_mark()
        super().on_loss(flight, now)

    def on_rto(self, flight: int, now: float) -> None:
        """Back to one segment and remember where the loss happened."""
        self._loss_mark()
        super().on_rto(flight, now)

    def inter_loss(self) -> int:
        """l_r: bytes acknowledged between the last two losses, or since the last one if more."""
        return max(self.acked_total - self.loss_last, self.loss_last - self.loss_prev)

    def alpha(self) -> float:
        """alpha_r: positive on the best paths that do not have the largest window,
        negative on the largest-window paths when such best paths exist, else 0."""
        members = self.coupling.active() or [self]
        n = len(members)
        w_max = max(m.window() for m in members)
        quality = {id(m): m.inter_loss() / (m.rtt * m.rtt) for m in members}
        q_best = max(quality.values())
        # best paths: the largest l_r / rtt_r^2 (a TCP flow's rate grows with sqrt(l)/rtt)
        best = {id(m) for m in members if quality[id(m)] >= q_best * (1 - 1e-9)}
        largest = {id(m) for m in members if m.window() >= w_max}
        best_not_largest = best - largest
        if not best_not_largest:
            return 0.0
        if id(self) in best_not_largest:
            return 1 / (n * len(best_not_largest))
        if id(self) in largest:
            return -1 / (n * len(largest))
        return 0.0

    def increase(self, acked: int) -> float:
        """Per acked segment: (w_r/rtt_r^2) / (sum w_p/rtt_p)^2 + alpha_r / w_r, in segments."""
        members = self.coupling.active() or [self]
        w = self.window() / self.mss
        denom = sum((m.window() / m.mss) / m.rtt for m in members) ** 2
        per_segment = (w / (self.rtt * self.rtt)) / denom + self.alpha() / w
        return per_segment * acked     # (acked / mss) segments, each adding per_segment * mss bytes


CONTROLLERS = {"cubic": Cubic, "reno": NewReno, "lia": Lia, "olia": Olia}


def make_cc(name: str, mss: int, coupling: Coupling | None = None):
    """A congestion controller by name; the coupled ones (lia, olia) join `coupling`
    (one per connection: a fresh one if not given)."""
    if name == "newreno":
        name = "reno"
    cls = CONTROLLERS.get(name)
    if cls is None:
        raise ValueError(f"unknown congestion control {name!r} ({', '.join(CONTROLLERS)})")
    if issubclass(cls, Coupled):
        return cls(mss, coupling=coupling if coupling is not None else Coupling())
    return cls(mss)
