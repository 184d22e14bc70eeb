"""Our own MPTCP (or TCP) client/server, for what iperf3 cannot tell us.

    python -m testbed.harness.workload.app server --bind 10.100.0.2 --port 5000 --out s.json
    python -m testbed.harness.workload.app client --server 10.100.0.2 --port 5000 --out c.json \
        --mode bulk --direction down --bytes 10000000

One connection per server run. The client opens with a fixed-size JSON header
(mode, sizes, seed) so the server needs no workload arguments; the header is not
part of the measured stream. Payload is pseudo-random from the seed; both ends
hash what they send and receive (sha256), so the workload can prove integrity.

Every timestamp is time.monotonic_ns(): one clock for all namespaces. A sampler
thread records, every --poll-ms, the app's byte counters and the per-subflow
state (MPTCP_FULL_INFO; TCP_INFO of the one socket for TCP or after fallback):
delivered bytes per interval, each subflow first seen / gone, per-subflow bytes.
Results go to --out as JSON; the process exits 0 even when the connection
failed (the outcome says so), non-zero only on bad arguments or crashes.

`--stack user --netns FILE` runs the role on the user-space MPTCP stack
(testbed.stack, through user_socket.py) attached to every interface of that
namespace instead of on kernel sockets; the client opens its first subflow from
the first of `--paths` and joins from the others (`--backup`: as backup).
"""
from __future__ import annotations

import argparse
import errno as errno_mod
import hashlib
import json
import os
import random
import socket
import sys
import threading
import time
from typing import Any

from testbed.core.bulk import CHUNK, receive_stream, send_stream
from testbed.harness.workload import user_socket
from testbed.mptcp import sockopt as so
from testbed.stack import StackError

HEADER_LEN = 512
BLOCK_LEN = 1_048_573  # payload period: prime, so chunk boundaries never line up


