"""The one bulk-transfer engine's data loops (pure unit tests on a socketpair)."""
from __future__ import annotations

import hashlib
import socket
import threading
import time

from testbed.core import bulk


def test_send_stream_sends_exactly_nbytes_and_receive_stream_sees_every_byte():
    a, b = socket.socketpair()
    sent_hash, got_hash = hashlib.sha256(), hashlib.sha256()
    data = bytes(range(256)) * 1000
    pos = [0]

    def source(n: int) -> bytes:
        out = data[pos[0]:pos[0] + n]
        pos[0] += n
        return out

    got: list[int] = []
    rx = threading.Thread(target=lambda: got.append(bulk.receive_stream(b, got_hash.update)))
    rx.start()
    n = bulk.send_stream(a, source, nbytes=200_001, on_sent=sent_hash.update)
    a.shutdown(socket.SHUT_WR)
    rx.join(5)
    a.close()
    b.close()
    assert n == 200_001 and got == [200_001]
    assert sent_hash.hexdigest() == got_hash.hexdigest() == hashlib.sha256(data[:200_001]).hexdigest()


def test_send_stream_stops_at_its_deadline_and_receive_stream_at_its_limit():
    a, b = socket.socketpair()
    got: list[int] = []
    rx = threading.Thread(target=lambda: got.append(bulk.receive_stream(b)))
    rx.start()
    t0 = time.monotonic()
    sent = bulk.send_stream(a, bulk.filler, until=t0 + 0.2, stop=threading.Event())
    assert 0.2 <= time.monotonic() - t0 < 2
    a.shutdown(socket.SHUT_WR)
    rx.join(5)
    assert got == [sent] and sent > 0
    a.close()
    b.close()
    a, b = socket.socketpair()
    bulk.send_stream(a, bulk.filler, nbytes=50_000)
    assert bulk.receive_stream(b, limit=10_000) == 10_000
    a.close()
    b.close()
