"""Where RobE's connection attempts live: kernel sockets or the user-space stack.

The strategies (strategies.py) and the attempt bookkeeping (attempts.py) exist
once; they drive attempts only through a Backend:

- KernelBackend: non-blocking kernel sockets (IPPROTO_MPTCP or TCP) bound to
  the path, completion seen by poll() on writability, aborted with SO_LINGER 0;
  joins through the kernel path manager (join.Joiner).
- UserStackBackend: connections of a testbed.stack Stack attached in the
  client's namespace, started with Stack.start_connect (the SYN leaves, nothing
  blocks), completion seen through the stack's `established`/`closed` events,
  aborted with Connection.abort() (RST + MP_FASTCLOSE once synchronized);
  joins with Connection.add_subflow (UserJoiner).

What a backend hands back as the won "socket" is its own connection object: a
kernel socket, or a stack Connection (callers that need socket methods wrap it,
e.g. the harness's UserSocket).
"""
from __future__ import annotations

import abc
import errno
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from testbed.mptcp import sockopt
from testbed.robe import report as R
from testbed.robe import sockets as S
from testbed.robe.join import Joiner, learn_join
from testbed.robe.sockets import LocalPath
from testbed.stack import Connection, Stack, StackError, esim

if TYPE_CHECKING:
    from testbed.robe.history import History


class Backend(abc.ABC):
    """How attempts are opened, awaited, aborted and joined (one per establishment)."""
    name: str
    resets_from_syn_sent: bool = False  # aborting an MPTCP attempt before its SYN/ACK sends a RST
    supports_esim: bool = False         # can ask for RobE_eSIM and keep losing attempts

    @abc.abstractmethod
    def prepare(self, path: LocalPath | None, mptcp: bool, cc: str | None, bind_device: bool,
                esim: bool = False) -> Any:
        """An attempt ready to fire from path (None: routing picks the source); OSError when it cannot.
        esim: its SYN asks for RobE_eSIM (backends with supports_esim only)."""

    def esim_agreed(self, handle: Any) -> bool:
        """The server echoed ROBE_eSIM_EN on this completed attempt."""
        return False

    def keep(self, handle: Any, winner: Any) -> bool:
        """RobE_eSIM: leave a losing attempt pending so its handshake ends as a subflow of
        winner; False when it cannot (already synchronized, or no eSIM): abort it instead."""
        return False

    @abc.abstractmethod
    def fire(self, handle: Any, dest: tuple[str, int]) -> None:
        """The SYN leaves now; OSError (with errno) on a local failure."""

    @abc.abstractmethod
    def wait(self, handles: list[Any], timeout_s: float) -> list[tuple[Any, int]]:
        """Up to timeout_s for some of handles to end their handshake: (handle, 0 or errno) each."""

    @abc.abstractmethod
    def abort(self, handle: Any) -> bool:
        """Abort an attempt; True when it was synchronized (a RST went on the wire)."""

    @abc.abstractmethod
    def discard(self, handle: Any) -> None:
        """Drop a prepared attempt that never fired (nothing on the wire)."""

    @abc.abstractmethod
    def claim(self, handle: Any) -> Any:
        """The won attempt as the caller's connection object (blocking I/O from now on)."""

    @abc.abstractmethod
    def token(self, conn: Any) -> int | None:
        """The local MPTCP token of a won connection; None for plain TCP or fallback."""

    @abc.abstractmethod
    def is_fallback(self, conn: Any) -> bool:
        """True when a won MPTCP connection fell back to plain TCP."""

    @abc.abstractmethod
    def joiner(self, mode: str, report: R.Report, timeout_s: float, history: History | None) -> Any:
        """What adds the other paths after the win (prepare / start / close like join.Joiner)."""


