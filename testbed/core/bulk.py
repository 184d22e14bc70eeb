"""The one bulk-transfer engine: send and receive loops, and a timed flow
between two namespaces.

- `send_stream` / `receive_stream`: the data loops every bulk sender and
  receiver uses (this module's flows, and the workload app's client/server).
- `run_flow`: one MPTCP (or TCP) connection from a socket in one namespace to
  a listener in another, driven by two threads of this process; at given
  moments it reads what was delivered (receiver bytes, and the sender's
  tcpi_bytes_acked for TCP) so a caller measures goodput over any window.
- `bulk_transfer`: client -> server over a Testbed, for the demo and the
  functional tests (aggregate and per-path goodput, extra subflows).
Link calibration measures each path's rate with `run_flow` too.
"""
from __future__ import annotations

import math
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from testbed.base.errors import TestbedError
from testbed.base.netns import run_in_netns
from testbed.mptcp import sockopt

CHUNK = 64 * 1024
_FILLER = memoryview(b"\x5a" * CHUNK)


def filler(n: int) -> memoryview:
    """n bytes of constant payload (a view, no copy): for senders whose content does not matter."""
    return _FILLER[:n]


def send_stream(sock: socket.socket, source: Callable[[int], bytes | memoryview], *,
                nbytes: int | None = None, until: float | None = None,
                stop: threading.Event | None = None,
                on_sent: Callable[[bytes | memoryview], None] | None = None) -> int:
    """Send chunks from source(n) until nbytes are sent, time.monotonic()
    reaches `until` or `stop` is set (whichever comes first; with none of them,
    until an error). Returns the bytes sent; socket errors propagate."""
    sent = 0
    while ((nbytes is None or sent < nbytes) and (until is None or time.monotonic() < until)
           and (stop is None or not stop.is_set())):
        data = source(CHUNK if nbytes is None else min(CHUNK, nbytes - sent))
        sock.sendall(data)
        if on_sent is not None:
            on_sent(data)
        sent += len(data)
    return sent


def receive_stream(sock: socket.socket, on_data: Callable[[memoryview], None] | None = None,
                   limit: int | None = None, bufsize: int = CHUNK) -> int:
    """Receive until the peer closes (or `limit` bytes arrived); on_data sees
    every piece. Returns the bytes received; socket errors propagate."""
    buf = bytearray(bufsize)
    view = memoryview(buf)
    total = 0
    while limit is None or total < limit:
        n = sock.recv_into(buf, bufsize if limit is None else min(bufsize, limit - total))
        if n == 0:
            break
        total += n
        if on_data is not None:
            on_data(view[:n])
    return total


@dataclass
class Mark:
    """What had been delivered at one moment of a flow."""

    t: float                   # time.monotonic()
    received: int              # bytes the receiving application had read
    acked: int | None          # sender's tcpi_bytes_acked (TCP only, read in CA_Open)
    extra: Any = None          # what the caller's on_mark() returned


@dataclass
class Flow:
    """The outcome of run_flow: marks, totals, and the error that ended it early."""

    marks: list[Mark]
    received: int
    seconds: float
    subflows: int = 0          # extra MPTCP subflows at the last mark (0: only the initial one)
    error: str | None = None

    def goodput_mbit(self, a: int = 0, b: int = -1) -> float:
        """Goodput between marks a and b: from the sender's acked bytes where both
        marks have them, else from the receiver's byte count; NaN without a window."""
        if len(self.marks) < 2:
            return math.nan
        ma, mb = self.marks[a], self.marks[b]
        if mb.t <= ma.t:
            return math.nan
        if ma.acked is not None and mb.acked is not None:
            return (mb.acked - ma.acked) * 8 / (mb.t - ma.t) / 1e6
        return (mb.received - ma.received) * 8 / (mb.t - ma.t) / 1e6

    @property
    def source(self) -> str:
        """Which counter goodput_mbit() uses."""
        both = len(self.marks) >= 2 and self.marks[0].acked is not None and self.marks[-1].acked is not None
        return "tcpi_bytes_acked" if both else "app"


