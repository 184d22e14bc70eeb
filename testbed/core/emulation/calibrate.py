"""Calibration at the start of an experiment: does each path do what it says?

    result = calibrate(tb)            # a few seconds; stored with the results
    if not result["valid"]:
        print("run INVALID:", result["reason"])

Per path (client address -> the path's far address, so only that path's
emulator is crossed): the idle RTT by ping against up + down delay, and the
goodput of one TCP flow (cubic) against the configured rate. Goodput of a
full-size TCP segment is at most 1448/1514 = 95.6 % of the HTB rate (HTB counts
Ethernet frames), so the default rate tolerance accepts 90-101 % of the rate.
The rate check is skipped for paths with loss (a lossy path cannot be filled
by one TCP flow: that is the configuration, not an emulation error).
"""
from __future__ import annotations

import math
import os
import socket
import statistics
import struct
import subprocess
import threading
import time
from typing import Any

from testbed.core.model import LinkParams

TCP_CONGESTION = getattr(socket, "TCP_CONGESTION", 13)


# ---- measurement helpers (shared with the benchmark) ---------------------
def ns_run(pid: int, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a short command in pid's network namespace; killed at the timeout."""
    return subprocess.run(["mnexec", "-a", str(pid), *argv], capture_output=True, timeout=timeout)


SO_TIMESTAMPNS = 35
_icmp_ids = iter(range(0x4000 + os.getpid() % 0x3000, 0x10000))


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping_rtts(pid: int, dst: str, count: int, interval: float = 0.01, src: str | None = None,
              size: int = 56, warmup: bool = True, timeout: float = 3.0) -> dict[str, Any]:
    """ICMP echo `count` times from pid's namespace; RTT statistics in ms.

    Our own prober, because ping prints per-packet times with 0.1 ms (>= 10 ms)
    or 1 ms (>= 100 ms) resolution, truncated: useless for a 0.3 ms target.
    Replies are timed by the kernel (SO_TIMESTAMPNS); the send time is read
    right before sendto() and a sample is dropped if sendto() took > 0.2 ms
    (the thread lost the CPU or the GIL in between). The far end's kernel
    answers, no application there. A warm-up echo first resolves ARP:
    otherwise every probe sent during the resolution (one RTT) waits in the
    neighbour queue and inflates the statistics."""
    from testbed.base.netns import run_in_netns

    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        if src:
            s.bind((src, 0))
        return s

    sock = run_in_netns(pid, make)
    ident = next(_icmp_ids) & 0xFFFF
    payload = bytes(max(0, size))
    packets = []
    n_warm = 3 if warmup else 0
    for seq in range(n_warm + count):
        hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq & 0xFFFF)
        csum = _icmp_checksum(hdr + payload)
        packets.append(struct.pack("!BBHHH", 8, 0, csum, ident, seq & 0xFFFF) + payload)
    sent_ns = [0] * len(packets)
    bad = bytearray(len(packets))
    rx_ns = [0] * len(packets)
    done = threading.Event()

    def receive() -> None:
        sock.settimeout(0.05)
        deadline = None
        while True:
            if done.is_set():
                deadline = deadline or time.monotonic() + timeout
                if time.monotonic() > deadline or all(rx_ns[n_warm:]):
                    return
            try:
                data, anc, _flags, _addr = sock.recvmsg(2048, 64)
            except TimeoutError:
                continue
            except OSError:
                return
            ihl = (data[0] & 0x0F) * 4
            if len(data) < ihl + 8:
                continue
            typ, _code, _c, rid, rseq = struct.unpack_from("!BBHHH", data, ihl)
            if typ != 0 or rid != ident or rseq >= len(packets):
                continue
            ts = None
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", cdata[:16])
                    ts = sec * 1_000_000_000 + nsec
            rx_ns[rseq] = ts or time.time_ns()

    rx = threading.Thread(target=receive, daemon=True)
    rx.start()
    addr = (dst, 0)
    try:
        for i in range(n_warm):  # one at a time, each answered (or 1 s)
            sent_ns[i] = time.time_ns()
            sock.sendto(packets[i], addr)
            t_end = time.monotonic() + 1.0
            while not rx_ns[i] and time.monotonic() < t_end:
                time.sleep(0.001)
        t_next = time.monotonic()
        for i in range(n_warm, len(packets)):
            t_next += interval
            t_before = time.time_ns()
            try:
                sock.sendto(packets[i], addr)
            except OSError:
                bad[i] = 1
            if time.time_ns() - t_before > 200_000:
                bad[i] = 1
            sent_ns[i] = t_before
            while True:
                left = t_next - time.monotonic()
                if left <= 0:
                    break
                time.sleep(left if left > 0.0003 else 0)
    finally:
        done.set()
        rx.join(timeout + 5)
        sock.close()
    rtts = [(rx_ns[i] - sent_ns[i]) / 1e6 for i in range(n_warm, len(packets))
            if rx_ns[i] and not bad[i]]
    out = rtt_summary(rtts, sent=count)
    out["answered"] = sum(1 for i in range(n_warm, len(packets)) if rx_ns[i])
    out["discarded"] = sum(bad[n_warm:])
    return out