class Payload:
    """An endless pseudo-random byte stream from a seed (a long repeating block)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.block = random.Random(seed).randbytes(BLOCK_LEN) * 2
        self.pos = 0

    def take(self, n: int) -> bytes:
        """The next n bytes of the stream."""
        n = min(n, BLOCK_LEN)
        out = self.block[self.pos:self.pos + n]
        self.pos = (self.pos + n) % BLOCK_LEN
        return out


class Conn:
    """A connected socket with counters, hashes and a sampler thread."""

    def __init__(self, sock: socket.socket, poll_s: float, payload: Payload):
        self.sock, self.poll_s = sock, poll_s
        self.tx = self.rx = 0
        self.tx_hash, self.rx_hash = hashlib.sha256(), hashlib.sha256()
        self.payload = payload
        self.first_rx_ns: int | None = None
        self.last_rx_ns: int | None = None
        self.samples: list[tuple[int, int, int]] = []  # (t_ns, rx, tx) cumulative
        self.sf_samples: list[tuple[int, str, int, int]] = []  # t, label, acked, received
        self.srtt_samples: list[tuple[int, str, float]] = []  # t, label, smoothed RTT in ms
        self.subflows: dict[str, dict[str, Any]] = {}
        self.token: int | None = None
        self._stop = threading.Event()
        self.sample()  # the initial subflow is "seen" when the connection is
        self._thread = threading.Thread(target=self._sample_loop, daemon=True)
        self._thread.start()

    # data path: the testbed's one bulk engine moves the bytes, we count and hash them
    def send(self, n: int | None = None, until: float | None = None) -> None:
        """Send n payload bytes, or payload until time.monotonic() reaches `until`."""
        send_stream(self.sock, self.payload.take, nbytes=n, until=until, on_sent=self._sent)

    def _sent(self, data: bytes | memoryview) -> None:
        self.tx_hash.update(data)
        self.tx += len(data)

    def _received(self, data: memoryview) -> None:
        now = time.monotonic_ns()
        self.first_rx_ns = self.first_rx_ns or now
        self.last_rx_ns = now
        self.rx_hash.update(data)
        self.rx += len(data)

    def recv_some(self, limit: int = CHUNK) -> int:
        """One receive of at most `limit` bytes (0: the peer closed)."""
        data = self.sock.recv(limit)
        if data:
            self._received(memoryview(data))
        return len(data)

    def recv_exact(self, n: int) -> None:
        """Receive exactly n bytes; ConnectionError if the peer closes first."""
        if receive_stream(self.sock, self._received, limit=n) < n:
            raise ConnectionError(errno_mod.ECONNRESET, "peer closed early")

    def recv_to_eof(self) -> None:
        """Receive until the peer closes."""
        receive_stream(self.sock, self._received)

    # sampling
    def _sample_loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.sample()

    def sample(self) -> None:
        """Record the byte counters and every subflow's state now."""
        now = time.monotonic_ns()
        self.samples.append((now, self.rx, self.tx))
        try:
            subflows = _subflows(self.sock)
        except OSError:
            return  # socket closing
        seen = set()
        for label, info in subflows.items():
            seen.add(label)
            rec = self.subflows.setdefault(label, {"first_seen_ns": now, "gone_ns": None, **info["meta"]})
            rec["gone_ns"] = None
            rec.update(bytes_acked=info["bytes_acked"], bytes_received=info["bytes_received"])
            self.sf_samples.append((now, label, info["bytes_acked"], info["bytes_received"]))
            if info.get("srtt_ms") is not None:  # the sender's view of each path's queue
                self.srtt_samples.append((now, label, info["srtt_ms"]))
        for label, rec in self.subflows.items():
            if label not in seen and rec["gone_ns"] is None:
                rec["gone_ns"] = now

    def finish(self) -> None:
        """Stop sampling, after one last sample."""
        self._stop.set()
        self._thread.join(2)
        self.sample()  # final per-subflow counters, before the socket closes

    def report(self) -> dict[str, Any]:
        """The connection's counters, hashes, timestamps and samples."""
        return {"bytes_sent": self.tx, "bytes_received": self.rx,
                "sha256_sent": self.tx_hash.hexdigest(), "sha256_received": self.rx_hash.hexdigest(),
                "first_rx_ns": self.first_rx_ns, "last_rx_ns": self.last_rx_ns,
                "token": self.token, "samples": self.samples, "subflow_samples": self.sf_samples,
                "srtt_samples": self.srtt_samples,
                "subflows": self.subflows}


def _subflows(sock: socket.socket | user_socket.UserSocket) -> dict[str, dict[str, Any]]:
    """label -> counters of every MPTCP subflow (id None where the kernel has no
    MPTCP_FULL_INFO), else, for plain or fallen-back TCP, the socket's own TCP_INFO;
    the user-space stack's own counters for its connections."""
    if isinstance(sock, user_socket.UserSocket):
        return sock.subflow_counters()
    try:
        return {s.addrs.label: {"bytes_acked": s.tcp.bytes_acked or 0,
                                "bytes_received": s.tcp.bytes_received or 0,
                                "srtt_ms": s.tcp.rtt_us / 1000,
                                "meta": {"id": s.id, "local": list(s.addrs.local),
                                         "remote": list(s.addrs.remote)}}
                for s in so.subflows(sock)}
    except OSError as exc:
        if exc.errno not in (errno_mod.EOPNOTSUPP, errno_mod.ENOPROTOOPT):
            raise
    ti = so.tcp_info(sock)
    local, remote = sock.getsockname()[:2], sock.getpeername()[:2]
    label = so.SubflowAddrs(tuple(local), tuple(remote)).label
    return {label: {"bytes_acked": ti.bytes_acked or 0, "bytes_received": ti.bytes_received or 0,
                    "meta": {"id": 0, "local": list(local), "remote": list(remote)}}}


def _token(sock: socket.socket | user_socket.UserSocket) -> int | None:
    if isinstance(sock, user_socket.UserSocket):
        return sock.token()
    try:
        return so.mptcp_info(sock).token
    except OSError:
        return None


