"""User-space MPTCP stack against the Linux kernel (and itself), in two private namespaces.

Topology (built per test, torn down in finally): namespace A and namespace B,
joined by two veth pairs (path 0: 10.0.0.1 <-> 10.0.0.2, path 1: 10.0.1.1 <->
10.0.1.2). Each path also routes the other path's subnet at a worse metric, so a
socket or raw socket bound to a path's device reaches the peer's initial
address over that path (what policy routing does in the testbed). Every test
captures both paths in A and checks the capture with tshark.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

from testbed.stack.stack import Stack, StackError
from testbed.stack.trace import check_capture

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(shutil.which("tshark") is None or shutil.which("tcpdump") is None,
                                 reason="needs tshark and tcpdump")]

IPPROTO_MPTCP = 262
_libc = ctypes.CDLL(None, use_errno=True)
A_ADDRS = ["10.0.0.1", "10.0.1.1"]
B_ADDRS = ["10.0.0.2", "10.0.1.2"]


def in_ns(pid: int, fn):
    """Run fn in a thread inside pid's network namespace (sockets made there stay there)."""
    box = {}

    def target():
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
            try:
                assert _libc.setns(fd, 0x40000000) == 0
            finally:
                os.close(fd)
            box["v"] = fn()
        except BaseException as exc:
            box["e"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join(30)
    if "e" in box:
        raise box["e"]
    return box["v"]


class Pair:
    """Two namespaces held by `unshare` processes we started, joined by two veth pairs."""

    def __init__(self, tmp_path):
        self.procs = []
        self.tmp = tmp_path
        self.captures = []
        self.a = self._ns()
        self.b = self._ns()
        for i in range(2):
            self.sh_a(f"ip link add va{i} type veth peer name vb{i} netns {self.b}")
            for side, pid, addrs, dev in (("a", self.a, A_ADDRS, f"va{i}"), ("b", self.b, B_ADDRS, f"vb{i}")):
                self.sh(pid, f"ip addr add {addrs[i]}/24 dev {dev}")
                self.sh(pid, f"ip link set {dev} up")
        for pid, dev, other in ((self.a, "va1", "10.0.0.0/24"), (self.b, "vb1", "10.0.0.0/24"),
                                (self.a, "va0", "10.0.1.0/24"), (self.b, "vb0", "10.0.1.0/24")):
            self.sh(pid, f"ip route add {other} dev {dev} metric 200")
        for pid in (self.a, self.b):
            self.sh(pid, "ip link set lo up")
            self.sh(pid, "ip mptcp limits set subflow 4 add_addr_accepted 4")
            self.sysctl(pid, "net.mptcp.blackhole_timeout", 0)

    def _ns(self) -> int:
        p = subprocess.Popen(["unshare", "--net", "sleep", "3600"])
        self.procs.append(p)
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{p.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            assert time.monotonic() < deadline, "unshare did not create a namespace"
            time.sleep(0.01)
        return p.pid

    def sh(self, pid: int, cmd: str) -> str:
        out = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "sh", "-c", cmd],
                             capture_output=True, text=True, timeout=20)
        assert out.returncode == 0, f"{cmd}: {out.stderr}"
        return out.stdout

    def sh_a(self, cmd: str) -> str:
        return self.sh(self.a, cmd)

    def sysctl(self, pid: int, name: str, value) -> None:
        self.sh(pid, f"sysctl -qw {name}={value}")

    def capture(self, pid: int, dev: str) -> str:
        """Start tcpdump on dev in pid's namespace; returns the pcap path (stopped by close)."""
        path = str(self.tmp / f"{pid}-{dev}.pcap")
        p = subprocess.Popen(["nsenter", f"--net=/proc/{pid}/ns/net", "tcpdump", "-i", dev, "-s", "0", "-U",
                              "--immediate-mode", "-w", path, "tcp"],
                             stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.captures.append(p)
        line = p.stderr.readline()   # "listening on ..." once the capture is live
        assert "listening" in line, line
        return path

    def stop_captures(self) -> None:
        for p in self.captures:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.captures:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.captures = []

    def close(self) -> None:
        self.stop_captures()
        for p in self.procs:
            p.kill()
            p.wait()


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path)
    try:
        yield p
    finally:
        p.close()


def kernel_listener(pair: Pair, port: int = 5000) -> socket.socket:
    """A kernel MPTCP listening socket in B (20 s accept timeout)."""
    def make():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen()
        s.settimeout(20)
        return s

    return in_ns(pair.b, make)


