"""Coupled congestion control at work: the user-space stack's two subflows and one kernel TCP
flow through ONE shared bottleneck, to a kernel MPTCP server.

Four private namespaces (held by `unshare` processes the fixture starts and kills by PID):
client C (the stack, two interfaces), competitor T (a kernel TCP sender), router R, server S.
C's two paths and T's path meet at R, whose link to S is the bottleneck (HTB, a byte-limited
FIFO; offloads off so every queue slot is one segment). With LIA the connection takes about
one TCP flow's share (1/2), and so with OLIA; with uncoupled Reno about two flows' (2/3). Bounds are generous:
the point is the difference the coupling makes, measured on real packets.
"""
from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

import pytest

from testbed.stack.stack import Stack, StackError
from test_stack_interop import Pair, in_ns, kernel_listener

pytestmark = [pytest.mark.root]

TCP_CONGESTION = 13
RATE_MBIT, QUEUE_BYTES = 20, 90_000
WARMUP_S, MEASURE_S = 3.0, 10.0


class Bottleneck(Pair):
    """C (10.0.0.1, 10.0.1.1) and T (10.0.3.1) -> R -> S (10.0.2.2); R->S shaped.
    (Pair's namespace, shell and teardown helpers; its own links.)"""

    def __init__(self, tmp_path):
        self.procs: list[subprocess.Popen] = []
        self.captures: list[subprocess.Popen] = []
        self.tmp = tmp_path
        try:
            self._build()
        except BaseException:
            self.close()   # the namespaces made so far go too
            raise

    def _build(self) -> None:
        self.c, self.t, self.r, self.s = (self._ns() for _ in range(4))
        self.a, self.b = self.c, self.s     # Pair's names: the client and the server side
        links = [(self.c, "c0", "10.0.0.1", "r0", "10.0.0.254"), (self.c, "c1", "10.0.1.1", "r1", "10.0.1.254"),
                 (self.t, "t0", "10.0.3.1", "r3", "10.0.3.254"), (self.s, "s0", "10.0.2.2", "r2", "10.0.2.254")]
        for pid, dev, addr, rdev, raddr in links:
            self.sh(self.r, f"ip link add {rdev} type veth peer name {dev} netns {pid}")
            self.sh(self.r, f"ip addr add {raddr}/24 dev {rdev} && ip link set {rdev} up")
            self.sh(pid, f"ip addr add {addr}/24 dev {dev} && ip link set {dev} up && ip link set lo up")
            for ns, d in ((pid, dev), (self.r, rdev)):
                self.sh(ns, f"ethtool -K {d} tso off gso off gro off 2>/dev/null || true")
        self.sh(self.r, "sysctl -qw net.ipv4.ip_forward=1")
        self.sh(self.c, "ip route add 10.0.2.0/24 via 10.0.0.254 dev c0 && "
                        "ip route add 10.0.2.0/24 via 10.0.1.254 dev c1 metric 200")
        self.sh(self.t, "ip route add default via 10.0.3.254")
        self.sh(self.s, "ip route add 10.0.0.0/16 via 10.0.2.254 && ip mptcp limits set subflow 4")
        self.sh(self.r, f"tc qdisc add dev r2 root handle 1: htb default 1 && "
                        f"tc class add dev r2 parent 1: classid 1:1 htb rate {RATE_MBIT}mbit ceil {RATE_MBIT}mbit && "
                        f"tc qdisc add dev r2 parent 1:1 handle 10: bfifo limit {QUEUE_BYTES}")


@pytest.fixture
def bottleneck(tmp_path):
    b = Bottleneck(tmp_path)
    try:
        yield b
    finally:
        b.close()


class Sink:
    """A kernel listener in S counting each accepted connection's bytes over time."""

    def __init__(self, b: Bottleneck, port: int):
        # An MPTCP listener: it serves the plain TCP flow as TCP too.
        self.sock = kernel_listener(b, port)
        self.received = 0
        self.marks: list[int] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        conn.settimeout(1)
        with conn:
            while True:
                try:
                    d = conn.recv(1 << 16)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not d:
                    return
                self.received += len(d)

    def mark(self) -> None:
        self.marks.append(self.received)

    def close(self) -> None:
        self.sock.close()


