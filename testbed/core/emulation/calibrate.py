"""Calibration at the start of an experiment: does each path do what it says?

    result = calibrate(tb)            # a few seconds; stored with the results
    if not result["valid"]:
        print("run INVALID:", result["reason"])

Per path (client address -> the server's address on the path, crossing every
link of the path): what the path should do is its links composed
(model.compose_path: one-way delays add, the slowest link's rate, losses
combine, jitters add), from each link's parameters as the testbed set them.
The idle RTT by ping is checked against the composed up + down delay, and the
goodput of one TCP flow (cubic) against the composed rate. Goodput of a
full-size TCP segment is at most 1448/1514 = 95.6 % of the HTB rate (HTB counts
Ethernet frames), so the default rate tolerance accepts 90-101 % of the rate.
The rate check is skipped for paths with loss (a lossy path cannot be filled
by one TCP flow: that is the configuration, not an emulation error).
"""
from __future__ import annotations

import json
import math
import os
import socket
import statistics
import struct
import threading
import time
from pathlib import Path
from typing import Any

from testbed.base.errors import TestbedError
from testbed.base.sockbuf import force_buffers
from testbed.core.bulk import run_flow
from testbed.core.emulation import fastpath
from testbed.core.model import LinkParams


# ---- measurement helpers (shared with the benchmark) ---------------------
SO_TIMESTAMPNS = 35  # not in Python 3.11's socket module
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
        force_buffers(s, rcvbuf=4 << 20)
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
    out["samples_ms"] = rtts  # for callers that decide how many more to take
    return out


