"""The user-space MPTCP stack (testbed.stack) behind the socket calls of the workload app.

The app program (app.py) moves its bytes with socket methods (sendall, recv,
recv_into, shutdown, close, settimeout) through the one bulk engine and reads
per-subflow counters every poll. With `--stack user` it gets these objects
instead of kernel sockets: a Stack attached to every IPv4 interface of the
namespace given (the Mininet host's path interfaces; AF_PACKET + an owner nft
table that the kernel removes when this process ends, however it ends), and a
Connection from it. Stack errors become OSErrors with an errno, so the app
reports a failed user-stack connection exactly like a kernel one.
"""
from __future__ import annotations

import errno as errno_mod
import socket
import threading
from typing import Any

from testbed.stack import Connection, Stack, StackError
from testbed.stack.attach import AttachError

LINGER_S = 5.0  # a graceful close waits this long for the peer's DATA_FIN before the stack goes
_HANDSHAKE = {"SYN_SENT", "SYN_RCVD"}


def os_error(exc: StackError | AttachError) -> OSError:
    """The OSError (with errno) that a kernel socket would have raised for a stack error."""
    text = str(exc)
    if "timed out" in text:
        return TimeoutError(errno_mod.ETIMEDOUT, text)
    if "refused" in text:
        return ConnectionRefusedError(errno_mod.ECONNREFUSED, text)
    if "no route" in text:
        return OSError(errno_mod.EHOSTUNREACH, text)
    if isinstance(exc, AttachError):
        return OSError(errno_mod.ENODEV, text)
    return ConnectionResetError(errno_mod.ECONNRESET, text)