def shares(b: Bottleneck, cc: str) -> tuple[float, float, float]:
    """(MPTCP Mbit/s, TCP Mbit/s, MPTCP share) over the measurement window."""
    mp_sink, tcp_sink = Sink(b, 5000), Sink(b, 5001)
    stop = threading.Event()
    chunk = os.urandom(1 << 16)

    def tcp_socket():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, b"reno")
        s.settimeout(5)
        s.connect(("10.0.2.2", 5001))
        return s

    def tcp_send(s):
        with s:
            while not stop.is_set():
                try:
                    s.send(chunk)
                except TimeoutError:
                    continue
                except OSError:
                    return

    def mptcp_send(conn):
        while not stop.is_set():
            try:
                conn.send(chunk, timeout=1)
            except StackError as exc:
                if stop.is_set():
                    return
                if "send timed out" not in str(exc):   # a full send buffer: keep it full
                    raise

    tcp = in_ns(b.t, tcp_socket)
    with Stack(b.c, cc=cc) as st:
        conn = st.connect(("10.0.2.2", 5000), paths=["10.0.0.1", "10.0.1.1"], timeout=5)
        assert len(conn.info().subflows) == 2, conn.info()
        senders = [threading.Thread(target=tcp_send, args=(tcp,), daemon=True),
                   threading.Thread(target=mptcp_send, args=(conn,), daemon=True)]
        for t in senders:
            t.start()
        time.sleep(WARMUP_S)
        mp_sink.mark(), tcp_sink.mark()
        time.sleep(MEASURE_S)
        mp_sink.mark(), tcp_sink.mark()
        info = conn.info()
        stop.set()
        conn.abort()
    for t in senders:
        t.join(5)
    mp_sink.close(), tcp_sink.close()
    mp = (mp_sink.marks[1] - mp_sink.marks[0]) * 8 / MEASURE_S / 1e6
    tc = (tcp_sink.marks[1] - tcp_sink.marks[0]) * 8 / MEASURE_S / 1e6
    print(f"{cc}: MPTCP {mp:.2f} Mbit/s, TCP {tc:.2f} Mbit/s, share {mp / (mp + tc):.2f}; "
          f"subflows {[(s.cwnd, s.bytes_acked, s.fast_retransmits, s.timeouts) for s in info.subflows]}")
    return mp, tc, mp / (mp + tc)


def coupling_problems(bottleneck) -> list[str]:
    """Measure LIA, OLIA and uncoupled Reno once; what breaks the coupling's bounds (empty: none)."""
    mp_lia, tcp_lia, lia = shares(bottleneck, "lia")
    mp_olia, tcp_olia, olia = shares(bottleneck, "olia")
    mp_reno, tcp_reno, reno = shares(bottleneck, "reno")
    # measured here (8 s windows): LIA 0.51 / 0.56 / 0.57 / 0.62, OLIA 0.49 / 0.60 / 0.58, Reno 0.65 /
    # 0.65 / 0.71 / 0.68 (the shares move with the machine's load; the coupling's difference stays)
    checks = [
        # the bottleneck stays busy in every run
        (min(mp_lia + tcp_lia, mp_olia + tcp_olia, mp_reno + tcp_reno) > 0.8 * RATE_MBIT,
         "the bottleneck was not kept busy"),
        (0.3 < lia < 0.65, f"LIA share {lia:.2f}, about one flow's (0.5) expected"),
        (0.3 < olia < 0.65, f"OLIA share {olia:.2f}, about one flow's (0.5) expected"),
        (reno > 0.58, f"uncoupled Reno share {reno:.2f}, about two flows' (0.67) expected"),
        (reno - (lia + olia) / 2 > 0.05,
         f"coupling made little difference: LIA {lia:.2f}, OLIA {olia:.2f}, Reno {reno:.2f}")]
    return [why for ok, why in checks if not ok]


def test_lia_and_olia_take_one_flows_share_where_uncoupled_reno_takes_two(bottleneck):
    # Shares move with the machine's load (a clean-clone CI run saw OLIA at 0.67 once):
    # the same bounds, measured a second time before the test fails.
    first = coupling_problems(bottleneck)
    if first:
        second = coupling_problems(bottleneck)
        assert not second, f"first measurement: {first}; second: {second}"