def rtt_summary(rtts: list[float], sent: int) -> dict[str, Any]:
    """Count, mean, median, p99, min and max of RTT samples in ms (NaN when none)."""
    if not rtts:
        return {"n": 0, "sent": sent, "mean_ms": math.nan, "p50_ms": math.nan,
                "p99_ms": math.nan, "min_ms": math.nan, "max_ms": math.nan}
    s = sorted(rtts)
    return {"n": len(s), "sent": sent, "mean_ms": statistics.fmean(s),
            "p50_ms": s[len(s) // 2], "p99_ms": s[min(len(s) - 1, math.ceil(0.99 * len(s)) - 1)],
            "min_ms": s[0], "max_ms": s[-1]}


def tcp_goodput(src_pid: int, dst_pid: int, src_addr: str | None, dst_addr: str,
                duration: float = 2.0, warmup: float = 0.5, port: int = 5399,
                cc: str = "cubic", mptcp: bool = False, window: float | None = None) -> dict[str, Any]:
    """One bulk TCP (or MPTCP) flow src -> dst for `duration` s; goodput (Mbit/s)
    over [warmup, duration - 0.6] s (or [warmup, warmup + window] s, the flow
    ending at the last mark), from the sender's tcpi_bytes_acked read while the
    connection is in the Open state (the receiver's count for MPTCP)."""
    # run_flow keeps sending while it waits (up to 0.5 s) for the Open state to
    # read a mark, so the flow needs no tail after the last one.
    marks = [warmup, duration - 0.6] if window is None else [warmup, warmup + window]
    stop = duration if window is None else warmup + window
    try:
        flow = run_flow(src_pid, dst_pid, dst_addr, port, marks,
                        src_addr=src_addr, protocol="mptcp" if mptcp else "tcp", cc=cc,
                        stop_s=stop)
    except TestbedError as exc:
        return {"goodput_mbit": math.nan, "error": str(exc)}
    goodput = flow.goodput_mbit()
    if math.isnan(goodput):
        return {"goodput_mbit": math.nan, "error": flow.error or "no data received"}
    return {"goodput_mbit": goodput, "seconds": flow.marks[-1].t - flow.marks[0].t, "cc": cc,
            "source": flow.source}


def has_loss(p: LinkParams) -> bool:
    """True when the parameters lose packets (uniform or Gilbert-Elliott)."""
    return bool(p.loss_pct or (p.gilbert is not None and p.gilbert.mean_loss_pct() > 0))


# ---- calibration ------------------------------------------------------------
MIN_RTT_SAMPLES = 5
# How the RTT check decides how many pings it needs: rounds of pings (the first
# RTT_FIRST_PINGS, then doubling, at most `pings`, three times that on a lossy
# path) until the verdict cannot be a sampling accident: the mean's distance
# from the bound is at least RTT_CONFIDENCE_Z standard errors (two-sided
# 99.9 %). On an idle emulated path the samples spread by ~0.05 ms against a
# bound of >= 1 ms, so the first round decides; jitter widens the spread and
# the bound alike, and takes more rounds.
RTT_FIRST_PINGS = 16
RTT_INTERVAL_S = 0.002
RTT_CONFIDENCE_Z = 3.29
# The rate check's measured window: at 10-20 Mbit/s, 0.5 s is 400-800 full-size
# segments, so one segment more or less moves the ratio by <= 0.25 %, against
# a margin of >= 4 % on either side of the expected 95.6 %. Slower or longer
# paths get a longer window: at least RATE_WINDOW_SEGMENTS segments (one
# segment <= 1 % of the ratio) and RATE_WINDOW_RTTS round trips.
RATE_WINDOW_S = 0.5
RATE_WINDOW_SEGMENTS = 100
RATE_WINDOW_RTTS = 4
SEGMENT_BITS = 1500 * 8


def rate_window_s(rate_mbit: float, rtt_ms: float) -> float:
    """How long the quick rate check measures a path of this rate and RTT."""
    return max(RATE_WINDOW_S, RATE_WINDOW_SEGMENTS * SEGMENT_BITS / (rate_mbit * 1e6),
               RATE_WINDOW_RTTS * rtt_ms / 1000)


def path_ends(p: Any) -> tuple[str, str]:
    """Where a path is measured between: the client's address on it and the
    server's address it leads to (every link of the path is crossed, as the
    composed expectation assumes). The drift check pings the same ends."""
    return p.addr.client, p.graph.server_addr


def disjoint_groups(tb: Any) -> list[list[Any]]:
    """The testbed's paths in groups (greedy, in path order) whose members
    cross no emulated link in common: a group's paths are measured at once, no
    path's probe traffic queueing behind another's."""
    emulated = {link.name for link in tb.links}
    groups: list[tuple[set[str], list[Any]]] = []
    for p in tb.paths:
        links = {h.name for h in tb.graph.hops(p.graph) if h.name in emulated}
        for used, members in groups:
            if not used & links:
                used |= links
                members.append(p)
                break
        else:
            groups.append((links, [p]))
    return [members for _used, members in groups]


def rtt_decided(samples: list[float], configured: float, tol: float,
                z: float = RTT_CONFIDENCE_Z) -> bool:
    """Whether `samples` decide |mean - configured| <= tol: the mean lies at
    least z standard errors from either side of the bound."""
    if len(samples) < max(2, MIN_RTT_SAMPLES):
        return False
    half = z * statistics.stdev(samples) / math.sqrt(len(samples))
    return abs(abs(statistics.fmean(samples) - configured) - tol) >= half


def _ping_until_decided(tb: Any, p: Any, configured: float, tol: float, first: int,
                        most: int, interval: float) -> dict[str, Any]:
    """Rounds of pings on path p until rtt_decided (and enough were answered)
    or `most` were sent; the summary with `rounds` and `ci_half_ms`."""
    client_addr, server_addr = path_ends(p)
    # A reply later than this is out of tolerance anyway; waiting longer for a
    # lost one would only cost time (a path's neighbours are static: no ARP).
    timeout = max(0.2, 4 * (configured + tol) / 1000)
    samples: list[float] = []
    sent = answered = discarded = rounds = 0
    count = min(first, most)
    while count > 0:
        r = ping_rtts(tb.client.pid, server_addr, count, interval=interval, src=client_addr,
                      warmup=False, timeout=timeout)
        sent, rounds = sent + count, rounds + 1
        answered += r["answered"]
        discarded += r["discarded"]
        samples += r.get("samples_ms", [])
        if answered >= max(MIN_RTT_SAMPLES, sent // 10) and rtt_decided(samples, configured, tol):
            break
        count = min(sent, most - sent)
    out = rtt_summary(samples, sent)
    out.update(answered=answered, discarded=discarded, rounds=rounds,
               ci_half_ms=(RTT_CONFIDENCE_Z * statistics.stdev(samples) / math.sqrt(len(samples))
                           if len(samples) > 1 else math.nan))
    return out


def _at_once(jobs: dict[str, Any]) -> dict[str, Any]:
    """Run each job (a no-argument callable) in a thread of its own; their results by key."""
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def one(key: str, job: Any) -> None:
        try:
            results[key] = job()
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=kv, daemon=True) for kv in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def calibrate(tb: Any, rtt_tol_pct: float = 5.0, rtt_tol_ms: float = 1.0,
              rate_low: float = 0.90, rate_high: float = 1.01, pings: int = 50,
              flow_s: float = 2.0, measure_rate: bool = True, quick: bool = True) -> dict[str, Any]:
    """Measure every path against its configuration; see the module docstring.
    quick (the default): paths that share no emulated link measured at once,
    pings 2 ms apart until the verdict is decided (at most `pings`), 0.5 s rate
    windows; quick=False: the original one path at a time, all `pings` 10 ms
    apart and `flow_s` flows (the reference bench.calibration compares with).
    Returns a JSON-able dict with per-path numbers, `valid` and `reason`."""
    t_start = time.monotonic()
    paths: dict[str, Any] = {}
    problems: list[str] = []
    before = emulator_counters(tb)
    current = {link.name: (link.up, link.down) for link in tb.links}  # as the testbed set them
    groups = disjoint_groups(tb) if quick else [[p] for p in tb.paths]
    plan: dict[str, dict[str, Any]] = {}
    for i, p in enumerate(tb.paths):
        # The whole path, client to server: every link it crosses, composed.
        composed = tb.graph.composed(p.graph, current)
        emulated = [h.name for h in tb.graph.hops(p.graph) if h.name in current]
        cfg_rtt = composed.rtt_ms()
        up, down = composed.up, composed.down
        plan[p.name] = {
            "index": i, "composed": composed, "cfg_rtt": cfg_rtt,
            "lossy": has_loss(up) or has_loss(down),
            "where": f"{p.name} (emulated links {', '.join(emulated)})" if emulated != [p.name] else p.name,
            "tol": max(cfg_rtt * rtt_tol_pct / 100, rtt_tol_ms) + up.jitter_ms + down.jitter_ms}

    def rtt_job(p: Any) -> Any:
        pl = plan[p.name]
        most = pings if not pl["lossy"] else pings * 3
        if not quick:
            return lambda: _ping_until_decided(tb, p, pl["cfg_rtt"], pl["tol"], most, most, 0.01)
        return lambda: _ping_until_decided(tb, p, pl["cfg_rtt"], pl["tol"], RTT_FIRST_PINGS, most,
                                           RTT_INTERVAL_S)

    rtts: dict[str, dict[str, Any]] = {}
    for group in groups:
        rtts.update(_at_once({p.name: rtt_job(p) for p in group}))
    for p in tb.paths:
        pl, rtt = plan[p.name], rtts[p.name]
        composed, cfg_rtt, tol, where = pl["composed"], pl["cfg_rtt"], pl["tol"], pl["where"]
        n = rtt["sent"]
        entry: dict[str, Any] = {
            "links": list(composed.links), "composed": composed.model_dump(mode="json"),
            "rtt_configured_ms": cfg_rtt, "rtt_mean_ms": rtt["mean_ms"], "rtt_p99_ms": rtt["p99_ms"],
            "rtt_min_ms": rtt["min_ms"], "pings": n, "answered": rtt["answered"], "rtt_tolerance_ms": tol,
            "rtt_samples": rtt["n"], "rtt_rounds": rtt["rounds"], "rtt_ci_half_ms": rtt["ci_half_ms"],
        }
        need_answers = max(MIN_RTT_SAMPLES, n // 10)
        if rtt["answered"] < need_answers:
            entry["rtt_ok"] = False
            problems.append(f"{where}: {rtt['answered']} of {n} pings answered, "
                            f"need at least {need_answers}")
        elif rtt["n"] < MIN_RTT_SAMPLES:
            entry["rtt_ok"] = False
            problems.append(f"{where}: {rtt['n']} usable RTT samples of {rtt['answered']} answered "
                            f"pings ({rtt['discarded']} discarded: sending took over 0.2 ms), "
                            f"need at least {MIN_RTT_SAMPLES}")
        else:
            entry["rtt_ok"] = abs(rtt["mean_ms"] - cfg_rtt) <= tol
            if not entry["rtt_ok"]:
                problems.append(f"{where}: RTT {rtt['mean_ms']:.2f} ms, configured {cfg_rtt:g} ms "
                                f"(tolerance {tol:.2f} ms)")
        paths[p.name] = entry

    def rate_job(p: Any, d: str) -> Any:
        pl = plan[p.name]
        server = tb.node(p.graph.server)
        client_addr, server_addr = path_ends(p)
        src, dst = (tb.client, server) if d == "up" else (server, tb.client)
        saddr, daddr = (client_addr, server_addr) if d == "up" else (server_addr, client_addr)
        if not quick:
            return lambda: tcp_goodput(src.pid, dst.pid, saddr, daddr, duration=flow_s,
                                       warmup=min(0.5 + 4 * pl["cfg_rtt"] / 1000, flow_s / 2),
                                       port=5300 + pl["index"])
        # Slow start fills the path within ~log2(BDP / 10 segments) + 1 RTTs.
        params = pl["composed"].up if d == "up" else pl["composed"].down
        window = rate_window_s(params.rate_mbit, pl["cfg_rtt"])
        return lambda: tcp_goodput(src.pid, dst.pid, saddr, daddr,
                                   warmup=0.15 + 7 * pl["cfg_rtt"] / 1000, window=window,
                                   port=5300 + pl["index"])

    for d in ("up", "down"):  # one direction at a time: a flow's ACKs use the other
        for group in groups:
            jobs = {}
            for p in group:
                pl, entry = plan[p.name], paths[p.name]
                composed = pl["composed"]
                params = composed.up if d == "up" else composed.down
                if d == "down" and composed.down.rate_mbit == composed.up.rate_mbit:
                    continue
                key = f"rate_{d}"
                if not measure_rate or params.rate_mbit is None:
                    entry[key] = {"skipped": "rate not measured" if not measure_rate else "unshaped"}
                elif pl["lossy"]:
                    entry[key] = {"skipped": "path has loss: one TCP flow cannot fill it"}
                else:
                    jobs[p.name] = rate_job(p, d)
            for name, g in _at_once(jobs).items():
                composed = plan[name]["composed"]
                params = composed.up if d == "up" else composed.down
                ratio = g["goodput_mbit"] / params.rate_mbit
                ok = rate_low <= ratio <= rate_high
                paths[name][f"rate_{d}"] = {"configured_mbit": params.rate_mbit,
                                            "goodput_mbit": g["goodput_mbit"], "ratio": ratio, "ok": ok}
                if not ok:
                    problems.append(f"{plan[name]['where']} {d}: goodput {g['goodput_mbit']:.2f} "
                                    f"Mbit/s = {ratio:.1%} of {params.rate_mbit:g} (accepted "
                                    f"{rate_low:.0%}-{rate_high:.0%})")
    # Measuring paths at once must not cost the emulator its timing: judged as a run is.
    emulation = judge_run(before, emulator_counters(tb))
    if not emulation["valid"]:
        problems.append(f"emulator during the calibration: {emulation['reason']}")
    return {
        "valid": not problems,
        "reason": "; ".join(problems) or None,
        "backend": tb.backend.name,
        "quick": quick,
        "tolerance": {"rtt_pct": rtt_tol_pct, "rtt_ms": rtt_tol_ms, "rate_low": rate_low,
                      "rate_high": rate_high, "rtt_confidence_z": RTT_CONFIDENCE_Z},
        "groups": [[p.name for p in g] for g in groups],
        "paths": paths,
        "emulation": emulation,
        "duration_s": round(time.monotonic() - t_start, 2),
    }


# ---- the emulator during a run ---------------------------------------------------
# Stated tolerance, per link and direction, over the whole run: at most
# LATE_FRACTION_MAX of the forwarded packets may leave more than 1 ms after
# their deadline (the forwarder's late_1ms counter; up to LATE_PACKETS_FREE are
# always accepted, so one scheduling hiccup does not void a run of a few
# hundred packets), and no packet may be dropped for a reason the scenario did
# not configure (the configured ones are loss, the bottleneck queue and
# blackholes). Measured on this machine: ordinary runs stay below 0.06 %.
LATE_FRACTION_MAX = 0.001
LATE_PACKETS_FREE = 10
UNCONFIGURED_DROPS = {
    "drop_rcvbuf": "dropped by the kernel before the forwarder read them",
    "drop_sndbuf": "refused by the egress socket buffer",
    "drop_error": "lost to send errors",
}


def emulator_counters(tb: Any) -> dict[str, dict[str, Any]] | None:
    """The emulator's own counters per link now; None for a backend without
    them (netem reports no lateness)."""
    stats = getattr(tb.backend, "stats", None)
    if stats is None:
        return None
    return {link.name: stats(link) for link in tb.links}


def judge_run(before: dict[str, dict[str, Any]] | None,
              after: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """The counters' growth over a run against the stated tolerance; JSON-able,
    with `valid` and a `reason` naming each measured value and its bound."""
    tolerance = {"late_ms": 1.0, "late_fraction_max": LATE_FRACTION_MAX,
                 "late_packets_free": LATE_PACKETS_FREE, "unconfigured_drops_max": 0}
    if before is None or after is None:
        return {"valid": True, "judged": False, "reason": None, "tolerance": tolerance,
                "why": "the backend reports no per-packet counters"}
    links: dict[str, Any] = {}
    problems: list[str] = []
    for name, end in after.items():
        start = before.get(name, {})
        for d in ("up", "down"):
            e, b = end.get(d), start.get(d, {})
            if not isinstance(e, dict):
                continue
            delta = {k: e.get(k, 0) - b.get(k, 0) for k in ("tx", "late_1ms", *UNCONFIGURED_DROPS)}
            late_fraction = delta["late_1ms"] / delta["tx"] if delta["tx"] else 0.0
            links.setdefault(name, {})[d] = {**delta, "late_fraction": late_fraction,
                                             "late_max_us_since_start": e.get("late_max_us")}
            if late_fraction > LATE_FRACTION_MAX and delta["late_1ms"] > LATE_PACKETS_FREE:
                problems.append(f"{name} {d}: {delta['late_1ms']} of {delta['tx']} packets "
                                f"({late_fraction:.2%}) left more than 1 ms late (max "
                                f"{(e.get('late_max_us') or 0) / 1000:.1f} ms), bound "
                                f"{LATE_FRACTION_MAX:.1%}")
            for key, what in UNCONFIGURED_DROPS.items():
                if delta[key] > 0:
                    problems.append(f"{name} {d}: {delta[key]} packets {what} ({key}), bound 0")
    return {"valid": not problems, "judged": True, "reason": "; ".join(problems) or None,
            "tolerance": tolerance, "links": links}


# ---- this machine's emulation capacity -------------------------------------------
# Measured once by `./tb bench.capacity` (testbed/tools/bench/capacity.py): the
# highest aggregate configured rate at which the user-space forwarders, fully
# loaded by one MPTCP transfer over n-path (4 paths), still kept the run
# tolerance above. Cached in the project's .cache/ directory and trusted only
# on the same kernel, CPU count, Python and forwarder code (forwarder.py and
# its C fast path, fastpath.c).
CAPACITY_FILE = Path(__file__).resolve().parents[3] / ".cache" / "emulation-capacity.json"


def capacity_key() -> dict[str, Any]:
    """What a cached capacity depends on."""
    import hashlib
    import platform

    # the C part's identity is the fast path's own (the one its built library is named by)
    forwarder = (Path(__file__).with_name("forwarder.py").read_bytes()
                 + fastpath.source_digest(fastpath.SOURCE).encode())
    return {"kernel": platform.release(), "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "forwarder_sha256": hashlib.sha256(forwarder).hexdigest()[:16]}


def load_capacity(path: Path = CAPACITY_FILE) -> dict[str, Any] | None:
    """The cached measurement, or None when absent, unreadable or made on another setup."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != capacity_key():
        return None
    return data


def save_capacity(measured: dict[str, Any], path: Path = CAPACITY_FILE) -> None:
    """Cache a measurement (atomically) with the setup it holds for."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({**measured, "key": capacity_key()}, indent=1, sort_keys=True))
    os.replace(tmp, path)


def aggregate_rate_mbit(topology: Any) -> float | None:
    """What a topology asks the emulator to carry at most: per path the faster
    direction, summed; None when some path is unshaped (no bound)."""
    total = 0.0
    for p in topology.paths:
        rates = [p.direction(d).rate_mbit for d in ("up", "down")]
        if any(r is None for r in rates):
            return None
        total += max(rates)
    return total


def capacity_warning(topology: Any, backend: str, path: Path = CAPACITY_FILE) -> str | None:
    """One line when `topology` asks the user-space emulator for more aggregate
    rate than this machine measured it can carry in time; None otherwise."""
    if backend != "userspace":
        return None
    want = aggregate_rate_mbit(topology)
    cap = load_capacity(path)
    if want is None or cap is None or want <= cap["capacity_mbit"]:
        return None
    return (f"{topology.name}: {want:g} Mbit/s in all through the user-space link emulator, "
            f"this machine keeps time up to {cap['capacity_mbit']:g} Mbit/s (measured "
            f"{cap.get('measured', '?')} by ./tb bench.capacity): expect runs stored invalid")