class UserSocket:
    """A client or accepted connection of the user-space stack, with the socket methods the app uses."""

    def __init__(self, stack: Stack, *, owns_stack: bool, mptcp: bool = True,
                 paths: list[str] | None = None, backup: list[str] | None = None):
        self.stack, self.owns_stack, self.mptcp = stack, owns_stack, mptcp
        self.paths, self.backup = list(paths or []), list(backup or [])
        self.conn: Connection | None = None
        self.timeout: float | None = None
        self.joins: list[threading.Thread] = []

    # ---- socket methods
    def settimeout(self, timeout: float | None) -> None:
        """Timeout of every blocking call that follows (None: a day)."""
        self.timeout = timeout

    def _t(self) -> float:
        return 86400.0 if self.timeout is None else self.timeout

    def connect(self, dest: tuple[str, int]) -> None:
        """Open the connection over the first path; the other paths join in the
        background once it is established, like the kernel path manager's subflows."""
        try:
            self.conn = self.stack.connect(dest, paths=self.paths[:1] or None, timeout=self._t(),
                                           mptcp=self.mptcp)
        except (StackError, AttachError) as exc:
            raise os_error(exc) from None
        if self.conn.info().fallback:
            return
        for addr in self.paths[1:]:
            t = threading.Thread(target=self._join, args=(addr,), name=f"join-{addr}", daemon=True)
            t.start()
            self.joins.append(t)

    def _join(self, addr: str) -> None:
        try:
            self.conn.add_subflow(addr, backup=addr in self.backup, timeout=min(self._t(), 10.0))
        except StackError as exc:
            self.stack.log(f"join from {addr}: {exc}")  # in the event stream too (sf_closed)

    def sendall(self, data: bytes | memoryview) -> None:
        """Queue all of data; blocks while the send buffer is full."""
        try:
            self.conn.send(data, timeout=self._t())
        except StackError as exc:
            raise os_error(exc) from None

    def recv(self, bufsize: int) -> bytes:
        """Up to bufsize bytes; b"" at the end of the stream."""
        try:
            return self.conn.recv(bufsize, timeout=self._t())
        except StackError as exc:
            raise os_error(exc) from None

    def recv_into(self, buf: bytearray, nbytes: int = 0) -> int:
        """Receive into buf, like socket.recv_into."""
        data = self.recv(nbytes or len(buf))
        buf[:len(data)] = data
        return len(data)

    def shutdown(self, how: int) -> None:
        """SHUT_WR: DATA_FIN after what is queued; SHUT_RDWR: abort (MP_FASTCLOSE)."""
        if self.conn is None:
            return
        if how == socket.SHUT_WR:
            self.conn.close()
        else:
            self.conn.abort()

    def close(self) -> None:
        """Graceful close, then the stack if ours: waits for the peer's DATA_FIN as long
        as the peer keeps acknowledging data, giving up after LINGER_S without progress."""
        if self.conn is not None and self.conn.state != "CLOSED":
            self.conn.close()
            # Like a kernel socket closed with data queued (the kernel keeps sending it):
            # a slow receiver still draining our send buffer is not cut off by a reset.
            acked = self._acked()
            while not self.conn.wait_closed(LINGER_S):
                now = self._acked()
                if now == acked:
                    break
                acked = now
        if self.owns_stack:
            self.stack.close()

    def _acked(self) -> int:
        return sum(sf.bytes_acked for sf in self.conn.info().subflows)

    def getsockname(self) -> tuple[str, int]:
        """The initial subflow's local address."""
        sf = self._initial()
        return sf.local if sf else ("0.0.0.0", 0)

    def getpeername(self) -> tuple[str, int]:
        """The initial subflow's remote address."""
        sf = self._initial()
        return sf.remote if sf else ("0.0.0.0", 0)

    def _initial(self):
        info = self.conn.info()
        every = [*info.closed_subflows, *info.subflows]
        firsts = [s for s in every if not s.join]
        return (firsts or every or [None])[0]

    # ---- what the kernel tells through MPTCP_INFO / MPTCP_FULL_INFO / TCP_INFO
    def outcome(self) -> str:
        """'mptcp', 'fallback_tcp', or 'tcp' for a connection opened as plain TCP."""
        if not self.mptcp:
            return "tcp"
        return "fallback_tcp" if self.conn.info().fallback else "mptcp"

    def token(self) -> int | None:
        """The local MPTCP token (None after fallback), like mptcp_info's."""
        info = self.conn.info()
        return None if info.fallback else info.token

    def congestion_control(self) -> str:
        """The congestion control of the connection's subflows."""
        return self.conn.cc if self.conn is not None else self.stack.cc

    def request_rate_limit(self, local_addr: str, kbps: float) -> int:
        """Ask the peer to send at most kbps kbit/s on our subflows from local_addr (the
        subflow rate limit option); how many subflows it concerns."""
        try:
            return self.conn.request_rate_limit(local_addr, kbps)
        except StackError as exc:
            raise OSError(errno_mod.ENOTCONN, str(exc)) from None

    def subflow_counters(self) -> dict[str, dict[str, Any]]:
        """label -> bytes_acked, bytes_received and addresses of every subflow past its
        handshake (what MPTCP_FULL_INFO lists for a kernel socket)."""
        out = {}
        for i, s in enumerate(self.conn.info().subflows):
            if s.state in _HANDSHAKE:
                continue
            label = f"{s.local[0]}:{s.local[1]}-{s.remote[0]}:{s.remote[1]}"
            out[label] = {"bytes_acked": s.bytes_acked, "bytes_received": s.bytes_received,
                          "srtt_ms": s.srtt_ms,
                          "meta": {"id": i, "local": list(s.local), "remote": list(s.remote)}}
        return out


class UserListener:
    """A listening port of a user-space stack that this object owns."""

    def __init__(self, stack: Stack, port: int):
        self.stack = stack
        self.listener = stack.listen(port)
        self.timeout: float | None = None

    def settimeout(self, timeout: float | None) -> None:
        """Timeout of accept()."""
        self.timeout = timeout

    def accept(self) -> tuple[UserSocket, tuple[str, int]]:
        """The next established connection and its peer's address."""
        try:
            conn = self.listener.accept(timeout=86400.0 if self.timeout is None else self.timeout)
        except StackError as exc:
            raise os_error(exc) from None
        sock = UserSocket(self.stack, owns_stack=False, mptcp=True)
        sock.conn = conn
        return sock, sock.getpeername()

    def close(self) -> None:
        """Stop listening and remove the stack (its sockets and nft table)."""
        self.listener.close()
        self.stack.close()


def open_stack(netns: str, cc: str, checksum: bool = False, scheduler: str = "lowrtt") -> Stack:
    """A stack attached to every IPv4 interface of the namespace file netns; OSError if it cannot."""
    try:
        return Stack(netns=netns, cc=cc, checksum=checksum, scheduler=scheduler)
    except (StackError, AttachError) as exc:
        raise os_error(exc) from None


__all__ = ["UserSocket", "UserListener", "open_stack", "os_error", "LINGER_S"]