def rtt_summary(rtts: list[float], sent: int) -> dict[str, Any]:
    if not rtts:
        return {"n": 0, "sent": sent, "mean_ms": math.nan, "p50_ms": math.nan,
                "p99_ms": math.nan, "min_ms": math.nan, "max_ms": math.nan}
    s = sorted(rtts)
    return {"n": len(s), "sent": sent, "mean_ms": statistics.fmean(s),
            "p50_ms": s[len(s) // 2], "p99_ms": s[min(len(s) - 1, math.ceil(0.99 * len(s)) - 1)],
            "min_ms": s[0], "max_ms": s[-1]}


def tcp_goodput(src_pid: int, dst_pid: int, src_addr: str | None, dst_addr: str,
                duration: float = 2.0, warmup: float = 0.5, port: int = 5399,
                cc: str = "cubic", mptcp: bool = False) -> dict[str, Any]:
    """One bulk TCP (or MPTCP) flow src -> dst for `duration` s; goodput (Mbit/s)
    measured at the receiver after `warmup` s."""
    from testbed.base.netns import run_in_netns

    proto = socket.IPPROTO_MPTCP if mptcp else socket.IPPROTO_TCP

    def listener() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((dst_addr, port))
        s.listen(1)
        return s

    def sender() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
        s.setsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, cc.encode())
        if src_addr:
            s.bind((src_addr, 0))
        return s

    lsock = run_in_netns(dst_pid, listener)
    ssock = run_in_netns(src_pid, sender)
    box: dict[str, Any] = {"samples": []}
    stop_at = [0.0]

    def receive() -> None:
        lsock.settimeout(10)
        try:
            conn, _ = lsock.accept()
        except OSError as exc:
            box["error"] = f"accept: {exc}"
            return
        conn.settimeout(2)
        buf = bytearray(1 << 20)
        total = 0
        samples = box["samples"]
        try:
            while True:
                n = conn.recv_into(buf)
                if not n:
                    break
                total += n
                samples.append((time.monotonic(), total))
        except OSError:
            pass
        finally:
            conn.close()

    def send() -> None:
        chunk = b"\0" * (256 << 10)
        try:
            ssock.settimeout(10)
            ssock.connect((dst_addr, port))
            box["t0"] = time.monotonic()
            connected.set()
            ssock.settimeout(1)
            while time.monotonic() < stop_at[0]:
                try:
                    ssock.send(chunk)
                except TimeoutError:
                    continue
        except OSError as exc:
            box.setdefault("error", f"sender: {exc}")
        finally:
            connected.set()
            ssock.close()

    connected = threading.Event()
    stop_at[0] = time.monotonic() + duration + 10  # refined once connected
    rx = threading.Thread(target=receive, daemon=True)
    rx.start()
    tx = threading.Thread(target=send, daemon=True)
    tx.start()
    connected.wait(15)
    t0 = box.get("t0", time.monotonic())
    stop_at[0] = t0 + duration
    # Goodput from the sender's kernel counter tcpi_bytes_acked, read at the
    # window's edges while the connection is in the Open state (no SACKed
    # holes): independent of when the receiving thread got the CPU, and not
    # skewed by a loss recovery that releases a window's worth of out-of-order
    # data at once (both made short windows read up to 6 % above the rate).
    marks = []
    for t_mark in (t0 + warmup, t0 + duration - 0.6):
        time.sleep(max(0.0, t_mark - time.monotonic()))
        marks.append(_acked_when_open(ssock, 0.5))
    tx.join(15)
    rx.join(15)
    lsock.close()
    (ta, ba), (tb_, bb) = marks
    if ba is not None and bb is not None and tb_ > ta:
        return {"goodput_mbit": (bb - ba) * 8 / (tb_ - ta) / 1e6, "seconds": tb_ - ta, "cc": cc,
                "source": "tcpi_bytes_acked"}
    samples = [(t, b) for t, b in box["samples"] if t <= t0 + duration]
    after = [(t, b) for t, b in samples if t >= t0 + warmup]
    if len(after) < 2:
        return {"goodput_mbit": math.nan, "error": box.get("error", "no data received")}
    (ta, ba), (tb_, bb) = after[0], after[-1]
    return {"goodput_mbit": (bb - ba) * 8 / (tb_ - ta) / 1e6 if tb_ > ta else math.nan,
            "seconds": tb_ - ta, "cc": cc, "source": "app"}


TCPI_CA_STATE = 1  # offsets in struct tcp_info
TCPI_BYTES_ACKED = 120


