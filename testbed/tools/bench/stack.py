"""Benchmarks of the user-space MPTCP stack against the kernel, in two private namespaces.

    run(seconds=3) -> StackBench     (throughput both ways, connect latency, CPU)
    attach_compare(packets=20000)    (AF_PACKET + raw socket vs TUN: packets/s, RTT)
    two_path(seconds=10)             (the app workload on the two-path topology, user vs kernel)

run() and attach_compare() run in two network namespaces held by `unshare`
processes this module starts and kills by PID, joined by one unshaped veth
pair; two_path() builds a testbed topology (torn down with it). Nothing
touches the caller's namespace.
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import select
import socket
import statistics
import struct
import subprocess
import threading
import time
from dataclasses import asdict, dataclass

from testbed.base.netns import run_command
from testbed.stack.attach import NftGuard, run_in_netns
from testbed.stack.packet import ACK, IpPacket, TcpSegment, decode_ipv4, encode_ipv4
from testbed.stack.stack import Stack

IPPROTO_MPTCP = 262


class NamespacePair:
    """Namespaces A (10.0.0.1, va0) and B (10.0.0.2, vb0) joined by a veth pair."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []
        try:
            self.a = self._ns()
            self.b = self._ns()
            self.sh(self.a, f"ip link add va0 type veth peer name vb0 netns {self.b}")
            self.sh(self.a, "ip addr add 10.0.0.1/24 dev va0 && ip link set va0 up && ip link set lo up")
            self.sh(self.b, "ip addr add 10.0.0.2/24 dev vb0 && ip link set vb0 up && ip link set lo up")
        except BaseException:
            self.close()
            raise

    def _ns(self) -> int:
        p = subprocess.Popen(["unshare", "--net", "sleep", "3600"])
        self.procs.append(p)
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{p.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            if time.monotonic() > deadline:
                raise RuntimeError("unshare did not create a namespace")
            time.sleep(0.01)
        return p.pid

    @staticmethod
    def sh(pid: int, cmd: str) -> str:
        """Run a shell command in pid's namespace; RuntimeError with its stderr on failure."""
        out = run_command(pid, ["sh", "-c", cmd], timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"{cmd}: {out.stderr.strip()}")
        return out.stdout

    def ns(self, pid: int) -> str:
        """Namespace path of one side."""
        return f"/proc/{pid}/ns/net"

    def close(self) -> None:
        """Kill the namespace holders we started (the namespaces go with them)."""
        for p in self.procs:
            p.kill()
            p.wait()
        self.procs = []

    def __enter__(self) -> "NamespacePair":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- attachment
@dataclass
class AttachResult:
    """Reflector figures for one attachment method."""
    method: str
    packets_per_s: float
    rtt_median_us: float
    rtt_p99_us: float


TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000


def _reflect(pkt: bytes) -> bytes:
    p = decode_ipv4(pkt, verify_tcp_checksum=False)
    t = p.tcp
    return encode_ipv4(IpPacket(p.dst, p.src, TcpSegment(t.dport, t.sport, t.ack, t.seq + 1, ACK, 1000,
                                                         [], t.payload)))


def _probe(pair: NamespacePair, dst: str, packets: int, stop: threading.Event) -> tuple[float, list[float]]:
    """From B: a flood (packets/s answered) then ping-pongs (RTTs) against the reflector in A."""
    def make():
        tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        rx.settimeout(0.5)
        return tx, rx

    tx, rx = run_in_netns(pair.ns(pair.b), make)
    try:
        payload = b"x" * 100

        def pkt(i: int) -> bytes:
            return encode_ipv4(IpPacket("10.0.0.2", dst, TcpSegment(40000, 62000, i, 0, ACK, 1000, [], payload)))

        # Paced flood: send in bursts of 64 and count answers, so neither side's socket buffer overflows.
        got = 0
        start = time.monotonic()
        give_up = start + 30   # a reflector that stopped answering must not hang the benchmark
        sent = 0
        while sent < packets and time.monotonic() < give_up:
            for _ in range(64):
                tx.sendto(pkt(sent), (dst, 0))
                sent += 1
            while got < sent - 128:
                try:
                    data = rx.recv(2048)
                except socket.timeout:
                    break
                if data[20:22] == struct.pack("!H", 62000):
                    got += 1
        while got < sent and time.monotonic() < give_up:
            try:
                data = rx.recv(2048)
            except socket.timeout:
                break
            if data[20:22] == struct.pack("!H", 62000):
                got += 1
        pps = got / (time.monotonic() - start)
        rx.settimeout(0.05)
        try:
            while rx.recv(2048) and time.monotonic() < give_up:   # late flood answers are no ping replies
                pass
        except socket.timeout:
            pass
        rx.settimeout(0.2)
        rtts = []
        for i in range(500):
            if time.monotonic() > give_up + 10:
                break
            seq = 10 ** 6 + i
            t0 = time.perf_counter()
            tx.sendto(pkt(seq), (dst, 0))
            while True:
                try:
                    data = rx.recv(2048)
                except socket.timeout:
                    break
                if data[20:22] == struct.pack("!H", 62000) and struct.unpack_from("!I", data, 28)[0] == seq + 1:
                    rtts.append((time.perf_counter() - t0) * 1e6)
                    break
        return pps, rtts
    finally:
        stop.set()
        tx.close()
        rx.close()


def _afpacket_reflector(pair: NamespacePair, stop: threading.Event, ready: threading.Event) -> None:
    from testbed.stack.attach import Interface, PathPort

    def make():
        guard = NftGuard("mptb_bench_attach")
        guard.add_addresses(["10.0.0.1"])
        return guard, PathPort(Interface("va0", "10.0.0.1", 1500), ["10.0.0.1"])

    guard, port = run_in_netns(pair.ns(pair.a), make)
    try:
        ready.set()
        while not stop.is_set():
            r, _, _ = select.select([port], [], [], 0.1)
            while r:
                got = port.receive()
                if got is None:
                    break
                port.send(_reflect(got[0]), "10.0.0.2")
    finally:
        port.close()
        guard.close()


def _tun_reflector(pair: NamespacePair, stop: threading.Event, ready: threading.Event) -> None:
    def make():
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", b"mptbtun0", IFF_TUN | IFF_NO_PI))
        return fd

    fd = run_in_netns(pair.ns(pair.a), make)
    try:
        # The namespace's own side of the TUN is .254; 10.9.0.1 is the stack's address
        # behind it, so the kernel forwards (not delivers) packets for it into the TUN.
        pair.sh(pair.a, "ip addr add 10.9.0.254/24 dev mptbtun0 && ip link set mptbtun0 up && "
                        "sysctl -qw net.ipv4.ip_forward=1")
        pair.sh(pair.b, "ip route add 10.9.0.0/24 via 10.0.0.1")
        ready.set()
        while not stop.is_set():
            r, _, _ = select.select([fd], [], [], 0.1)
            if r:
                pkt = os.read(fd, 65535)
                if pkt[0] >> 4 == 4 and pkt[9] == 6:
                    # The stack would own 10.9.0.0/24 behind the TUN: answer from there.
                    os.write(fd, _reflect(pkt))
    finally:
        os.close(fd)   # a non-persistent TUN device disappears with its descriptor


ATTACH_METHODS = {"af_packet+nft": (_afpacket_reflector, "10.0.0.1"), "tun": (_tun_reflector, "10.9.0.1")}


def attach_compare(packets: int = 20000, methods: tuple[str, ...] = tuple(ATTACH_METHODS)) -> list[AttachResult]:
    """Packets/s and RTT of a packet reflector attached with AF_PACKET+nft and with TUN."""
    out = []
    for method in methods:
        reflector, dst = ATTACH_METHODS[method]
        with NamespacePair() as pair:
            # B's kernel would answer every reflected segment with a RST, which the
            # reflector would bounce back: a storm. The probe's raw socket still sees all.
            pair.sh(pair.b, "nft add table ip mptb_bench && nft add chain ip mptb_bench out "
                            "'{ type filter hook output priority 0; }' && "
                            "nft add rule ip mptb_bench out tcp flags rst drop")
            stop, ready = threading.Event(), threading.Event()
            t = threading.Thread(target=reflector, args=(pair, stop, ready), daemon=True)
            t.start()
            if not ready.wait(10):
                raise RuntimeError(f"{method} reflector did not start")
            pps, rtts = _probe(pair, dst, packets, stop)
            t.join(5)
            rtts.sort()
            if not rtts:
                raise RuntimeError(f"{method}: no ping-pong answered ({pps:.0f} packets/s in the flood)")
            out.append(AttachResult(method, round(pps), round(statistics.median(rtts), 1),
                                    round(rtts[max(0, int(len(rtts) * 0.99) - 1)], 1)))
    return out


# ----------------------------------------------------------------------------- stack vs kernel
@dataclass
class StackBench:
    """Throughput (Mbit/s) and connect latency (ms) of user and kernel endpoints over one veth."""
    user_to_kernel_mbit: float
    kernel_to_user_mbit: float
    kernel_to_kernel_mbit: float
    user_cpu_s_per_gbit: float
    connect_user_ms: float
    connect_kernel_ms: float

    def as_dict(self) -> dict:
        """Plain dict for reports."""
        return asdict(self)


def _kernel_sink(ns: str, port: int):
    def make():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(128)
        s.settimeout(30)
        return s

    return run_in_netns(ns, make)


def _drain_kernel(srv: socket.socket, box: dict) -> None:
    c, _ = srv.accept()
    n = 0
    while True:
        d = c.recv(1 << 18)
        if not d:
            break
        n += len(d)
    c.close()
    box["n"] = n


def run(seconds: float = 3.0, connects: int = 50) -> StackBench:
    """Measure the stack against the kernel over one unshaped veth path."""
    chunk = os.urandom(1 << 20)
    with NamespacePair() as pair:
        na, nb = pair.ns(pair.a), pair.ns(pair.b)
        # user client -> kernel server
        srv = _kernel_sink(nb, 5001)
        box: dict = {}
        t = threading.Thread(target=_drain_kernel, args=(srv, box), daemon=True)
        t.start()
        with Stack(na) as st:
            conn = st.connect(("10.0.0.2", 5001), timeout=5)
            cpu0, t0 = time.process_time(), time.monotonic()
            sent = 0
            while time.monotonic() - t0 < seconds:
                conn.send(chunk)
                sent += len(chunk)
            conn.close()
            t.join(30)
            elapsed = time.monotonic() - t0
            cpu = time.process_time() - cpu0
        srv.close()
        u2k = box.get("n", 0) * 8 / elapsed / 1e6
        cpu_per_gbit = cpu / (box.get("n", 1) * 8 / 1e9)
        # kernel client -> user server
        with Stack(nb) as st:
            lst = st.listen(5002)
            client = run_in_netns(na, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP))
            client.settimeout(30)

            def push():
                client.connect(("10.0.0.2", 5002))
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    client.sendall(chunk)
                client.shutdown(socket.SHUT_WR)

            pt = threading.Thread(target=push, daemon=True)
            t0 = time.monotonic()
            pt.start()
            conn = lst.accept(timeout=5)
            n = 0
            while True:
                d = conn.recv(1 << 20, timeout=30)
                if not d:
                    break
                n += len(d)
            k2u = n * 8 / (time.monotonic() - t0) / 1e6
            conn.close()
            pt.join(10)
            client.close()
        # kernel -> kernel reference
        srv = _kernel_sink(nb, 5003)
        box = {}
        t = threading.Thread(target=_drain_kernel, args=(srv, box), daemon=True)
        t.start()
        client = run_in_netns(na, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP))
        client.connect(("10.0.0.2", 5003))
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            client.sendall(chunk)
        client.close()
        t.join(30)
        k2k = box.get("n", 0) * 8 / (time.monotonic() - t0) / 1e6
        srv.close()
        # connect latency: SYN to established, user vs kernel, same server
        srv = _kernel_sink(nb, 5004)
        acceptor_stop = threading.Event()

        def acceptor():
            while not acceptor_stop.is_set():
                try:
                    c, _ = srv.accept()
                    c.close()
                except OSError:
                    return

        at = threading.Thread(target=acceptor, daemon=True)
        at.start()
        user_ms, kern_ms = [], []
        with Stack(na) as st:
            for _ in range(connects):
                t0 = time.perf_counter()
                c = st.connect(("10.0.0.2", 5004), timeout=5)
                user_ms.append((time.perf_counter() - t0) * 1000)
                c.abort()
        for _ in range(connects):
            s = run_in_netns(na, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP))
            t0 = time.perf_counter()
            s.connect(("10.0.0.2", 5004))
            kern_ms.append((time.perf_counter() - t0) * 1000)
            s.close()
        acceptor_stop.set()
        srv.close()
    return StackBench(round(u2k, 1), round(k2u, 1), round(k2k, 1), round(cpu_per_gbit, 2),
                      round(statistics.median(user_ms), 3), round(statistics.median(kern_ms), 3))


