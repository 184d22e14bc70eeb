"""bench.rate-limit: how well the user-space stack's sender holds a subflow at the rate its
peer asked for with the subflow rate-limit option (SRL), by pacing (token bucket) and by
cwnd clamping (inflight <= rate x srtt). Two-path topology, 2 x 20 Mbit/s, 10/20 ms one
way; a bulk download from a user-stack server to a user-stack client, which asks for lte
to be capped at R two seconds in. Measured at the receiver (its lte subflow's bytes,
sampled every 50 ms): lte's rate over the last seconds against R (target within
+-25 %), the time until every 0.5 s bin stays within +-25 % of R (convergence), the
largest 50 ms bin over R (burstiness), and the total goodput."""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

from testbed.core.net import Testbed
from testbed.core.topology import load
from testbed.stack import Stack, StackError
from testbed.stack.rate_limit import MODES

PORT = 5301
RATE_MBIT = 20
BAND = 0.25          # accuracy target and convergence band: within +-25 % of R
SAMPLE_S = 0.05


class UserTransfer:
    """A bulk download from a user-stack server to a user-stack client over both paths of a
    two-path testbed; the client's per-path received bytes and delivered total."""

    def __init__(self, tb: Testbed, server: Stack, client: Stack, port: int = PORT):
        self.paths = {p.name: p.addr.client for p in tb.all_paths}
        self.listener = server.listen(port)
        self.conn = client.connect((tb.server_addr, port), [self.paths["wifi"], self.paths["lte"]])
        self.peer = self.listener.accept(5)
        self.stop = threading.Event()
        self.total = 0
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._send, self._read)]
        for t in self._threads:
            t.start()

    def _send(self) -> None:
        chunk = b"x" * 65536
        with contextlib.suppress(StackError):      # close() aborts the connection
            while not self.stop.is_set():
                self.peer.send(chunk, timeout=5)

    def _read(self) -> None:
        with contextlib.suppress(StackError):
            while not self.stop.is_set():
                self.total += len(self.conn.recv(1 << 20, timeout=5))

    def received(self, path: str) -> int:
        """Bytes the client's subflows from path's address received so far."""
        return sum(sf.bytes_received for sf in self.conn.info().subflows if sf.local[0] == self.paths[path])

    def rates(self, seconds: float) -> dict[str, float]:
        """Mbit/s per path (its subflows' received bytes) and in total (delivered) over seconds."""
        lte0, wifi0, tot0, t0 = self.received("lte"), self.received("wifi"), self.total, time.monotonic()
        time.sleep(seconds)
        dt = time.monotonic() - t0
        return {"lte": (self.received("lte") - lte0) * 8 / dt / 1e6,
                "wifi": (self.received("wifi") - wifi0) * 8 / dt / 1e6,
                "total": (self.total - tot0) * 8 / dt / 1e6}

    def close(self) -> None:
        """Stop both ends (the connection is aborted)."""
        self.stop.set()
        self.conn.abort()


def two_path() -> Testbed:
    """The two-path testbed both the bench and the wire test use."""
    return Testbed(load("two-path", rate_mbit=RATE_MBIT, wifi_delay_ms=10, lte_delay_ms=20))


def measure(mode: str, rate_kbit: float, before_s: float = 2.0, after_s: float = 6.0) -> dict[str, Any]:
    """One download with the request at before_s; lte's samples every 50 ms until after_s later."""
    target = rate_kbit / 1000
    with two_path() as tb, Stack(netns=tb.server.pid, rate_limit_enforcement=mode) as server, \
            Stack(netns=tb.client.pid) as client:
        t = UserTransfer(tb, server, client)
        try:
            time.sleep(before_s)
            t.conn.request_rate_limit(t.paths["lte"], rate_kbit)
            t0, total0 = time.monotonic(), t.total
            samples = [(0.0, t.received("lte"))]
            while (now := time.monotonic() - t0) < after_s:
                time.sleep(SAMPLE_S)
                samples.append((time.monotonic() - t0, t.received("lte")))
            goodput = (t.total - total0) * 8 / (time.monotonic() - t0) / 1e6
        finally:
            t.close()
    def rate(a: int, b: int) -> float:
        return (samples[b][1] - samples[a][1]) * 8 / (samples[b][0] - samples[a][0]) / 1e6
    last = next(i for i, (ts, _) in enumerate(samples) if ts >= after_s - 3)
    steady = rate(last, len(samples) - 1)
    per_bin = max(1, round(0.5 / SAMPLE_S))
    bins = [(samples[i][0], rate(i, i + per_bin)) for i in range(0, len(samples) - per_bin, per_bin)]
    outside = [ts for ts, r in bins if abs(r - target) > BAND * target]
    converged = 0.0 if not outside else next((ts + 0.5 for ts, _ in bins if ts > outside[-1]), None)
    burst = max(rate(i, i + 1) for i in range(last, len(samples) - 1))
    return {"mode": mode, "target_mbit": target, "lte_mbit": steady, "error": steady / target - 1,
            "converged_s": converged, "burst_x": burst / target, "goodput_mbit": goodput}


def run(rate_kbit: float = 2000.0, modes: tuple[str, ...] = MODES) -> tuple[str, bool]:
    """Measure every enforcement mode; the report (measured vs target) and whether all met it."""
    lines = [f"bench.rate-limit: lte capped at {rate_kbit / 1000:g} Mbit/s of {RATE_MBIT} by SRL "
             f"(two-path, 10/20 ms; target: lte within +-{BAND:.0%} over the last 3 s)"]
    ok = True
    for mode in modes:
        m = measure(mode, rate_kbit)
        hit = abs(m["error"]) <= BAND
        ok &= hit
        conv = "never" if m["converged_s"] is None else f"{m['converged_s']:.1f} s"
        lines.append(f"  {mode:7s} lte {m['lte_mbit']:.3f} Mbit/s ({m['error']:+.1%}, "
                     f"{'ok' if hit else 'MISSED'}), converged after {conv}, largest 50 ms bin "
                     f"{m['burst_x']:.1f} x R, total goodput {m['goodput_mbit']:.2f} Mbit/s")
    return "\n".join(lines), ok