def kernel_accept(pair: Pair, handle, port: int = 5000):
    """A kernel MPTCP listener in B whose first connection handle(conn, result) serves in a thread."""
    srv = kernel_listener(pair, port)
    result = {}

    def serve():
        try:
            c, _ = srv.accept()
            c.settimeout(30)
            handle(c, result)
        except Exception as exc:  # reported by the test
            result["error"] = repr(exc)
        finally:
            srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t, result


def kernel_server(pair: Pair, addr: str = "10.0.0.2", port: int = 5000):
    """A kernel MPTCP listener in B that reads everything, answers with the sha256, and closes."""
    def sha_back(c, result):
        h, n = hashlib.sha256(), 0
        while True:
            d = c.recv(1 << 16)
            if not d:
                break
            h.update(d)
            n += len(d)
        c.sendall(h.hexdigest().encode())
        c.close()
        result.update(n=n, sha=h.hexdigest())

    return kernel_accept(pair, sha_back, port)


def mib(pair: Pair, pid: int, name: str) -> int:
    """A kernel MPTCP counter (nstat) in pid's namespace."""
    out = pair.sh(pid, f"nstat -saz {name}")
    for line in out.splitlines():
        if line.startswith(name):
            return int(line.split()[1])
    return 0


def check_trace(pair: Pair, pcaps: list[str], stacks: list[Stack], ports=()) -> None:
    pair.stop_captures()
    sent = [s for st in stacks for s in st.sent]
    for pcap in pcaps:
        problems = check_capture(pcap, sent, data_ports=set(ports))
        assert not problems, "\n".join(problems[:20])


@pytest.mark.parametrize("checksum", [False, True], ids=["csum-off", "csum-on"])
def test_user_client_to_kernel_server(pair, checksum):
    pair.sysctl(pair.b, "net.mptcp.checksum_enabled", int(checksum))
    pcap = pair.capture(pair.a, "va0")
    t, result = kernel_server(pair)
    data = os.urandom(1_000_000)
    with Stack(pair.a, record=True) as st:
        conn = st.connect(("10.0.0.2", 5000), timeout=5)
        info = conn.info()
        assert not info.fallback and info.checksum == checksum
        conn.send(data)
        conn.close()
        answer = conn.recv(100, timeout=20)
        assert conn.recv(100, timeout=10) == b""
        assert conn.wait_closed(10)
        t.join(10)
        assert answer.decode() == hashlib.sha256(data).hexdigest(), result
        assert result["n"] == len(data)
        assert mib(pair, pair.b, "MPTcpExtDataCsumErr") == 0
        assert mib(pair, pair.b, "MPTcpExtMPCapableFallbackACK") == 0
        kinds = []
        while (ev := st.next_event(0.01)) is not None:
            kinds.append(ev.kind)
        assert kinds == ["created", "established", "sf_closed", "closed"]
        check_trace(pair, [pcap], [st])


def kernel_client(pair: Pair, data: bytes, dest=("10.0.0.2", 5000), extra_endpoint: str | None = None,
                  go: threading.Event | None = None):
    """A kernel MPTCP client in A that sends data (after go, when given), half-closes and reads the answer."""
    if extra_endpoint:
        pair.sh_a(f"ip mptcp endpoint add {extra_endpoint} dev va1 subflow")

    def make():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
        s.settimeout(30)
        return s

    c = in_ns(pair.a, make)
    result = {}

    def run():
        try:
            c.connect(dest)
            if go is not None:
                go.wait(20)
            c.sendall(data)
            c.shutdown(socket.SHUT_WR)
            chunks = []
            while True:
                d = c.recv(1 << 16)
                if not d:
                    break
                chunks.append(d)
            result["answer"] = b"".join(chunks)
        except Exception as exc:
            result["error"] = repr(exc)
        finally:
            c.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, result


def serve_sha(conn, timeout=30) -> tuple[int, str]:
    """Read to EOF on a stack connection, answer with the sha256, close."""
    h, n = hashlib.sha256(), 0
    while True:
        d = conn.recv(1 << 16, timeout=timeout)
        if not d:
            break
        h.update(d)
        n += len(d)
    conn.send(h.hexdigest().encode())
    conn.close()
    return n, h.hexdigest()