class KernelBackend(Backend):
    """Attempts are kernel sockets (the kernel's MPTCP or TCP)."""
    name = "kernel"
    resets_from_syn_sent = True

    def prepare(self, path: LocalPath | None, mptcp: bool, cc: str | None, bind_device: bool,
                esim: bool = False) -> Any:
        """A bound non-blocking socket (the slow part: ~0.1-0.3 ms here)."""
        if esim:
            raise OSError(errno.EOPNOTSUPP, "kernel MPTCP cannot ask for RobE_eSIM")
        return S.new_socket(path, mptcp=mptcp, cc=cc, bind_device=bind_device)

    def fire(self, handle: socket.socket, dest: tuple[str, int]) -> None:
        """connect() without waiting."""
        try:
            S.start_connect(handle, dest)
        except OSError:
            handle.close()
            raise

    def wait(self, handles: list[socket.socket], timeout_s: float) -> list[tuple[Any, int]]:
        """poll() for writability (a failed connect shows as POLLERR)."""
        import select
        # poll(), not select(): the caller may hold descriptors above select()'s limit of 1024.
        poller = select.poll()
        by_fd = {}
        for h in handles:
            poller.register(h, select.POLLOUT)
            by_fd[h.fileno()] = h
        ready = poller.poll(int(timeout_s * 1000))
        return [(by_fd[fd], S.connect_result(by_fd[fd])) for fd, _ in ready]

    def abort(self, handle: socket.socket) -> bool:
        """SO_LINGER {1, 0} close."""
        return S.abort(handle)

    def discard(self, handle: socket.socket) -> None:
        """Close the never-connected socket."""
        handle.close()

    def claim(self, handle: socket.socket) -> socket.socket:
        """The socket, blocking."""
        handle.setblocking(True)
        return handle

    def token(self, conn: socket.socket) -> int | None:
        """MPTCP_INFO's token."""
        return S.mptcp_token(conn)

    def is_fallback(self, conn: socket.socket) -> bool:
        """MPTCP_INFO's fallback flag."""
        return sockopt.is_fallback(conn)

    def joiner(self, mode: str, report: R.Report, timeout_s: float, history: History | None) -> Joiner:
        """The kernel path manager's joins (userspace PM or in-kernel endpoints)."""
        return Joiner(mode, report, timeout_s, history)


class _UserAttempt:
    """A user-stack attempt before and after its SYN."""

    def __init__(self, path: LocalPath | None, mptcp: bool, esim: bool):
        self.path, self.mptcp, self.esim = path, mptcp, esim
        self.conn: Connection | None = None


class UserStackBackend(Backend):
    """Attempts are connections of a user-space stack attached in the client's namespace.

    The stack is the caller's (one per client namespace; it may serve many
    establishments). Its event queue is read here: nobody else should consume
    the same stack's events while an establishment runs."""
    name = "user"
    supports_esim = True

    def __init__(self, stack: Stack):
        self.stack = stack
        self._ended: dict[int, int] = {}   # token -> 0 (established) or errno, seen but not yet asked for

    def prepare(self, path: LocalPath | None, mptcp: bool, cc: str | None, bind_device: bool,
                esim: bool = False) -> Any:
        """Nothing to create before the SYN; an address the stack is not attached to fails now."""
        if path is not None and path.local_addr not in self.stack.by_addr:
            raise OSError(errno.EADDRNOTAVAIL, f"{path.local_addr} is not an address of the stack")
        return _UserAttempt(path, mptcp, esim)

    def esim_agreed(self, handle: _UserAttempt) -> bool:
        """The SYN/ACK echoed ROBE_eSIM_EN."""
        return handle.conn is not None and esim.agreed(handle.conn)

    def keep(self, handle: _UserAttempt, winner: _UserAttempt) -> bool:
        """Point a still pending attempt at the winner (under the stack's lock: its SYN/ACK may be arriving)."""
        with self.stack.lock:
            if handle.conn is None or handle.conn.state != "SYN_SENT" or handle.conn.error:
                return False
            handle.conn.esim_winner = winner.conn
            return True

    def fire(self, handle: _UserAttempt, dest: tuple[str, int]) -> None:
        """Stack.start_connect from the attempt's path."""
        try:
            # Options.cc names a kernel congestion control: the stack's own is chosen with the Stack.
            handle.conn = self.stack.start_connect(
                dest, handle.path.local_addr if handle.path else None, mptcp=handle.mptcp, esim=handle.esim)
        except StackError as exc:
            raise OSError(errno.EHOSTUNREACH if "route" in str(exc) else errno.EINVAL, str(exc)) from None

    def _outcome(self, conn: Connection) -> int | None:
        ended = self._ended.pop(conn.local_token, None)
        if ended is not None:
            return ended
        state, error = conn.state, conn.error
        if state == "ESTABLISHED":
            return 0
        if state == "CLOSED" or error:
            return errno.ECONNREFUSED if error and "refused" in error else errno.ECONNRESET
        return None

    def wait(self, handles: list[_UserAttempt], timeout_s: float) -> list[tuple[Any, int]]:
        """The stack's events until one of handles is established or closed."""
        by_token = {h.conn.local_token: h for h in handles if h.conn is not None}
        deadline = time.monotonic() + timeout_s
        while True:
            done = [(h, r) for h in by_token.values() if (r := self._outcome(h.conn)) is not None]
            if done:
                return done
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            ev = self.stack.next_event(left)
            if ev is None:
                return []
            if ev.kind in ("established", "closed") and ev.token in by_token:
                self._ended[ev.token] = 0 if ev.kind == "established" else (
                    errno.ECONNREFUSED if ev.reason and "refused" in ev.reason else errno.ECONNRESET)

    def abort(self, handle: _UserAttempt) -> bool:
        """Connection.abort(): RST + MP_FASTCLOSE on a synchronized subflow, nothing from SYN_SENT."""
        if handle.conn is None:
            return False
        synchronized = handle.conn.state == "ESTABLISHED"
        handle.conn.abort()
        self._ended.pop(handle.conn.local_token, None)
        return synchronized

    def discard(self, handle: _UserAttempt) -> None:
        """Nothing was created."""

    def claim(self, handle: _UserAttempt) -> Connection:
        """The stack Connection."""
        return handle.conn

    def token(self, conn: Connection) -> int | None:
        """The connection's local token; None when it is plain TCP."""
        info = conn.info()
        return None if info.fallback else info.token

    def is_fallback(self, conn: Connection) -> bool:
        """The connection fell back (or never was MPTCP)."""
        return conn.info().fallback

    def joiner(self, mode: str, report: R.Report, timeout_s: float, history: History | None) -> "UserJoiner":
        """Joins by the stack itself (mode none: no joins)."""
        return UserJoiner(mode, report, timeout_s, history)


