"""Packet schedulers of the user-space stack: which subflow carries the next segment.

One scheduler instance per connection, chosen by name (`SCHEDULERS`, `make_scheduler`):

- `lowrtt`: lowest expected RTT first among subflows with congestion-window room
  (what Linux's default scheduler does);
- `roundrobin`: the subflows with room in turn;
- `redundant`: every segment on every subflow. A subflow that falls behind (less
  cwnd, longer RTT) catches up with copies of what it has not carried yet, skipping
  what the peer already acknowledged at the data level, so the slowest path never
  holds the others back.

All of them share the backup rule: a backup subflow carries data only when no
non-backup subflow works, and a stale subflow (in retransmission timeouts) only
when nothing else does. The connection calls `pick` for each new segment (and for
reinjections and the DATA_FIN), `on_sent` after a new segment went out, and
`catch_up` at the end of each push.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from testbed.stack.connection import Connection
    from testbed.stack.subflow import Subflow


def candidates(conn: "Connection", exclude_stale: bool = False) -> list["Subflow"]:
    """The subflows that may carry data now: fresh non-backup ones, else fresh backups,
    else (unless exclude_stale, as for reinjection) stale ones."""
    usable = [sf for sf in conn.subflows if sf.can_send_data()]
    fresh = [sf for sf in usable if not sf.stale]
    pool = [sf for sf in fresh if not sf.backup] or fresh
    if not pool and not exclude_stale:
        pool = usable
    return pool


def has_room(sf: "Subflow", size: int) -> bool:
    """Whether sf's congestion window (and the peer's rate limit on it, stack/rate_limit.py)
    takes min(size, MSS) more bytes."""
    if sf.inflight + min(size, sf.mss) > sf.cc.cwnd:
        return False
    limiter = getattr(sf, "srl_limiter", None)      # test doubles of a subflow carry none
    return limiter is None or limiter.allows(size, sf.inflight, sf.srtt)


def lowest_rtt(pool: list["Subflow"], size: int, ignore_cwnd: bool = False):
    """The subflow of pool with the lowest expected RTT that has room for size bytes (any, with
    ignore_cwnd), or None."""
    best = None
    for sf in pool:
        if not ignore_cwnd and not has_room(sf, size):
            continue
        rtt = sf.expected_rtt()
        if best is None or rtt < best[0]:
            best = (rtt, sf)
    return best[1] if best else None


class Scheduler:
    """Base: picks by lowest expected RTT; no copies."""
    name = "lowrtt"

    def pick(self, conn: "Connection", size: int, exclude_stale: bool = False, ignore_cwnd: bool = False):
        """The subflow to carry the next `size` bytes, or None to wait."""
        return lowest_rtt(candidates(conn, exclude_stale), size, ignore_cwnd)

    def on_sent(self, conn: "Connection", sf: "Subflow", dsn: int, payload: bytes) -> None:
        """New data [dsn, dsn + len(payload)) went out on sf."""

    def catch_up(self, conn: "Connection") -> None:
        """End of a push: send what this scheduler still owes (copies)."""


class LowestRttScheduler(Scheduler):
    """Lowest-RTT-first among subflows with congestion window room; backups only when nothing else works."""
    name = "lowrtt"


class RoundRobinScheduler(Scheduler):
    """The subflows with congestion-window room in turn."""
    name = "roundrobin"

    def __init__(self) -> None:
        self.last: object | None = None

    def pick(self, conn: "Connection", size: int, exclude_stale: bool = False, ignore_cwnd: bool = False):
        """The subflow after the last one picked that has room (in the connection's subflow order)."""
        pool = candidates(conn, exclude_stale)
        if not pool:
            return None
        start = next((i + 1 for i, sf in enumerate(pool) if sf is self.last), 0)
        for k in range(len(pool)):
            sf = pool[(start + k) % len(pool)]
            if ignore_cwnd or has_room(sf, size):
                self.last = sf
                return sf
        return None


class RedundantScheduler(Scheduler):
    """Every segment on every subflow; a lagging subflow catches up with copies."""
    name = "redundant"

    def __init__(self) -> None:
        # per subflow (by id; pruned to the connection's subflows): the data sequence
        # number up to which it carried the stream
        self.carried: dict[int, int] = {}

    def _sync(self, conn: "Connection") -> None:
        live = {id(sf) for sf in conn.subflows}
        for key in [k for k in self.carried if k not in live]:
            del self.carried[key]

    def _next(self, conn: "Connection", sf: "Subflow") -> int:
        return max(self.carried.get(id(sf), conn.snd_una), conn.snd_una)

    def pick(self, conn: "Connection", size: int, exclude_stale: bool = False, ignore_cwnd: bool = False):
        """New data goes to the lowest-RTT subflow that has carried everything so far and has room."""
        self._sync(conn)
        pool = [sf for sf in candidates(conn, exclude_stale)
                if ignore_cwnd or self._next(conn, sf) >= conn.snd_nxt]
        return lowest_rtt(pool, size, ignore_cwnd)

    def on_sent(self, conn: "Connection", sf: "Subflow", dsn: int, payload: bytes) -> None:
        """Copy the new segment at once onto every other caught-up subflow with room."""
        end = dsn + len(payload)
        self.carried[id(sf)] = max(self.carried.get(id(sf), 0), end)
        for other in candidates(conn, exclude_stale=True):
            if other is sf or self._next(conn, other) != dsn or not has_room(other, len(payload)):
                continue
            other.send_data(dsn, payload)
            self.carried[id(other)] = end

    def catch_up(self, conn: "Connection") -> None:
        """Each subflow behind the stream sends copies of what it has not carried, while cwnd allows."""
        self._sync(conn)
        for sf in candidates(conn, exclude_stale=True):
            start = self._next(conn, sf)
            while start < conn.snd_nxt and has_room(sf, conn.snd_nxt - start):
                n = min(sf.mss, conn.snd_nxt - start)
                sf.send_data(start, conn.unacked_bytes(start, n))
                start += n
            self.carried[id(sf)] = start


SCHEDULERS: dict[str, type[Scheduler]] = {
    s.name: s for s in (LowestRttScheduler, RoundRobinScheduler, RedundantScheduler)}


def make_scheduler(name: str) -> Scheduler:
    """A fresh scheduler (one per connection) by name; ValueError naming the choices otherwise."""
    cls = SCHEDULERS.get(name)
    if cls is None:
        raise ValueError(f"unknown scheduler {name!r} ({', '.join(SCHEDULERS)})")
    return cls()