@pytest.mark.parametrize("checksum", [False, True], ids=["csum-off", "csum-on"])
def test_kernel_client_to_user_server(pair, checksum):
    pair.sysctl(pair.a, "net.mptcp.checksum_enabled", int(checksum))
    pcap = pair.capture(pair.a, "va0")
    data = os.urandom(1_000_000)
    with Stack(pair.b, record=True) as st:
        lst = st.listen(5000)
        t, result = kernel_client(pair, data)
        conn = lst.accept(timeout=5)
        n, sha = serve_sha(conn)
        t.join(20)
        assert "error" not in result, result
        assert n == len(data) and sha == hashlib.sha256(data).hexdigest()
        assert result["answer"] == sha.encode()
        info = conn.info()
        assert not info.fallback and info.checksum == checksum
        assert conn.wait_closed(10)
        assert mib(pair, pair.a, "MPTcpExtDataCsumErr") == 0
        assert mib(pair, pair.a, "MPTcpExtMPCapableFallbackSYNACK") == 0
        check_trace(pair, [pcap], [st])


def test_user_to_user_with_checksum(pair):
    pcap = pair.capture(pair.a, "va0")
    data = os.urandom(500_000)
    with Stack(pair.b, record=True) as server, Stack(pair.a, record=True, checksum=True) as client:
        lst = server.listen(6000)
        box = {}
        t = threading.Thread(target=lambda: box.update(r=serve_sha(lst.accept(timeout=5))), daemon=True)
        t.start()
        conn = client.connect(("10.0.0.2", 6000), timeout=5)
        conn.send(data)
        conn.close()
        answer = conn.recv(100, timeout=20)
        t.join(20)
        assert box["r"] == (len(data), hashlib.sha256(data).hexdigest())
        assert answer == box["r"][1].encode()
        assert conn.info().checksum
        check_trace(pair, [pcap], [server, client])


def test_connect_to_a_silent_port_fails_in_one_line(pair):
    # Nothing listens on 10.0.0.2:5999 in B: the kernel answers the SYN with a RST.
    with Stack(pair.a) as st:
        with pytest.raises(StackError, match="refused"):
            st.connect(("10.0.0.2", 5999), timeout=3)
        with pytest.raises(StackError, match="timed out"):
            st.connect(("10.0.0.9", 5000), timeout=0.5)   # nobody answers ARP


def shape(pair: Pair, pid: int, dev: str, mbit: int) -> None:
    """HTB rate limit on dev's egress (so the scheduler has to use both paths)."""
    pair.sh(pid, f"tc qdisc add dev {dev} root handle 1: htb default 1 && "
                 f"tc class add dev {dev} parent 1: classid 1:1 htb rate {mbit}mbit ceil {mbit}mbit && "
                 f"tc qdisc add dev {dev} parent 1:1 handle 10: pfifo limit 100")


def test_user_client_two_paths_10mb_to_kernel(pair):
    for dev in ("va0", "va1"):
        shape(pair, pair.a, dev, 40)
    pcaps = [pair.capture(pair.a, "va0"), pair.capture(pair.a, "va1")]
    t, result = kernel_server(pair)
    data = os.urandom(10_000_000)
    with Stack(pair.a, record=True) as st:
        started = time.monotonic()
        conn = st.connect(("10.0.0.2", 5000), paths=A_ADDRS, timeout=5)
        subs = conn.info().subflows
        assert [s.join for s in subs] == [False, True] and all(s.fully_established for s in subs)
        conn.send(data, timeout=60)
        conn.close()
        answer = conn.recv(100, timeout=60)
        elapsed = time.monotonic() - started
        t.join(10)
        assert answer.decode() == hashlib.sha256(data).hexdigest(), result
        info = conn.info()
        per_path = {s.local[0]: s.bytes_acked for s in info.subflows + info.closed_subflows}
        assert all(b > 2_000_000 for b in per_path.values()), per_path
        # 2 x 40 Mbit/s: 10 MB in ~1 s if both paths are used, > 2 s on one
        assert elapsed < 2.0, f"{elapsed:.2f} s for 10 MB over 2 x 40 Mbit/s"
        assert mib(pair, pair.b, "MPTcpExtMPJoinAckRx") == 1
        assert conn.wait_closed(10)
        kinds = []
        while (ev := st.next_event(0.01)) is not None:
            kinds.append(ev.kind)
        assert kinds[:3] == ["created", "established", "sf_established"] and kinds[-1] == "closed"
        check_trace(pair, pcaps, [st])


def test_kernel_client_joins_user_server(pair):
    for dev in ("va0", "va1"):
        shape(pair, pair.a, dev, 40)
    pcaps = [pair.capture(pair.a, "va0"), pair.capture(pair.a, "va1")]
    data = os.urandom(10_000_000)
    with Stack(pair.b, record=True) as st:
        lst = st.listen(5000)
        t, result = kernel_client(pair, data, extra_endpoint="10.0.1.1")
        conn = lst.accept(timeout=5)
        n, sha = serve_sha(conn, timeout=30)
        t.join(30)
        assert "error" not in result, result
        assert n == len(data) and sha == hashlib.sha256(data).hexdigest()
        assert result["answer"] == sha.encode()
        info = conn.info()
        subs = info.subflows + info.closed_subflows
        assert sorted(s.join for s in subs) == [False, True]
        assert all(s.bytes_received > 2_000_000 for s in subs), [s.bytes_received for s in subs]
        assert mib(pair, pair.a, "MPTcpExtMPJoinSynAckRx") == 1
        check_trace(pair, pcaps, [st])