class UserJoiner:
    """The other paths as MP_JOIN subflows of a user-stack connection, in the background,
    right after the win (the stack knows the peer's key from the SYN/ACK)."""

    def __init__(self, mode: str, report: R.Report, timeout_s: float, history: History | None):
        self.enabled = mode != "none"
        self.report, self.timeout_s, self.history = report, timeout_s, history
        self.conn: Connection | None = None

    def prepare(self, paths: list[LocalPath]) -> None:
        """Nothing to set up before the first SYN."""

    def use(self, conn: Connection) -> None:
        """The won connection the joins belong to."""
        self.conn = conn

    def start(self, token: int | None, dest: tuple[str, int], all_paths: list[LocalPath],
              winner: LocalPath | None) -> threading.Thread | None:
        """Join every path but the winner's, in the background."""
        others = [p for p in all_paths if winner is None or p.name != winner.name]
        if not self.enabled or token is None or not others or self.conn is None:
            return None
        self.report.joins_pending()
        t = threading.Thread(target=self._run, args=(others,), name="robe-user-join", daemon=True)
        t.start()
        return t

    def _run(self, others: list[LocalPath]) -> None:
        threads = [threading.Thread(target=self._join, args=(p,), daemon=True) for p in others]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(self.timeout_s + 1)
        finally:
            self.report.joins_finished()

    def _join(self, path: LocalPath) -> None:
        t0 = time.monotonic_ns()
        self.report.add(R.JOIN_STARTED, path.name, t_ns=t0, via="user-stack")
        try:
            self.conn.add_subflow(path.local_addr, timeout=self.timeout_s)
        except StackError as exc:
            self.report.add(R.JOIN_FAILED, path.name, reason=str(exc))
            return
        t = time.monotonic_ns()
        self.report.add(R.JOIN_ESTABLISHED, path.name, t_ns=t)
        learn_join(self.history, path.name, (t - t0) / 1e9)

    def watch_esim(self, kept: list[tuple[LocalPath, Any]], abort: Any) -> None:
        """RobE_eSIM: each kept losing attempt should end as a subflow of the won connection:
        record when (the server's ACK of MP_JOIN_CAP), or abort it (`abort(handle)`) and join
        its path with MP_JOIN when it completed as a connection of its own after all."""
        if not kept or self.conn is None:
            return
        self.report.joins_pending()
        threading.Thread(target=self._watch, args=(kept, abort), name="robe-esim", daemon=True).start()

    def _watch(self, kept: list[tuple[LocalPath, Any]], abort: Any) -> None:
        winner = self.conn
        deadline = time.monotonic() + self.timeout_s
        pending = {p.name: (p, h) for p, h in kept}
        try:
            with winner.cond:
                while pending:
                    for name, (path, h) in list(pending.items()):
                        sf = next((f for f in winner.subflows if f.laddr == path.local_addr
                                   and getattr(f, "esim_join_cap_sent", None) is not None), None)
                        if sf is not None and sf.fully_established:
                            del pending[name]
                            sent_s = (sf.esim_join_cap_sent * 1e9 - self.report.t0_ns) / 1e9
                            self.report.add(R.JOIN_ESTABLISHED, name, via="esim",
                                            join_cap_sent_s=round(sent_s, 6))
                        elif sf is None and h.conn.state == "ESTABLISHED":
                            del pending[name]   # completed on its own: no eSIM after all
                            winner.cond.release()
                            try:
                                abort(h)
                                self._join(path)
                            finally:
                                winner.cond.acquire()
                        elif sf is None and h.conn.state == "CLOSED" and h.conn.error:
                            del pending[name]
                            self.report.add(R.JOIN_FAILED, name, reason=h.conn.error)
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    winner.cond.wait(min(left, 0.001))
            for name, (_, h) in pending.items():
                self.report.add(R.JOIN_FAILED, name, reason=f"no eSIM subflow within {self.timeout_s:g} s")
                abort(h)   # a SYN/ACK after this would make a connection nobody uses
        finally:
            self.report.joins_finished()

    def close(self) -> None:
        """Nothing held."""