@dataclass
class TwoPathFigure:
    """Goodput of one stack combination on the two-path topology, after the warm-up."""
    client_stack: str
    server_stack: str
    direction: str
    goodput_mbit: float
    sum_rates_mbit: float
    sha256_match: bool
    subflows_max: int

    @property
    def fraction(self) -> float:
        """Goodput as a fraction of the sum of the paths' rates."""
        return self.goodput_mbit / self.sum_rates_mbit


TWO_PATH = {"rate_mbit": 20, "wifi_delay_ms": 10, "lte_delay_ms": 40}


def two_path(seconds: float = 10.0, warmup: float = 2.0,
             combos: tuple[tuple[str, str, str], ...] = (("kernel", "kernel", "up"), ("user", "kernel", "up"),
                                                        ("kernel", "user", "down"), ("user", "kernel", "down"))
             ) -> list[TwoPathFigure]:
    """The app workload over the two-path topology (2 x 20 Mbit/s, 10 / 40 ms one way),
    one testbed for every (client_stack, server_stack, direction): the receiver's
    delivered bytes from `warmup` s after the connection to the end, over the sum of rates
    (the demo's window, so the kernel's figure is the README's 0.93)."""
    from pathlib import Path
    from tempfile import TemporaryDirectory

    from testbed.core.net import Testbed
    from testbed.core.topology import load
    from testbed.harness import workload

    out = []
    with TemporaryDirectory(prefix="mptb-bench-stack-") as tmp, Testbed(load("two-path", **TWO_PATH)) as tb:
        rates = sum(p.spec.direction("up").rate_mbit or 0 for p in tb.paths)
        for i, (client, server, direction) in enumerate(combos):
            load_ = workload.get("app", seconds=seconds, direction=direction, client_stack=client,
                                 server_stack=server, port=5400 + i, cc="cubic")
            res = load_.run(tb, Path(tmp) / str(i), time.monotonic_ns(), seconds + 30)
            ts = res.tables["timeseries"]
            total = ts[(ts.series == "delivered_bytes") & (ts.key == "total")].sort_values("t")
            start = total.t.min() + warmup
            window = total[total.t > start]
            span = window.t.max() - start if len(window) else 0.0
            goodput = window.value.sum() * 8 / span / 1e6 if span > 0 else 0.0
            m = res.metrics
            out.append(TwoPathFigure(client, server, direction, round(goodput, 2), rates,
                                     bool(m.get("sha256_match")), int(m.get("subflows_max") or 0)))
    return out


def main() -> None:
    """Print both benchmarks (python -m testbed.tools.bench.stack)."""
    for r in attach_compare():
        print(asdict(r))
    print(run().as_dict())
    for f in two_path():
        print(asdict(f), round(f.fraction, 3))


if __name__ == "__main__":
    main()