def _error(exc: BaseException) -> dict[str, Any]:
    code = getattr(exc, "errno", None)
    return {"outcome": "failed", "errno": code,
            "errno_name": errno_mod.errorcode.get(code, "") if code else "",
            "error": f"{type(exc).__name__}: {exc}"}


# ---- the two roles ---------------------------------------------------------------
def run_client(a: argparse.Namespace) -> dict[str, Any]:
    """The client role: connect, exchange as the arguments say, report."""
    out: dict[str, Any] = {"role": "client", "protocol": a.protocol, "cc": a.cc, "mode": a.mode,
                           "direction": a.direction, "stack": a.stack, "pid": os.getpid()}
    if a.stack == "user":
        try:
            sock: Any = _user_client(a)
        except OSError as exc:  # could not attach to the namespace
            out.update(_error(exc), connect_start_ns=time.monotonic_ns(), end_ns=time.monotonic_ns())
            return out
        out["cc"] = sock.congestion_control()
    else:
        sock = so.mptcp_socket(a.cc, protocol=a.protocol)
        out["cc"] = so.congestion_control(sock)
        if a.bind_dev:  # the RobE-style choice of the initial path
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, a.bind_dev.encode())
        if a.bind_addr:
            sock.bind((a.bind_addr, 0))
    payload = Payload(a.seed)  # generated before the clock starts (takes ms)
    sock.settimeout(a.connect_timeout)
    out["connect_start_ns"] = time.monotonic_ns()
    try:
        sock.connect((a.server, a.port))
    except OSError as exc:
        out["failed_ns"] = time.monotonic_ns()
        out.update(_error(exc))
        sock.close()
        return out
    out["established_ns"] = time.monotonic_ns()
    out["outcome"] = _outcome(sock)
    sock.settimeout(a.timeout)
    conn = Conn(sock, a.poll_ms / 1000, payload)
    conn.token = _token(sock)
    limit = _schedule_limit(a, sock, out)
    header = {"mode": a.mode, "direction": a.direction, "bytes": a.bytes, "seconds": a.seconds,
              "request_bytes": a.request_bytes, "response_bytes": a.response_bytes,
              "count": a.count, "seed": a.seed + 1}
    try:
        sock.sendall(json.dumps(header).encode().ljust(HEADER_LEN))
        requests = []
        if a.mode == "rr":
            for _ in range(a.count):
                start = time.monotonic_ns()
                conn.send(a.request_bytes)
                first = conn.rx
                conn.recv_some(min(a.response_bytes, CHUNK))
                fb = conn.last_rx_ns
                conn.recv_exact(a.response_bytes - (conn.rx - first))
                requests.append([start, fb, conn.last_rx_ns])
            sock.shutdown(socket.SHUT_WR)
            conn.recv_to_eof()
        elif a.direction == "up":
            _send_bulk(conn, a.bytes, a.seconds)
            sock.shutdown(socket.SHUT_WR)
            conn.recv_to_eof()  # the server closes once it has read everything
        else:
            conn.recv_to_eof()
        out["last_byte_ns"] = time.monotonic_ns()
        out["requests"] = requests
    except OSError as exc:
        out.update(_error(exc))
        # established, so a timeout here is the socket's idle timeout (--timeout) running out
        out["idle_timeout"] = isinstance(exc, TimeoutError)
    if limit is not None:
        limit.cancel()
    conn.finish()
    out.update(conn.report())
    out["first_byte_ns"] = conn.first_rx_ns
    out["end_ns"] = time.monotonic_ns()
    sock.close()
    return out


