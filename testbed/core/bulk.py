"""A quick in-process bulk transfer between client and server namespaces.

Used by the demo and by functional tests: two threads, one MPTCP (or TCP)
connection, goodput measured on the receiver over a window that skips the
slow-start warm-up. Experiments use the full workloads in testbed/harness/workload.
"""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

from testbed.base.errors import TestbedError
from testbed.mptcp import sockopt

CHUNK = 64 * 1024


@dataclass
class BulkResult:
    goodput_mbit: float
    seconds: float
    bytes: int
    path_goodput_mbit: dict[str, float] = field(default_factory=dict)
    subflows: int = 0  # extra subflows reported by MPTCP_INFO (0 = only the initial one)
    protocol: str = "mptcp"


def bulk_transfer(tb, seconds: float = 6.0, warmup: float = 2.0, protocol: str = "mptcp",
                  cc: str = "cubic", port: int = 5201) -> BulkResult:
    """Client sends to server for `seconds`; goodput over [warmup, seconds]."""
    if seconds <= warmup:
        raise TestbedError(f"bulk transfer: seconds ({seconds}) must exceed warmup ({warmup})")
    # Wildcard bind: a join to an address the server announced (ADD_ADDR) is
    # matched against a listener on that address, not the initial one.
    listener = tb.in_ns(tb.server, lambda: sockopt.listener(port, "0.0.0.0", protocol, cc, 1))
    client = tb.in_ns(tb.client, lambda: sockopt.mptcp_socket(cc, protocol))
    client.settimeout(10)
    received = {"n": 0}
    marks: dict[str, int] = {}
    stop = threading.Event()

    def receive() -> None:
        conn, _ = listener.accept()
        conn.settimeout(2)
        buf = bytearray(CHUNK)
        try:
            while True:
                n = conn.recv_into(buf)
                if n == 0:
                    break
                received["n"] += n
        except (TimeoutError, OSError):
            pass
        finally:
            conn.close()

    rx = threading.Thread(target=receive, daemon=True)
    rx.start()
    try:
        client.connect((tb.server_addr, port))
    except OSError as exc:
        listener.close()
        client.close()
        raise TestbedError(f"bulk transfer: connect to {tb.server_addr}:{port} failed: {exc}") from None

    def send() -> None:
        data = b"\x5a" * CHUNK
        try:
            while not stop.is_set():
                client.sendall(data)
        except OSError:
            pass

    tx = threading.Thread(target=send, daemon=True)
    start = time.monotonic()
    tx.start()
    time.sleep(warmup)
    marks["bytes0"], t0, if0 = received["n"], time.monotonic(), tb.interface_bytes()
    time.sleep(seconds - warmup)
    marks["bytes1"], t1, if1 = received["n"], time.monotonic(), tb.interface_bytes()
    subflows = _subflows(client) if protocol == "mptcp" else 0
    stop.set()
    client.close()
    tx.join(5)
    rx.join(5)
    listener.close()
    window = t1 - t0
    per_path = {name: (if1[name]["tx_bytes"] - if0[name]["tx_bytes"]) * 8 / window / 1e6
                for name in if0}
    return BulkResult(goodput_mbit=(marks["bytes1"] - marks["bytes0"]) * 8 / window / 1e6,
                      seconds=time.monotonic() - start, bytes=received["n"],
                      path_goodput_mbit=per_path, subflows=subflows, protocol=protocol)


def _subflows(sock: socket.socket) -> int:
    try:
        return sockopt.mptcp_info(sock).subflows  # additional subflows beyond the initial one
    except OSError:
        return 0  # fell back to TCP