def test_backup_path_carries_no_data_while_the_other_works(pair):
    shape(pair, pair.a, "va0", 20)
    pcaps = [pair.capture(pair.a, "va0"), pair.capture(pair.a, "va1")]
    t, result = kernel_server(pair)
    data = os.urandom(2_000_000)
    with Stack(pair.a, record=True) as st:
        conn = st.connect(("10.0.0.2", 5000), paths=A_ADDRS, backup=["10.0.1.1"], timeout=5)
        conn.send(data, timeout=30)
        conn.close()
        assert conn.recv(100, timeout=30).decode() == hashlib.sha256(data).hexdigest()
        info = conn.info()
        subs = {s.local[0]: s for s in info.subflows + info.closed_subflows}
        assert subs["10.0.1.1"].backup and subs["10.0.1.1"].bytes_sent == 0
        assert subs["10.0.0.1"].bytes_sent >= len(data)
        check_trace(pair, pcaps, [st])


def blackhole(pair: Pair, pid: int, dev: str) -> None:
    """Drop every packet arriving on dev (a link that silently died)."""
    pair.sh(pid, f"nft add table netdev mptb_fail && nft add chain netdev mptb_fail in "
                 f"'{{ type filter hook ingress device {dev} priority 0; }}' && "
                 f"nft add rule netdev mptb_fail in drop")


def test_link_failure_mid_transfer_reinjects_and_data_is_intact(pair):
    for dev in ("va0", "va1"):
        shape(pair, pair.a, dev, 40)
    pcaps = [pair.capture(pair.a, "va0"), pair.capture(pair.a, "va1")]
    t, result = kernel_server(pair)
    data = os.urandom(10_000_000)
    with Stack(pair.a, record=True) as st:
        conn = st.connect(("10.0.0.2", 5000), paths=A_ADDRS, timeout=5)
        sender = threading.Thread(target=lambda: (conn.send(data, timeout=60), conn.close()), daemon=True)
        sender.start()
        deadline = time.monotonic() + 10
        while conn.info().bytes_sent < 3_000_000 and time.monotonic() < deadline:
            time.sleep(0.01)
        # path 1 dies in both directions while data is in flight on it
        in_flight = {s.local[0]: s.inflight for s in conn.info().subflows}
        blackhole(pair, pair.a, "va1")
        blackhole(pair, pair.b, "vb1")
        answer = conn.recv(100, timeout=60)
        sender.join(5)
        t.join(10)
        assert answer.decode() == hashlib.sha256(data).hexdigest(), result
        assert result["n"] == len(data)
        assert in_flight["10.0.1.1"] > 0, in_flight
        info = conn.info()
        dead = [s for s in info.subflows + info.closed_subflows if s.local[0] == "10.0.1.1"][0]
        assert dead.timeouts >= 1
        check_trace(pair, pcaps, [st])


def strip_mptcp(pair: Pair, pid: int, hooks=("output", "prerouting")) -> None:
    """A middlebox that removes the MPTCP option (turned into NOPs) from every packet."""
    cmds = ["nft add table ip mptb_strip"]
    for hook in hooks:
        cmds.append(f"nft add chain ip mptb_strip {hook} '{{ type filter hook {hook} priority -400; }}'")
        cmds.append(f"nft add rule ip mptb_strip {hook} tcp option mptcp exists reset tcp option mptcp")
    pair.sh(pid, " && ".join(cmds))


def test_option_stripping_user_client_falls_back(pair):
    strip_mptcp(pair, pair.b)
    pcap = pair.capture(pair.a, "va0")
    t, result = kernel_server(pair)
    data = os.urandom(1_000_000)
    with Stack(pair.a, record=True) as st:
        conn = st.connect(("10.0.0.2", 5000), timeout=5)
        assert conn.info().fallback
        conn.send(data)
        conn.close()
        assert conn.recv(100, timeout=20).decode() == hashlib.sha256(data).hexdigest()
        assert conn.recv(100, timeout=10) == b""
        t.join(10)
        assert result["n"] == len(data)
        assert conn.wait_closed(10)
        # after the fallback the stack sends no MPTCP option at all
        assert all(not any(type(o).__module__.endswith("options") for o in s.segment.options)
                   for s in st.sent[1:])
        check_trace(pair, [pcap], [st])