def _acked_when_open(sock: socket.socket, patience: float) -> tuple[float, int | None]:
    """(time, tcpi_bytes_acked) at the first moment within `patience` s the sender
    is in TCP_CA_Open (no SACKed holes); bytes None for MPTCP sockets or on errors.
    Read from the sender's kernel, goodput does not depend on when the receiving
    thread got the CPU, nor on a loss recovery releasing a window of
    out-of-order data at once (both made short windows read up to 6 % high)."""
    if not isinstance(sock, socket.socket) or sock.proto == sockopt.IPPROTO_MPTCP:
        return time.monotonic(), None
    end = time.monotonic() + patience
    while True:
        try:
            info = sockopt.tcp_info(sock)
        except OSError:
            return time.monotonic(), None
        now = time.monotonic()
        if info.bytes_acked is None or info.ca_state == 0 or now >= end:
            return now, info.bytes_acked
        time.sleep(0.0005)


def run_flow(src_pid: int, dst_pid: int, dst_addr: str, port: int, marks_s: list[float], *,
             src_addr: str | None = None, listen_addr: str | None = None,
             protocol: str = "mptcp", cc: str = "cubic", stop_s: float | None = None,
             on_mark: Callable[[], Any] | None = None, acked_patience_s: float = 0.5,
             connect_timeout_s: float = 10.0, make_socket: Callable[[], Any] | None = None) -> Flow:
    """Send from src_pid's namespace to a listener in dst_pid's for max(marks_s,
    stop_s) seconds after connecting; read what was delivered at each offset
    of marks_s (and call on_mark() there). A failed connect raises TestbedError;
    an error during the transfer ends it and is reported in Flow.error.
    make_socket: an unconnected socket-like sender to use instead of a kernel
    socket (the user-space stack's: connect, settimeout, sendall, shutdown, close,
    extra_subflows); its goodput comes from the receiver's count."""
    listen = listen_addr if listen_addr is not None else dst_addr
    lsock = run_in_netns(dst_pid, lambda: sockopt.listener(port, listen, protocol, cc, 1))

    def sender() -> socket.socket:
        s = sockopt.mptcp_socket(cc, protocol)
        if src_addr:
            s.bind((src_addr, 0))
        return s

    try:
        ssock = make_socket() if make_socket is not None else run_in_netns(src_pid, sender)
    except BaseException:
        lsock.close()
        raise
    received = [0]
    errors: list[str] = []
    stop = threading.Event()

    def count(data: memoryview) -> None:
        received[0] += len(data)

    def receive() -> None:
        lsock.settimeout(connect_timeout_s + 5)
        try:
            conn, _ = lsock.accept()
        except OSError as exc:
            errors.append(f"accept: {exc}")
            return
        conn.settimeout(2)
        try:
            receive_stream(conn, count, bufsize=1 << 20)
        except OSError:
            pass  # the sender's shutdown or a stall: what arrived is counted
        finally:
            conn.close()

    def send() -> None:
        try:
            send_stream(ssock, filler, stop=stop)
        except OSError as exc:
            if not stop.is_set():
                errors.append(f"send: {exc}")

    rx = threading.Thread(target=receive, daemon=True)
    rx.start()
    ssock.settimeout(connect_timeout_s)
    try:
        ssock.connect((dst_addr, port))
    except OSError as exc:
        ssock.close()
        lsock.close()
        rx.join(1)
        raise TestbedError(f"bulk flow: connect to {dst_addr}:{port} failed: {exc}") from None
    t0 = time.monotonic()
    tx = threading.Thread(target=send, daemon=True)
    tx.start()
    taken: list[Mark] = []
    subflows = 0
    try:
        for offset in marks_s:
            time.sleep(max(0.0, t0 + offset - time.monotonic()))
            t, acked = _acked_when_open(ssock, acked_patience_s)
            taken.append(Mark(t, received[0], acked, on_mark() if on_mark else None))
        if protocol == "mptcp":
            subflows = _extra_subflows(ssock)
        end = t0 + max([stop_s or 0.0, *marks_s])
        time.sleep(max(0.0, end - time.monotonic()))
    finally:
        stop.set()
        try:
            ssock.shutdown(socket.SHUT_RDWR)  # wakes a sender blocked on a full buffer
        except OSError:
            pass
        tx.join(15)
        ssock.close()
        rx.join(15)
        lsock.close()
    return Flow(taken, received[0], time.monotonic() - t0, subflows,
                "; ".join(errors) or None)