def _schedule_limit(a: argparse.Namespace, sock: Any, out: dict[str, Any]) -> threading.Timer | None:
    """Apply the receiver's limit (--limit) at --limit-at-ns: a receive buffer on the
    socket (SO_RCVBUF: the connection-level window of a kernel MPTCP socket), or a
    subflow rate limit request (SRL) of the user-space stack for the subflow from
    --limit-addr. out gets limit_applied_ns, or limit_error naming what failed."""
    if not a.limit:
        return None

    def apply() -> None:
        try:
            if a.limit == "rcvbuf":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, a.limit_rcvbuf)
                out["limit_rcvbuf_read"] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            else:
                out["limit_protocol"] = sock.request_rate_limit(a.limit_addr, a.limit_rate_kbit)
            out["limit_applied_ns"] = time.monotonic_ns()
        except (OSError, AttributeError, ValueError, StackError) as exc:  # StackError: e.g. no such subflow
            out["limit_error"] = f"{type(exc).__name__}: {exc}"

    timer = threading.Timer(max(0.0, (a.limit_at_ns - time.monotonic_ns()) / 1e9), apply)
    timer.daemon = True
    timer.start()
    return timer


def _outcome(sock: socket.socket | user_socket.UserSocket) -> str:
    return sock.outcome() if isinstance(sock, user_socket.UserSocket) else so.outcome(sock)


def _user_client(a: argparse.Namespace) -> user_socket.UserSocket:
    """An unconnected client of the user-space stack over --paths (first: initial subflow)."""
    stack = user_socket.open_stack(a.netns, a.cc, a.checksum, a.scheduler)
    paths = [p for p in (a.paths or "").split(",") if p]
    if a.bind_addr:  # the initial path first, the others join
        paths = [a.bind_addr, *[p for p in paths if p != a.bind_addr]]
    return user_socket.UserSocket(stack, owns_stack=True, mptcp=a.protocol == "mptcp", paths=paths,
                                  backup=[p for p in (a.backup or "").split(",") if p])


def _send_bulk(conn: Conn, n: int | None, seconds: float | None) -> None:
    if n is not None:
        conn.send(n)
    else:
        conn.send(until=time.monotonic() + (seconds or 0))