def test_option_stripping_user_server_falls_back(pair):
    strip_mptcp(pair, pair.a)   # the kernel client's namespace: both directions
    pcap = pair.capture(pair.a, "va0")
    data = os.urandom(1_000_000)
    with Stack(pair.b, record=True) as st:
        lst = st.listen(5000)
        t, result = kernel_client(pair, data)
        conn = lst.accept(timeout=5)
        n, sha = serve_sha(conn)
        t.join(20)
        assert "error" not in result, result
        assert n == len(data) and result["answer"] == sha.encode() == hashlib.sha256(data).hexdigest().encode()
        assert conn.info().fallback
        # the kernel client fell back too: its SYN/ACK came without MP_CAPABLE
        assert mib(pair, pair.a, "MPTcpExtMPCapableFallbackSYNACK") == 1
        check_trace(pair, [pcap], [st])


def test_user_to_user_fallback_when_both_directions_are_stripped(pair):
    strip_mptcp(pair, pair.a, hooks=("output",))
    strip_mptcp(pair, pair.b, hooks=("output",))
    pcap = pair.capture(pair.a, "va0")
    data = os.urandom(300_000)
    with Stack(pair.b) as server, Stack(pair.a) as client:
        lst = server.listen(6000)
        box = {}
        th = threading.Thread(target=lambda: box.update(c=lst.accept(timeout=5)), daemon=True)
        th.start()
        conn = client.connect(("10.0.0.2", 6000), timeout=5)
        th.join(5)
        assert conn.info().fallback and box["c"].info().fallback
        conn.send(data)
        conn.close()
        got = bytearray()
        while chunk := box["c"].recv(1 << 16, timeout=10):
            got += chunk
        assert bytes(got) == data
        # the middlebox rewrote what both stacks sent: only dissection health is comparable
        check_trace(pair, [pcap], [], ports=(6000,))


def test_abort_sends_mp_fastclose_and_kernel_resets(pair):
    pcap = pair.capture(pair.a, "va0")
    t, result = kernel_server(pair)
    with Stack(pair.a, record=True) as st:
        conn = st.connect(("10.0.0.2", 5000), timeout=5)
        conn.send(b"x" * 10000)
        time.sleep(0.2)
        conn.abort()
        t.join(10)
        assert "error" in result and "Reset" in result["error"], result
        assert mib(pair, pair.b, "MPTcpExtMPFastcloseRx") == 1
        with pytest.raises(StackError, match="aborted"):
            conn.send(b"more")
        check_trace(pair, [pcap], [st])


def test_kernel_fastclose_resets_the_user_connection(pair):
    def make():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 5000))
        s.listen()
        s.settimeout(10)
        return s

    srv = in_ns(pair.b, make)
    pcap = pair.capture(pair.a, "va0")
    with Stack(pair.a, record=True) as st:
        conn = st.connect(("10.0.0.2", 5000), timeout=5)
        c, _ = srv.accept()
        conn.send(b"unread data makes Linux close with MP_FASTCLOSE")
        time.sleep(0.2)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        c.close()
        srv.close()
        with pytest.raises(StackError, match="reset by peer"):
            while conn.recv(100, timeout=5):
                pass
        assert mib(pair, pair.b, "MPTcpExtMPFastcloseTx") == 1
        check_trace(pair, [pcap], [st])


def test_cli_send_to_cli_listen_over_two_paths(pair):
    import json
    import sys
    cmd = [sys.executable, "-m", "testbed.stack"]
    server = subprocess.Popen(cmd + ["--netns", str(pair.b), "--timeout", "10", "listen", "7000"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)   # listening before the SYN: otherwise the kernel of B resets it
        client = subprocess.run(cmd + ["--netns", str(pair.a), "send", "10.0.0.2", "7000", "--bytes", "2M",
                                       "--paths", ",".join(A_ADDRS)], capture_output=True, text=True, timeout=60)
        assert client.returncode == 0, client.stderr
        out, err = server.communicate(timeout=30)
        assert server.returncode == 0, err
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    sent, got = json.loads(client.stdout), json.loads(out)
    assert sent["bytes"] == got["bytes"] == 2_000_000 and sent["sha256"] == got["sha256"]
    assert len(sent["info"]["subflows"] + sent["info"]["closed_subflows"]) == 2
    bad = subprocess.run(cmd + ["--netns", str(pair.a), "send", "10.0.0.2", "7001"], capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: connection refused (RST)"
