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
import re
import socket
import statistics
import struct
import subprocess
import threading
import time
from typing import Any

from testbed.model import LinkParams

TCP_CONGESTION = getattr(socket, "TCP_CONGESTION", 13)
PING_RE = re.compile(rb"icmp_seq=(\d+) .*time=([\d.]+) ms")


# ---- measurement helpers (shared with the benchmark) ---------------------
def ns_run(pid: int, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a short command in pid's network namespace; killed at the timeout."""
    return subprocess.run(["mnexec", "-a", str(pid), *argv], capture_output=True, timeout=timeout)


def ping_rtts(pid: int, dst: str, count: int, interval: float = 0.01, src: str | None = None,
              size: int = 56, warmup: bool = True) -> dict[str, Any]:
    """Ping `count` times; RTT statistics (ms). A short warm-up ping run first
    resolves ARP: otherwise every ping sent during the resolution (one RTT)
    waits in the neighbour queue and inflates the statistics."""
    src_args = ["-I", src] if src else []
    if warmup:
        ns_run(pid, ["ping", "-n", "-c", "3", "-i", "0.05", "-W", "2", *src_args, dst], 10)
    argv = ["ping", "-n", "-c", str(count), "-i", f"{interval:g}", "-s", str(size), "-W", "5",
            *src_args, dst]
    out = ns_run(pid, argv, count * interval + 15).stdout
    rtts = [float(m.group(2)) for m in PING_RE.finditer(out)]
    return rtt_summary(rtts, sent=count)


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
    from testbed.netns import run_in_netns

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
        box["conn"] = conn
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
            box["conn"] = None
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
                except socket.timeout:
                    continue
        except OSError as exc:
            box.setdefault("error", f"sender: {exc}")
        finally:
            connected.set()

    connected = threading.Event()
    stop_at[0] = time.monotonic() + duration + 10  # refined once connected
    rx = threading.Thread(target=receive, daemon=True)
    rx.start()
    tx = threading.Thread(target=send, daemon=True)
    tx.start()
    connected.wait(15)
    t0 = box.get("t0", time.monotonic())
    stop_at[0] = t0 + duration
    # Goodput from the receiving kernel's own counter (tcpi_bytes_received),
    # read at the window's edges: it does not depend on when the receiving
    # thread got the CPU (reading timestamps in the app overestimated the rate
    # by up to 6 % when the receiver lagged at the window's start).
    marks = []
    for t_mark in (t0 + warmup, t0 + duration - 0.05):
        time.sleep(max(0.0, t_mark - time.monotonic()))
        marks.append((time.monotonic(), _bytes_received(box.get("conn"))))
    tx.join(15)
    ssock.close()
    rx.join(15)
    lsock.close()
    (ta, ba), (tb_, bb) = marks
    if ba is not None and bb is not None and tb_ > ta:
        return {"goodput_mbit": (bb - ba) * 8 / (tb_ - ta) / 1e6, "seconds": tb_ - ta, "cc": cc,
                "source": "tcp_info"}
    samples = [(t, b) for t, b in box["samples"] if t <= t0 + duration]
    after = [(t, b) for t, b in samples if t >= t0 + warmup]
    if len(after) < 2:
        return {"goodput_mbit": math.nan, "error": box.get("error", "no data received")}
    (ta, ba), (tb_, bb) = after[0], after[-1]
    return {"goodput_mbit": (bb - ba) * 8 / (tb_ - ta) / 1e6 if tb_ > ta else math.nan,
            "seconds": tb_ - ta, "cc": cc, "source": "app"}


TCPI_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received (u64) in struct tcp_info


def _bytes_received(conn: socket.socket | None) -> int | None:
    if conn is None or conn.proto == socket.IPPROTO_MPTCP:
        return None
    try:
        raw = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return None
    if len(raw) < TCPI_BYTES_RECEIVED + 8:
        return None
    return struct.unpack_from("=Q", raw, TCPI_BYTES_RECEIVED)[0]


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
            "rtt_min_ms": rtt["min_ms"], "pings": rtt["n"], "rtt_tolerance_ms": tol,
        }
        if rtt["n"] < max(5, n // 10):
            entry["rtt_ok"] = False
            problems.append(f"{p.name}: only {rtt['n']} of {n} pings answered")
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