def run_server(a: argparse.Namespace) -> dict[str, Any]:
    """The server role: accept one connection, serve what the client's header asks, report."""
    out: dict[str, Any] = {"role": "server", "protocol": a.protocol, "stack": a.stack, "pid": os.getpid()}
    # Stays open for the whole run: MP_JOIN SYNs need the listener.
    if a.stack == "user":  # on every address of the namespace, like the wildcard bind
        ls: Any = user_socket.UserListener(user_socket.open_stack(a.netns, a.cc, a.checksum, a.scheduler),
                                           a.port)
    else:
        ls = so.listener(a.port, a.bind, a.protocol, a.cc, backlog=4)
    ls.settimeout(a.timeout)
    # Our payload is seeded with the client's seed + 1, so a mix-up of the two
    # directions cannot produce matching hashes; generated before accepting.
    payload = Payload(a.seed + 1)
    if a.ready_file:
        with open(a.ready_file, "w") as f:
            f.write(str(os.getpid()))
    try:
        sock, peer = ls.accept()
    except OSError as exc:
        out.update(_error(exc))
        return out
    out["accepted_ns"], out["peer"] = time.monotonic_ns(), list(peer)
    out["outcome"] = _outcome(sock)
    out["cc"] = sock.congestion_control() if a.stack == "user" else so.congestion_control(sock)
    sock.settimeout(a.timeout)
    conn = None
    try:
        hdr = b""
        while len(hdr) < HEADER_LEN:
            part = sock.recv(HEADER_LEN - len(hdr))
            if not part:
                raise ConnectionError(errno_mod.ECONNRESET, "closed before the header")
            hdr += part
        h = json.loads(hdr.decode().strip())
        out["header"] = h
        if h["seed"] != payload.seed:  # a client with another seed than ours
            payload = Payload(h["seed"])
        conn = Conn(sock, a.poll_ms / 1000, payload)
        conn.token = _token(sock)
        if h["mode"] == "rr":
            for _ in range(h["count"]):
                conn.recv_exact(h["request_bytes"])
                conn.send(h["response_bytes"])
            conn.recv_to_eof()
        elif h["direction"] == "up":
            conn.recv_to_eof()
        else:
            _send_bulk(conn, h["bytes"], h["seconds"])
        out["last_byte_ns"] = time.monotonic_ns()
    except (OSError, ValueError, KeyError) as exc:
        out.update(_error(exc))
        out["idle_timeout"] = isinstance(exc, TimeoutError)  # accepted: the idle timeout ran out
    if conn is not None:  # what was sampled counts, also when the connection broke off
        conn.finish()
        out.update(conn.report())
        out["first_byte_ns"] = conn.first_rx_ns
    sock.close()
    ls.close()
    out["end_ns"] = time.monotonic_ns()
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: run one role and write its result as JSON."""
    p = argparse.ArgumentParser(prog="python -m testbed.harness.workload.app")
    p.add_argument("role", choices=["client", "server"])
    p.add_argument("--out", required=True)
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--protocol", choices=["mptcp", "tcp"], default="mptcp")
    p.add_argument("--cc", default="cubic")
    p.add_argument("--poll-ms", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=60.0, help="idle socket timeout, s")
    p.add_argument("--bind", default="0.0.0.0", help="server: listen address")
    p.add_argument("--ready-file", help="server: written once listening")
    p.add_argument("--server", help="client: server address")
    p.add_argument("--bind-addr", help="client: source address")
    p.add_argument("--bind-dev", help="client: SO_BINDTODEVICE interface")
    p.add_argument("--connect-timeout", type=float, default=30.0)
    p.add_argument("--mode", choices=["bulk", "rr"], default="bulk")
    p.add_argument("--direction", choices=["up", "down"], default="down")
    p.add_argument("--bytes", type=int)
    p.add_argument("--seconds", type=float)
    p.add_argument("--request-bytes", type=int, default=1000)
    p.add_argument("--response-bytes", type=int, default=100_000)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--stack", choices=["kernel", "user"], default="kernel",
                   help="kernel sockets, or the user-space MPTCP stack (testbed.stack)")
    p.add_argument("--netns", help="user stack: the namespace file to attach in (the process's own)")
    p.add_argument("--paths", help="user stack client: local addresses, the initial one first")
    p.add_argument("--backup", help="user stack client: local addresses joined as backup")
    p.add_argument("--checksum", action="store_true", help="user stack: ask for DSS checksums")
    p.add_argument("--scheduler", default="lowrtt", help="user stack: packet scheduler (testbed.stack.scheduler)")
    p.add_argument("--limit", choices=["rcvbuf", "srl"],
                   help="client: at --limit-at-ns set SO_RCVBUF, or ask for a subflow rate limit (user stack)")
    p.add_argument("--limit-at-ns", type=int, default=0, help="client: time.monotonic_ns() of the limit")
    p.add_argument("--limit-rcvbuf", type=int, help="client: SO_RCVBUF bytes (--limit rcvbuf)")
    p.add_argument("--limit-addr", help="client: local address of the subflow to rate-limit (--limit srl)")
    p.add_argument("--limit-rate-kbit", type=float, help="client: requested rate, kbit/s (--limit srl)")
    a = p.parse_args(argv)
    if a.stack == "user" and not a.netns:
        p.error("--stack user needs --netns (the stack never attaches to a namespace by default)")
    if a.role == "client":
        if not a.server:
            p.error("client needs --server")
        if a.mode == "bulk" and (a.bytes is None) == (a.seconds is None):
            p.error("bulk mode needs exactly one of --bytes and --seconds")
        if a.limit == "rcvbuf" and (a.limit_rcvbuf is None or a.stack == "user"):
            p.error("--limit rcvbuf needs --limit-rcvbuf and kernel sockets")
        if a.limit == "srl" and (a.limit_addr is None or a.limit_rate_kbit is None or a.stack != "user"):
            p.error("--limit srl needs --limit-addr, --limit-rate-kbit and --stack user")
    result = run_client(a) if a.role == "client" else run_server(a)
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, a.out)  # the workload never reads a half-written file
    return 0


if __name__ == "__main__":
    sys.exit(main())
