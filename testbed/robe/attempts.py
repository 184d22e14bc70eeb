"""Concurrent connection attempts, one per path, driven from userspace.

Each attempt is a connection started on its path through a Backend
(backends.py: a non-blocking kernel socket whose connect() was issued, or a
user-space stack connection whose SYN left); the backend tells when its
handshake completed (SYN/ACK arrived) or failed. Strategies only decide *when*
to start and abort attempts; this class does it and records every step in the
Report, the same way for every backend.
"""
from __future__ import annotations

import errno as errno_mod
import time
from dataclasses import dataclass, field
from typing import Any

from testbed.robe import report as R
from testbed.robe.backends import Backend, KernelBackend
from testbed.robe.sockets import LocalPath


@dataclass
class Attempt:
    """One connection attempt: its path, the backend's handle and when it started."""
    path: LocalPath
    sock: Any                  # the backend's handle: a kernel socket or a user-stack attempt
    started_ns: int
    completed_ns: int | None = None
    error: int | None = None


@dataclass
class AttemptSet:
    """The attempts of one establishment: started, completed and aborted together."""
    dest: tuple[str, int]
    report: R.Report
    mptcp: bool = True
    cc: str | None = None
    bind_device: bool = True
    bind: bool = True  # False: let routing pick the source (plain "default route")
    backend: Backend = field(default_factory=KernelBackend)
    esim: bool = False  # the SYNs ask for RobE_eSIM
    active: list[Attempt] = field(default_factory=list)
    kept: list[Attempt] = field(default_factory=list)  # eSIM: losers left to join the winner
    done: list[Attempt] = field(default_factory=list)  # completed, not yet claimed

    def prepare(self, path: LocalPath) -> tuple[LocalPath, Any]:
        """Create and bind the attempt (the slow part for a kernel socket: ~0.1-0.3 ms here)."""
        return path, self.backend.prepare(path if self.bind else None, mptcp=self.mptcp, cc=self.cc,
                                          bind_device=self.bind_device, esim=self.esim)

    def discard(self, prepared: tuple[LocalPath, Any]) -> None:
        """Drop a prepared attempt that never fired (nothing on the wire)."""
        self.backend.discard(prepared[1])

    def fire(self, prepared: tuple[LocalPath, Any]) -> Attempt:
        """connect(): the SYN leaves now."""
        path, sock = prepared
        t = time.monotonic_ns()
        try:
            self.backend.fire(sock, self.dest)
        except OSError as exc:
            self.report.add(R.ATTEMPT_STARTED, path.name, t_ns=t, mptcp=self.mptcp)
            self.report.add(R.CONNECT_FAILED, path.name, errno=exc.errno, reason=exc.strerror)
            raise
        att = Attempt(path, sock, t)
        self.active.append(att)
        self.report.add(R.ATTEMPT_STARTED, path.name, t_ns=t, mptcp=self.mptcp)
        return att

    def start(self, path: LocalPath) -> Attempt:
        """Start an attempt on path now."""
        return self.fire(self.prepare(path))

    def try_start(self, path: LocalPath) -> Attempt | None:
        """start() that records a local failure (no route, bad address) and
        returns None instead of raising: the other paths may still work."""
        try:
            return self.start(path)
        except OSError as exc:
            self._local_failure(path, exc)
            return None

    def try_start_all(self, paths: list[LocalPath]) -> list[Attempt]:
        """All sockets first, then the connects back to back, so the SYNs
        leave within microseconds of each other."""
        prepared = []
        for path in paths:
            try:
                prepared.append(self.prepare(path))
            except OSError as exc:
                self._local_failure(path, exc)
        out = []
        for item in prepared:
            try:
                out.append(self.fire(item))
            except OSError:
                pass  # recorded by fire()
        return out

    def _local_failure(self, path: LocalPath, exc: OSError) -> None:
        if not self.report.find(R.CONNECT_FAILED, path.name):
            self.report.add(R.CONNECT_FAILED, path.name, errno=exc.errno,
                            reason=f"local: {exc.strerror or exc}")

    def poll(self, timeout_s: float) -> Attempt | None:
        """Wait up to timeout_s for the next completed handshake; failed
        attempts are recorded and dropped on the way."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            if self.done:
                return self.done.pop(0)
            if not self.active:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            # Sleep until ~2 ms before the deadline (poll()'s timeout has
            # 1 ms steps), then busy-poll: timer wake-ups overshoot by up to
            # ~2 ms here, and RobE_TIMER's next SYN should leave on time.
            ended = self.backend.wait([a.sock for a in self.active], left - 0.002 if left > 0.003 else 0)
            t = time.monotonic_ns()  # one stamp for all attempts of this wake-up
            result = {id(h): err for h, err in ended}
            for att in [a for a in self.active if id(a.sock) in result]:
                self.active.remove(att)
                err = result[id(att.sock)]
                if err == 0:
                    att.completed_ns = t
                    self.report.add(R.CONNECT_COMPLETED, att.path.name, t_ns=t,
                                    handshake_ms=round((t - att.started_ns) / 1e6, 3))
                    self.done.append(att)
                else:
                    att.error = err
                    self.report.add(R.CONNECT_FAILED, att.path.name, t_ns=t, errno=err,
                                    reason=errno_mod.errorcode.get(err, str(err)))
                    self.backend.abort(att.sock)

    def abort(self, att: Attempt, reason: str) -> None:
        """Abort one attempt (RST when established) and record why."""
        if att in self.active:
            self.active.remove(att)
        if att in self.done:
            self.done.remove(att)
        on_wire = self.backend.abort(att.sock)
        # A kernel MPTCP socket resets even from SYN_SENT (MP_FASTCLOSE + RST,
        # seen on the wire on 6.18); plain TCP and the user stack send nothing then.
        self.report.add(R.RST_SENT, att.path.name, reason=reason, established=on_wire,
                        on_wire=on_wire or (self.mptcp and self.backend.resets_from_syn_sent))

    def abort_all(self, reason: str) -> None:
        """Abort every attempt still held."""
        for att in list(self.active) + list(self.done):
            self.abort(att, reason)

    def claim(self, winner: Attempt, keep_losers: bool = False) -> Any:
        """The winner leaves the set; everything else is reset right away
        (break-before-make, draft section RobE_SIM) - or, with keep_losers
        (RobE_eSIM), left pending where the backend can make it a subflow of the winner."""
        self.report.add(R.WINNER_CHOSEN, winner.path.name)
        self.report.winner = winner.path.name
        for att in list(self.active) + list(self.done):
            if keep_losers and self.backend.keep(att.sock, winner.sock):
                self.active = [a for a in self.active if a is not att]
                self.done = [a for a in self.done if a is not att]
                self.kept.append(att)
                self.report.add(R.KEPT_FOR_ESIM, att.path.name)
                continue
            self.abort(att, "lost the race")
        return self.backend.claim(winner.sock)
