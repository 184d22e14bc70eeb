"""The subflow rate-limit option (SRL) on the wire (root): a user-space stack receiver on the
two-path topology (2 x 20 Mbit/s) asks its user-space stack sender to cap the lte subflow;
the sender's pacing holds lte near the rate and moves the rest of the data to wifi, and
rate 0 stops new data on lte. (What an unmodified kernel does with SRL: the conformance
case module tools/conformance/cases/rate_limit.py.)"""
from __future__ import annotations

import contextlib
import threading
import time

import pytest

from testbed.core.net import Testbed
from testbed.core.topology import load
from testbed.stack import Stack, StackError

PORT = 5301
RATE_MBIT = 20


def _received(conn, laddr: str) -> int:
    return sum(sf.bytes_received for sf in conn.info().subflows if sf.local[0] == laddr)


class Transfer:
    """A bulk transfer from a user-stack server to a user-stack client over both paths."""

    def __init__(self, tb: Testbed, server: Stack, client: Stack):
        self.paths = {p.name: p.addr.client for p in tb.all_paths}
        self.listener = server.listen(PORT)
        self.conn = client.connect((tb.server_addr, PORT), [self.paths["wifi"], self.paths["lte"]])
        self.peer = self.listener.accept(5)
        self.stop = threading.Event()
        self.sender = threading.Thread(target=self._send, daemon=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.total = 0
        self.sender.start()
        self.reader.start()

    def _send(self) -> None:
        chunk = b"x" * 65536
        with contextlib.suppress(StackError):      # the test's abort ends it
            while not self.stop.is_set():
                self.peer.send(chunk, timeout=5)

    def _read(self) -> None:
        with contextlib.suppress(StackError):
            while not self.stop.is_set():
                self.total += len(self.conn.recv(1 << 20, timeout=5))

    def rates(self, seconds: float) -> dict[str, float]:
        """Mbit/s per path (bytes its subflow received) and in total (delivered) over seconds."""
        lte0, wifi0, tot0, t0 = (_received(self.conn, self.paths["lte"]), _received(self.conn, self.paths["wifi"]),
                                 self.total, time.monotonic())
        time.sleep(seconds)
        dt = time.monotonic() - t0
        return {"lte": (_received(self.conn, self.paths["lte"]) - lte0) * 8 / dt / 1e6,
                "wifi": (_received(self.conn, self.paths["wifi"]) - wifi0) * 8 / dt / 1e6,
                "total": (self.total - tot0) * 8 / dt / 1e6}

    def close(self) -> None:
        self.stop.set()
        self.conn.abort()


@pytest.mark.root
@pytest.mark.timeout(90)
def test_receiver_caps_lte_and_the_sender_paces_it():
    with Testbed(load("two-path", rate_mbit=RATE_MBIT, wifi_delay_ms=10, lte_delay_ms=20)) as tb, \
            Stack(netns=tb.server.pid) as server, Stack(netns=tb.client.pid) as client:
        t = Transfer(tb, server, client)
        try:
            time.sleep(2)
            before = t.rates(1.5)
            assert before["lte"] > 5, before        # both paths carry data before the request
            assert t.conn.request_rate_limit(t.paths["lte"], 2000) == 1
            time.sleep(2)                            # what was queued on lte drains
            capped = t.rates(3)
            (lte_sf,) = [s for s in t.peer.info().subflows if s.remote[0] == t.paths["lte"]]
            assert lte_sf.rate_limit_enforced_kbps == 2000
            assert abs(capped["lte"] - 2) <= 0.5, capped                  # within +-25 % of 2 Mbit/s
            assert capped["total"] >= 0.8 * (capped["wifi"] + 2), capped
            assert capped["total"] >= 0.8 * (0.9 * RATE_MBIT + 2), capped  # wifi takes the rest
            t.conn.request_rate_limit(t.paths["lte"], 0)
            time.sleep(1.5)
            stopped = t.rates(2)
            assert stopped["lte"] < 0.05 and stopped["total"] > 0.7 * RATE_MBIT, stopped
        finally:
            t.close()