def _extra_subflows(sock: Any) -> int:
    if not isinstance(sock, socket.socket):
        return sock.extra_subflows()
    try:
        return sockopt.mptcp_info(sock).subflows  # additional subflows beyond the initial one
    except OSError:
        return 0  # fell back to TCP


@dataclass
class BulkResult:
    """Goodput of one client -> server bulk transfer over a Testbed."""

    goodput_mbit: float
    seconds: float
    bytes: int
    path_goodput_mbit: dict[str, float] = field(default_factory=dict)
    subflows: int = 0  # extra subflows reported by MPTCP_INFO (0 = only the initial one)
    protocol: str = "mptcp"


def bulk_transfer(tb: Any, seconds: float = 6.0, warmup: float = 2.0, protocol: str = "mptcp",
                  cc: str = "cubic", port: int = 5201) -> BulkResult:
    """Client sends to server for `seconds`; goodput over [warmup, seconds]
    from the receiver's byte count, per path from the client's interface counters."""
    if seconds <= warmup:
        raise TestbedError(f"bulk transfer: seconds ({seconds}) must exceed warmup ({warmup})")
    # Wildcard bind: a join to an address the server announced (ADD_ADDR) is
    # matched against a listener on that address, not the initial one.
    flow = run_flow(tb.client.pid, tb.server.pid, tb.server_addr, port, [warmup, seconds],
                    listen_addr="0.0.0.0", protocol=protocol, cc=cc, on_mark=tb.interface_bytes,
                    acked_patience_s=0)
    if len(flow.marks) < 2:
        raise TestbedError(f"bulk transfer: {flow.error or 'ended before its window'}")
    a, b = flow.marks
    window = b.t - a.t
    per_path = {name: (b.extra[name]["tx_bytes"] - a.extra[name]["tx_bytes"]) * 8 / window / 1e6
                for name in a.extra}
    return BulkResult(goodput_mbit=(b.received - a.received) * 8 / window / 1e6,
                      seconds=flow.seconds, bytes=flow.received, path_goodput_mbit=per_path,
                      subflows=flow.subflows, protocol=protocol)


@dataclass(frozen=True)
class Sender:
    """One of several competing flows: who sends, how, to which server port."""

    name: str
    src_pid: int
    port: int
    protocol: str = "tcp"
    cc: str = "cubic"
    make_socket: Callable[[], Any] | None = None   # run_flow's: a socket-like sender instead of a kernel socket


def run_flows(senders: list[Sender], dst_pid: int, dst_addr: str, marks_s: list[float],
              **kw: Any) -> dict[str, Flow]:
    """run_flow for every sender at once (one thread each): flows that compete
    for the same links. Raises TestbedError naming each flow that could not
    connect, after all have ended."""
    flows: dict[str, Flow] = {}
    failed: dict[str, str] = {}

    def one(s: Sender) -> None:
        try:
            flows[s.name] = run_flow(s.src_pid, dst_pid, dst_addr, s.port, marks_s,
                                     listen_addr="0.0.0.0", protocol=s.protocol, cc=s.cc,
                                     make_socket=s.make_socket, **kw)
        except Exception as exc:  # noqa: BLE001 - reported below with the flow's name
            failed[s.name] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__

    threads = [threading.Thread(target=one, args=(s,), daemon=True) for s in senders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise TestbedError("competing flows failed: " + "; ".join(f"{n}: {e}" for n, e in failed.items()))
    return {s.name: flows[s.name] for s in senders}