def _acked_when_open(sock: socket.socket, patience: float) -> tuple[float, int | None]:
    """(time, tcpi_bytes_acked) at the first moment within `patience` s the
    sender is in TCP_CA_Open; bytes None for MPTCP sockets or on errors."""
    if sock.proto == socket.IPPROTO_MPTCP:
        return time.monotonic(), None
    end = time.monotonic() + patience
    while True:
        try:
            raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        except OSError:
            return time.monotonic(), None
        now = time.monotonic()
        if len(raw) < TCPI_BYTES_ACKED + 8:
            return now, None
        if raw[TCPI_CA_STATE] == 0 or now >= end:
            return now, struct.unpack_from("=Q", raw, TCPI_BYTES_ACKED)[0]
        time.sleep(0.0005)


def has_loss(p: LinkParams) -> bool:
    return bool(p.loss_pct or (p.gilbert is not None and p.gilbert.mean_loss_pct() > 0))


# ---- calibration ------------------------------------------------------------
def calibrate(tb: Any, rtt_tol_pct: float = 5.0, rtt_tol_ms: float = 1.0,
              rate_low: float = 0.90, rate_high: float = 1.01, pings: int = 50,
              flow_s: float = 2.0, measure_rate: bool = True) -> dict[str, Any]:
    """Measure every path against its configuration; see the module docstring.
    Returns a JSON-able dict with per-path numbers, `valid` and `reason`."""
    t_start = time.monotonic()
    far = tb.router or tb.server
    paths: dict[str, Any] = {}
    problems: list[str] = []
    for i, p in enumerate(tb.paths):
        link = p.link
        up, down = link.up, link.down
        cfg_rtt = up.delay_ms + down.delay_ms
        lossy = has_loss(up) or has_loss(down)
        n = pings if not lossy else pings * 3
        rtt = ping_rtts(tb.client.pid, p.addr.far, n, interval=0.01, src=p.addr.client)
        tol = max(cfg_rtt * rtt_tol_pct / 100, rtt_tol_ms) + up.jitter_ms + down.jitter_ms
        entry: dict[str, Any] = {
            "rtt_configured_ms": cfg_rtt, "rtt_mean_ms": rtt["mean_ms"], "rtt_p99_ms": rtt["p99_ms"],
            "rtt_min_ms": rtt["min_ms"], "pings": n, "answered": rtt["answered"], "rtt_tolerance_ms": tol,
        }
        if rtt["answered"] < max(5, n // 10) or rtt["n"] < 5:
            entry["rtt_ok"] = False
            problems.append(f"{p.name}: only {rtt['answered']} of {n} pings answered")
        else:
            entry["rtt_ok"] = abs(rtt["mean_ms"] - cfg_rtt) <= tol
            if not entry["rtt_ok"]:
                problems.append(f"{p.name}: RTT {rtt['mean_ms']:.2f} ms, configured {cfg_rtt:g} ms "
                                f"(tolerance {tol:.2f} ms)")
        directions = [("up", up)] + ([("down", down)] if down.rate_mbit != up.rate_mbit else [])
        for d, params in directions:
            key = f"rate_{d}"
            if not measure_rate or params.rate_mbit is None:
                entry[key] = {"skipped": "rate not measured" if not measure_rate else "unshaped"}
                continue
            if lossy:
                entry[key] = {"skipped": "path has loss: one TCP flow cannot fill it"}
                continue
            src, dst = (tb.client, far) if d == "up" else (far, tb.client)
            saddr, daddr = (p.addr.client, p.addr.far) if d == "up" else (p.addr.far, p.addr.client)
            g = tcp_goodput(src.pid, dst.pid, saddr, daddr, duration=flow_s,
                            warmup=min(0.5 + 4 * cfg_rtt / 1000, flow_s / 2), port=5300 + i)
            ratio = g["goodput_mbit"] / params.rate_mbit
            ok = rate_low <= ratio <= rate_high
            entry[key] = {"configured_mbit": params.rate_mbit, "goodput_mbit": g["goodput_mbit"],
                          "ratio": ratio, "ok": ok}
            if not ok:
                problems.append(f"{p.name} {d}: goodput {g['goodput_mbit']:.2f} Mbit/s = "
                                f"{ratio:.1%} of {params.rate_mbit:g} (accepted "
                                f"{rate_low:.0%}-{rate_high:.0%})")
        paths[p.name] = entry
    return {
        "valid": not problems,
        "reason": "; ".join(problems) or None,
        "backend": tb.backend.name,
        "tolerance": {"rtt_pct": rtt_tol_pct, "rtt_ms": rtt_tol_ms, "rate_low": rate_low,
                      "rate_high": rate_high},
        "paths": paths,
        "duration_s": round(time.monotonic() - t_start, 2),
    }
