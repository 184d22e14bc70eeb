"""Where a conformance case runs: two fresh namespaces joined by one veth pair,
the scripted peer in one, a kernel MPTCP listener in the other.

The kernel side answers through packets (the scripted peer sees every one on
the wire) and through state: what its application read (data, EOF, a reset),
its MPTCP_INFO, the MPTcpExt MIB counters of its namespace and the path
manager's netlink events. Everything lives in namespaces this process made
and holds by descriptor (ScratchNetns): leaving the lab closes the sockets,
the peer's nftables table goes with its netlink socket, and the namespaces
with their last descriptor. Nothing outside them is touched.
"""
from __future__ import annotations

import errno
import socket
import threading
import time
from typing import Callable

from testbed.base.errors import TestbedError
from testbed.base.netns import ScratchNetns, run_command, write_sysctl
from testbed.mptcp.pm import PMEvent, PMEventListener
from testbed.mptcp.sockopt import IPPROTO_MPTCP, MptcpInfo, mptcp_info
from testbed.stack.scripted import ScriptedPeer

PEER_ADDR, KERNEL_ADDR = "10.231.0.1", "10.231.0.2"
PORT = 5201
# What every case's kernel namespace starts with: no blackhole detection state
# carried between attempts (the cases provoke what it reacts to).
BASE_SYSCTLS = {"net.mptcp.enabled": 1, "net.mptcp.blackhole_timeout": 0}


def fell_back(sock: socket.socket) -> bool:
    """Whether a kernel MPTCP socket's connection fell back to plain TCP. On a connection
    that fell back the kernel hands SOL_MPTCP getsockopt() to TCP, which refuses it
    (EOPNOTSUPP); before that, MPTCP_INFO's fallback flag says it."""
    try:
        return mptcp_info(sock).fallback
    except OSError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            return True
        raise


class KernelConnection:
    """One connection the kernel's listener accepted, and what its application saw."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.data = bytearray()
        self.eof = False
        self.error: str | None = None
        self._changed = threading.Condition()
        threading.Thread(target=self._read, name="conformance-reader", daemon=True).start()

    def _read(self) -> None:
        self.sock.settimeout(0.2)
        while True:
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError as exc:  # a reset, or the lab closed the socket
                with self._changed:
                    self.error = exc.strerror or str(exc)
                    self._changed.notify_all()
                return
            with self._changed:
                if not chunk:
                    self.eof = True
                else:
                    self.data += chunk
                self._changed.notify_all()
            if not chunk:
                return

    def wait(self, condition: Callable[["KernelConnection"], bool], timeout: float) -> bool:
        """Wait until condition(self) holds (checked whenever the application reads); its value."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not condition(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True

    def info(self) -> MptcpInfo:
        """The connection's MPTCP_INFO (fallback flag, subflow count, ...)."""
        return mptcp_info(self.sock)

    def fell_back(self) -> bool:
        """Whether the connection fell back to plain TCP (see fell_back())."""
        return fell_back(self.sock)

    def send(self, data: bytes) -> None:
        """Write data from the kernel side's application."""
        self.sock.sendall(data)


class KernelServer:
    """An MPTCP listener in the kernel namespace; accepted connections are read at once."""

    def __init__(self, lab_ns: ScratchNetns, addr: str, port: int):
        def listen() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr, port))
            s.listen(16)
            s.settimeout(0.1)
            return s

        self.sock = lab_ns.run(listen)
        self.connections: list[KernelConnection] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="conformance-accept", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections.append(KernelConnection(conn))

    def accepted(self, timeout: float = 1.0, index: int = 0) -> KernelConnection | None:
        """The index-th connection accepted, waiting up to timeout."""
        deadline = time.monotonic() + timeout
        while len(self.connections) <= index:
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.005)
        return self.connections[index]

    def close(self) -> None:
        """Stop accepting and close every socket."""
        self._stop.set()
        self._thread.join(2)
        for c in self.connections:
            c.sock.close()
        self.sock.close()


class Lab:
    """The scripted peer, a kernel MPTCP listener, and the kernel's counters and events.

        with Lab({"net.mptcp.checksum_enabled": 1}) as lab:
            conn = lab.peer.connect(lab.port)
            lab.counters()          # MPTcpExt* changes since the lab was built
    """

    def __init__(self, sysctls: dict[str, int | str] | None = None):
        self.sysctls = {**BASE_SYSCTLS, **(sysctls or {})}
        self.port = PORT
        self._close: list[Callable[[], object]] = []

    def __enter__(self) -> "Lab":
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        self.peer_ns = self._hold(ScratchNetns())
        self.kernel_ns = self._hold(ScratchNetns())
        self._ip(self.peer_ns, "link", "add", "cfp", "type", "veth", "peer", "name", "cfk",
                 "netns", self.kernel_ns.path)
        for ns, dev, addr in ((self.peer_ns, "cfp", PEER_ADDR), (self.kernel_ns, "cfk", KERNEL_ADDR)):
            self._ip(ns, "addr", "add", f"{addr}/24", "dev", dev)
            self._ip(ns, "link", "set", dev, "up")
            self._ip(ns, "link", "set", "lo", "up")
        write_sysctl(self.kernel_ns.path, self.sysctls)
        self.events = PMEventListener(self.kernel_ns.path).start()
        self._close.append(self.events.stop)
        self.server = KernelServer(self.kernel_ns, KERNEL_ADDR, self.port)
        self._close.append(self.server.close)
        self.peer = ScriptedPeer(self.peer_ns.path, PEER_ADDR, KERNEL_ADDR)
        self._close.append(self.peer.close)
        self._mib0 = self.mib()

    def _hold(self, ns: ScratchNetns) -> ScratchNetns:
        ns.__enter__()
        self._close.append(ns.__exit__)
        return ns

    @staticmethod
    def _ip(ns: ScratchNetns, *argv: str) -> None:
        res = run_command(ns.path, ["ip", *argv])
        if res.returncode != 0:
            raise TestbedError(f"ip {' '.join(argv)}: {res.stderr.strip()}")

    def mib(self) -> dict[str, int]:
        """The kernel namespace's MPTcpExt* counters now (/proc/net/netstat of its namespace)."""
        def read() -> str:
            with open("/proc/thread-self/net/netstat") as f:
                return f.read()

        lines = self.kernel_ns.run(read).splitlines()
        for names, values in zip(lines[::2], lines[1::2]):
            if names.startswith("MPTcpExt:"):
                return {"MPTcpExt" + k: int(v) for k, v in zip(names.split()[1:], values.split()[1:])}
        raise TestbedError("no MPTcpExt counters in /proc/net/netstat: is MPTCP built into this kernel?")

    def mark(self) -> None:
        """From now on, counters() reports changes from this moment (after a case's setup)."""
        self._mib0 = self.mib()

    def counters(self) -> dict[str, int]:
        """MPTcpExt* counters that changed since the lab was built (or the last mark()), with their change."""
        now = self.mib()
        return {k: v - self._mib0.get(k, 0) for k, v in now.items() if v != self._mib0.get(k, 0)}

    def pm_events(self, type_: str | None = None) -> list[PMEvent]:
        """The path manager's events in the kernel namespace so far (of one type, if given)."""
        return [e for e in self.events.events() if type_ is None or e.type == type_]

    def close(self) -> None:
        """Undo everything, last made first."""
        while self._close:
            fn = self._close.pop()
            try:
                fn()
            except Exception:  # noqa: BLE001 - the rest must still be closed
                pass

    def __exit__(self, *exc: object) -> None:
        self.close()
