"""Benchmark of the link-emulation backends against the targets of issue 3.

For every usable backend and every (rate, one-way delay) of the grid
(10/100/1000 Mbit/s x 0/10/50 ms; a Linux bridge only where no delay is asked),
on a single path client -> emulator -> router -> server:

  rtt idle       ICMP echo every 2 ms (our prober: kernel receive timestamps, us
                 resolution), mean and p99 vs 2 x delay
  rtt load       the same while iperf3 sends UDP at 80 % of the rate client -> server
  goodput        one TCP flow (cubic), receiver side, after a warm-up
  loss           the path set live to 1 % random loss on "up", 10 000 UDP packets
                 counted at the server, vs the 99 % binomial interval
  cpu            the user-space forwarder's CPU (from /proc/<pid>/stat) while the
                 TCP flow runs, in % of one core
plus one row at 20 Mbit/s / 10 ms for the "<= 25 % of a core at 20 Mbit/s" target.

Timed link changes: every kind of change, applied repeatedly on a two-path
testbed; lateness vs schedule (target 1 ms) in <out>/emulation-events.csv.

Results go to <out>/emulation.csv and .parquet (+ emulation-meta.json with the
machine's load); the table and the target verdicts are printed.
"""
from __future__ import annotations

import json
import math
import os
import platform
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.stats import binomial_interval
from testbed.core import emulation
from testbed.core.events import EventSpec
from testbed.core.emulation.calibrate import ping_rtts, tcp_goodput
from testbed.core.net import Testbed
from testbed.base.netns import write_sysctl
from testbed.base.sockbuf import force_buffers
from testbed.core.topology import load

GRID_RATES = (10, 100, 1000)
GRID_DELAYS = (0, 10, 50)
CPU_ROW = (20, 10)
LOSS_PCT = 1.0
LOSS_PACKETS = 10_000
IPERF_PORT = 5201
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Host TCP buffers in the client and server namespaces (not the emulator): the
# defaults (16 MB max) cap one flow below 1 Gbit/s at 100 ms RTT.
TCP_BUFFERS = {"net.ipv4.tcp_rmem": "4096 131072 67108864",
               "net.ipv4.tcp_wmem": "4096 65536 67108864"}

TARGETS = {
    "rtt_mean": "mean RTT within max(2 %, 0.3 ms) of configured (idle; and at 80 % load at 100 Mbit/s)",
    "rtt_p99": "p99 RTT within 1 ms of configured at idle",
    "goodput": "one TCP flow: 93 % <= goodput/rate <= 101 %",
    "loss": "loss inside the 99 % binomial interval of 1 % over 10 000 packets",
    "fast": "userspace: >= 500 Mbit/s per direction on one core (1000 Mbit/s rows)",
    "cpu20": "userspace: <= 25 % of a core at 20 Mbit/s",
}


# ---- statistics -----------------------------------------------------------
def rtt_tolerance_ms(cfg_ms: float) -> float:
    """The benchmark's RTT tolerance for a configured RTT: 2 %, at least 0.3 ms."""
    return max(0.02 * cfg_ms, 0.3)


# ---- measurements -----------------------------------------------------------
def proc_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) a process has used; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def udp_loss(tb: Testbed, n: int = LOSS_PACKETS, pps: int = 5000, port: int = 5401) -> dict[str, Any]:
    """Send n numbered UDP datagrams client -> server, paced; count arrivals."""
    def rx_sock() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        force_buffers(s, rcvbuf=8 << 20)
        s.bind((tb.server_addr, port))
        s.settimeout(0.2)
        return s

    rx = tb.in_ns(tb.server, rx_sock)
    tx = tb.in_ns(tb.client, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    seen = bytearray(n)
    done = threading.Event()

    def receive() -> None:
        idle_after_done = 0
        while idle_after_done < 5:
            try:
                data = rx.recv(2048)
            except TimeoutError:
                if done.is_set():
                    idle_after_done += 1
                continue
            (seq,) = struct.unpack_from("!I", data)
            if seq < n:
                seen[seq] = 1

    th = threading.Thread(target=receive, daemon=True)
    th.start()
    payload = bytearray(64)
    burst = 10  # never more back to back: a late wake-up must not overflow the queue
    dst = (tb.server_addr, port)
    nxt = time.monotonic()
    for i in range(n):
        struct.pack_into("!I", payload, 0, i)
        tx.sendto(payload, dst)
        if i % burst == burst - 1:
            nxt = max(nxt + burst / pps, time.monotonic())  # late: no catching up
            delay = nxt - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    done.set()
    th.join(20)
    rx.close()
    tx.close()
    got = sum(seen)
    return {"sent": n, "received": got, "loss_pct": 100 * (n - got) / n}


def _iperf_udp(tb: Testbed, rate_mbit: float, seconds: float) -> subprocess.Popen:
    argv = ["iperf3", "-c", tb.server_addr, "-p",
            str(IPERF_PORT), "-u", "-b", f"{rate_mbit:g}M", "-l", "1400", "-t", f"{seconds:g}",
            "--pacing-timer", "100", "--json"]
    return tb.popen(tb.client, argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)


def rtt_under_load(tb: Testbed, rate_mbit: float, pings: int) -> dict[str, Any]:
    """Ping RTT while a UDP flow loads the path to 80 % of its rate."""
    ping_s = pings * 0.002
    proc = _iperf_udp(tb, 0.8 * rate_mbit, ping_s + 1.5)
    try:
        time.sleep(0.7)  # control connection + pacing settle
        rtt = ping_rtts(tb.client.pid, tb.server_addr, pings, interval=0.002, warmup=False)
        out, _ = proc.communicate(timeout=ping_s + 20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    load_mbit = math.nan
    try:
        summary = json.loads(out)["end"]["sum"]
        load_mbit = summary["bits_per_second"] / 1e6
        rtt["load_lost_pct"] = summary.get("lost_percent")
    except (ValueError, KeyError, TypeError):
        pass
    rtt["load_mbit"] = load_mbit
    return rtt


def measure_point(backend: str, rate: float, delay: float, quick: bool) -> dict[str, Any]:
    """One benchmark point (backend, rate, delay): idle/loaded RTT, goodput, CPU, loss."""
    pings = 500 if quick else 2000
    flow_s = 6.0 if quick else 12.0
    row: dict[str, Any] = {"backend": backend, "rate_mbit": rate, "delay_ms": delay,
                           "rtt_cfg_ms": 2 * delay}
    topo = load("n-path", n=1, rate_mbit=rate, delay_ms=delay)
    with Testbed(topo, backend=backend) as tb:
        for node in (tb.client, tb.server):  # one flow must be able to fill 1 Gbit/s x 100 ms
            write_sysctl(node.pid, TCP_BUFFERS)
        link = tb.paths[0].link
        fwd_pid = next(iter(tb.backend.pids()), None)  # one path: its forwarder, if any
        server = tb.popen(tb.server, ["iperf3", "-s", "-p", str(IPERF_PORT)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        idle = ping_rtts(tb.client.pid, tb.server_addr, pings, interval=0.002)
        row.update({"rtt_idle_mean_ms": idle["mean_ms"], "rtt_idle_p99_ms": idle["p99_ms"],
                    "rtt_idle_max_ms": idle["max_ms"], "rtt_idle_n": idle["n"],
                    "rtt_idle_answered": idle["answered"]})
        loaded = rtt_under_load(tb, rate, pings // 2)
        row.update({"rtt_load_mean_ms": loaded["mean_ms"], "rtt_load_p99_ms": loaded["p99_ms"],
                    "rtt_load_n": loaded["n"], "load_mbit": loaded["load_mbit"]})
        cpu0, t0 = (proc_cpu_s(fwd_pid) if fwd_pid else None), time.monotonic()
        g = tcp_goodput(tb.client.pid, tb.server.pid, None, tb.server_addr, duration=flow_s,
                        warmup=min(1.5 + 10 * 2 * delay / 1000, flow_s / 2))
        cpu1, t1 = (proc_cpu_s(fwd_pid) if fwd_pid else None), time.monotonic()
        row["goodput_mbit"] = g["goodput_mbit"]
        row["goodput_ratio"] = g["goodput_mbit"] / rate
        row["cpu_pct"] = (100 * (cpu1 - cpu0) / (t1 - t0)
                          if cpu0 is not None and cpu1 is not None else math.nan)
        stats0 = tb.backend.stats(link)["up"] if hasattr(tb.backend, "stats") else None
        if backend != "bridge":
            tb.apply_event(EventSpec(at_s=0, action="set_link", path=tb.paths[0].name, direction="up",
                                     changes={"loss_pct": LOSS_PCT}))
            q0 = tb.backend.stats(link)["up"]["drop_queue"] if stats0 is not None else 0
            loss = udp_loss(tb, pps=min(5000, int(rate * 1e6 / 8 / 106 * 0.4)))
            if stats0 is not None:  # any queue drop would falsify the loss figure
                row["loss_queue_drops"] = tb.backend.stats(link)["up"]["drop_queue"] - q0
            tb.apply_event(EventSpec(at_s=0, action="set_link", path=tb.paths[0].name, direction="up",
                                     changes={"loss_pct": 0}))
            lo, hi = binomial_interval(LOSS_PACKETS, LOSS_PCT / 100)
            lost = loss["sent"] - loss["received"]
            row.update({"loss_cfg_pct": LOSS_PCT, "loss_pct": loss["loss_pct"], "loss_packets": loss["sent"],
                        "loss_lo_pct": 100 * lo / LOSS_PACKETS, "loss_hi_pct": 100 * hi / LOSS_PACKETS,
                        "loss_ok": lo <= lost <= hi})
        if stats0 is not None:
            s = tb.backend.stats(link)
            row["fwd_late_mean_us"] = (s["up"]["late_mean_us"] + s["down"]["late_mean_us"]) / 2
            row["fwd_late_1ms"] = s["up"]["late_1ms"] + s["down"]["late_1ms"]
            row["fwd_drop_queue"] = s["up"]["drop_queue"] + s["down"]["drop_queue"]
            row["fwd_drop_rcvbuf"] = s["up"]["drop_rcvbuf"] + s["down"]["drop_rcvbuf"]
            row["fwd_loss_counted"] = s["up"]["drop_loss"] - stats0["drop_loss"]
        server.kill()
    return row


def event_timing(backend: str, rounds: int = 10) -> pd.DataFrame:
    """Apply every kind of timed link change `rounds` times while a two-path
    testbed idles; lateness of start and of the applied change vs schedule."""
    from testbed.core.emulation.events import EventScheduler
    from testbed.core.events import EventSpec

    def ev(at: float, action: str, path: str, kind: str, **kw: Any) -> tuple[str, EventSpec]:
        return kind, EventSpec(at_s=at, action=action, path=path, **kw)

    timed = []
    t = 0.2
    for i in range(rounds):
        timed += [ev(t, "set_link", "wifi", "set delay_ms", changes={"delay_ms": 10 + i}),
                  ev(t + 0.05, "set_link", "wifi", "set loss_pct", changes={"loss_pct": 1 + i % 2}),
                  ev(t + 0.10, "set_link", "wifi", "set rate_mbit", changes={"rate_mbit": 10 + i}),
                  ev(t + 0.15, "blackhole", "lte", "blackhole on", direction="up"),
                  ev(t + 0.20, "unblackhole", "lte", "blackhole off", direction="up"),
                  ev(t + 0.25, "link_down", "lte", "state down"),
                  ev(t + 0.35, "link_up", "lte", "state up")]
        t += 0.5
    events = [e for _, e in timed]
    with Testbed(load("two-path", rate_mbit=20), backend=backend) as tb:
        with EventScheduler(tb, events) as sched:
            time.sleep(t + 0.3)
    rows = []
    for (kind, _), r in zip(timed, sched.records):
        rows.append({"backend": backend, "kind": kind, "ok": r["ok"],
                     "start_lateness_ms": r["start_lateness_ms"],
                     "applied_lateness_ms": r["applied_lateness_ms"], "duration_ms": r["duration_ms"]})
    return pd.DataFrame(rows)


def format_events(ev: pd.DataFrame) -> str:
    """The timed-link-change results as a table with verdicts."""
    lines = ["Timed link changes (target: applied within 1 ms of schedule):",
             f"  {'backend':<9} {'change':<16} {'n':>3} {'start max':>9} {'applied p50':>11} "
             f"{'applied max':>11}  verdict"]
    for (backend, kind), g in ev.groupby(["backend", "kind"], sort=False):
        ok = bool(g["ok"].all()) and g["applied_lateness_ms"].max() <= 1.0
        lines.append(f"  {backend:<9} {kind:<16} {len(g):>3} {g['start_lateness_ms'].max():>9.3f} "
                     f"{g['applied_lateness_ms'].median():>11.3f} {g['applied_lateness_ms'].max():>11.3f}"
                     f"  {'PASS' if ok else 'FAIL'}")
    return "\n".join(lines)


def _verdicts(row: dict[str, Any]) -> dict[str, Any]:
    cfg = row["rtt_cfg_ms"]
    tol = rtt_tolerance_ms(cfg)
    v = {
        "rtt_idle_err_ms": row["rtt_idle_mean_ms"] - cfg,
        "rtt_idle_ok": abs(row["rtt_idle_mean_ms"] - cfg) <= tol,
        "rtt_p99_ok": row["rtt_idle_p99_ms"] - cfg <= 1.0,
        "rtt_load_err_ms": row["rtt_load_mean_ms"] - cfg,
        "rtt_load_ok": abs(row["rtt_load_mean_ms"] - cfg) <= tol,
        "goodput_ok": 0.93 <= row["goodput_ratio"] <= 1.01,
    }
    return v


def usable_backends(only: list[str] | None = None) -> dict[str, str | None]:
    """name -> None if usable, else the reason."""
    known = emulation.backends()
    out = {}
    for name in ("netem", "userspace", "bridge"):
        if only and name not in only:
            continue
        cls = known.get(name)
        out[name] = "not installed" if cls is None else cls.check()
    return out


def run_benchmark(out_dir: str | Path, quick: bool = False, backends: list[str] | None = None,
                  rates: tuple[float, ...] = GRID_RATES, delays: tuple[float, ...] = GRID_DELAYS,
                  progress: bool = True) -> pd.DataFrame:
    """Measure every grid point on every backend; the rows, also written as CSV."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"quick": quick, "tcp_buffers": TCP_BUFFERS, "kernel": platform.release(), "cpus": os.cpu_count(),
                            "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "backends": {}}
    rows = []
    for name, problem in usable_backends(backends).items():
        meta["backends"][name] = problem or "usable"
        if problem:
            if progress:
                print(f"[bench] {name}: skipped ({problem})", flush=True)
            continue
        points = [(r, d) for r in rates for d in delays]
        if name == "userspace" and CPU_ROW not in points:
            points.append(CPU_ROW)
        for rate, delay in points:
            if name == "bridge" and delay:
                continue  # the bridge cannot delay: it refuses such links
            t = time.monotonic()
            try:
                row = measure_point(name, rate, delay, quick)
                row.update(_verdicts(row))
            except Exception as exc:  # one broken point must not lose the others
                row = {"backend": name, "rate_mbit": rate, "delay_ms": delay,
                       "rtt_cfg_ms": 2 * delay, "error": f"{type(exc).__name__}: {exc}"}
            row["seconds"] = round(time.monotonic() - t, 1)
            rows.append(row)
            if progress:
                print(f"[bench] {name} {rate:g} Mbit/s {delay:g} ms: "
                      + (row.get("error") or
                         f"rtt {row['rtt_idle_mean_ms']:.3f}/{row['rtt_load_mean_ms']:.3f} ms, "
                         f"goodput {row['goodput_mbit']:.1f}, cpu {row.get('cpu_pct', math.nan):.0f} %")
                      + f" ({row['seconds']} s)", flush=True)
    ev_frames = []
    for name, problem in meta["backends"].items():
        if problem == "usable" and name != "bridge":
            try:
                ev_frames.append(event_timing(name, rounds=5 if quick else 20))
            except Exception as exc:  # noqa: BLE001 - reported, the table still gets written
                meta.setdefault("errors", []).append(f"event timing on {name}: {exc}")
    events = pd.concat(ev_frames, ignore_index=True) if ev_frames else pd.DataFrame()
    if len(events):
        events.to_csv(out / "emulation-events.csv", index=False)
        events.to_parquet(out / "emulation-events.parquet", index=False)
    meta["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    df = pd.DataFrame(rows)
    df.to_csv(out / "emulation.csv", index=False)
    df.to_parquet(out / "emulation.parquet", index=False)
    (out / "emulation-meta.json").write_text(json.dumps(meta, indent=1))
    if progress:
        print(format_report(df, meta))
        if len(events):
            print(format_events(events))
    return df


# ---- report -------------------------------------------------------------------
def _f(x: Any, fmt: str = ".2f") -> str:
    try:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)
    except (TypeError, ValueError):
        return str(x)


def format_report(df: pd.DataFrame, meta: dict[str, Any] | None = None) -> str:
    """The benchmark rows as a table: measured against configured, with verdicts."""
    lines = []
    hdr = (f"{'backend':<9} {'rate':>5} {'dly':>3} {'cfgRTT':>6} | {'idle':>7} {'err':>6} {'p99':>6} | "
           f"{'load':>7} {'err':>6} {'loadMb':>6} | {'goodput':>7} {'ratio':>6} | {'loss%':>5} "
           f"{'99%-int':>11} | {'cpu%':>4}")
    lines += [hdr, "-" * len(hdr)]
    for r in df.to_dict("records"):
        if r.get("error") and isinstance(r.get("error"), str):
            lines.append(f"{r['backend']:<9} {r['rate_mbit']:>5g} {r['delay_ms']:>3g}  ERROR {r['error']}")
            continue
        interval = (f"{_f(r.get('loss_lo_pct'))}-{_f(r.get('loss_hi_pct'))}"
                    if not pd.isna(r.get("loss_lo_pct", math.nan)) else "-")
        lines.append(
            f"{r['backend']:<9} {r['rate_mbit']:>5g} {r['delay_ms']:>3g} {r['rtt_cfg_ms']:>6g} | "
            f"{_f(r['rtt_idle_mean_ms'], '.3f'):>7} {_f(r['rtt_idle_err_ms'], '+.3f'):>6} "
            f"{_f(r['rtt_idle_p99_ms'], '.2f'):>6} | {_f(r['rtt_load_mean_ms'], '.3f'):>7} "
            f"{_f(r['rtt_load_err_ms'], '+.3f'):>6} {_f(r['load_mbit'], '.0f'):>6} | "
            f"{_f(r['goodput_mbit'], '.1f'):>7} {_f(r['goodput_ratio'], '.1%'):>6} | "
            f"{_f(r.get('loss_pct')):>5} {interval:>11} | {_f(r.get('cpu_pct'), '.0f'):>4}")
    lines.append("")
    lines.append("Targets (issue 3), measured:")
    for name in df["backend"].unique():
        d = df[(df["backend"] == name) & df.get("error", pd.Series(index=df.index)).isna()] \
            if "error" in df else df[df["backend"] == name]
        grid = d[d["rate_mbit"].isin(GRID_RATES)]
        lines.append(f"  [{name}]")

        def verdict(ok_series: pd.Series) -> str:
            ok_series = ok_series.dropna()
            if ok_series.empty:
                return "n/a"
            n_ok = int(ok_series.astype(bool).sum())
            return f"{'PASS' if n_ok == len(ok_series) else 'FAIL'} ({n_ok}/{len(ok_series)} points)"

        r100 = grid[grid["rate_mbit"] == 100]
        lines.append(f"    {TARGETS['rtt_mean']}:\n      idle all rates: {verdict(grid['rtt_idle_ok'])}; "
                     f"80 % load at 100 Mbit/s: {verdict(r100['rtt_load_ok'])}; "
                     f"worst idle error {_f(grid['rtt_idle_err_ms'].abs().max(), '.3f')} ms, "
                     f"worst load error @100 {_f(r100['rtt_load_err_ms'].abs().max(), '.3f')} ms")
        lines.append(f"    {TARGETS['rtt_p99']}: {verdict(grid['rtt_p99_ok'])}; worst p99 - cfg "
                     f"{_f((grid['rtt_idle_p99_ms'] - grid['rtt_cfg_ms']).max(), '.2f')} ms")
        lines.append(f"    {TARGETS['goodput']}: {verdict(grid['goodput_ok'])}; range "
                     f"{_f(grid['goodput_ratio'].min(), '.1%')}..{_f(grid['goodput_ratio'].max(), '.1%')}")
        if "loss_ok" in grid:
            lines.append(f"    {TARGETS['loss']}: {verdict(grid['loss_ok'])}")
        if name == "userspace":
            g1000 = grid[grid["rate_mbit"] == 1000]
            best = g1000["goodput_mbit"].max() if not g1000.empty else math.nan
            cpu = g1000["cpu_pct"].max() if not g1000.empty else math.nan
            ok = "PASS" if best >= 500 else "FAIL"
            lines.append(f"    {TARGETS['fast']}: {ok if not math.isnan(best) else 'n/a'}; best one-flow "
                         f"goodput at 1000 Mbit/s {_f(best, '.0f')} Mbit/s, forwarder CPU up to "
                         f"{_f(cpu, '.0f')} % (one process, both directions)")
            c20 = d[(d["rate_mbit"] == CPU_ROW[0]) & (d["delay_ms"] == CPU_ROW[1])]
            if not c20.empty:
                cpu20 = c20["cpu_pct"].iloc[0]
                lines.append(f"    {TARGETS['cpu20']}: {'PASS' if cpu20 <= 25 else 'FAIL'}; "
                             f"{_f(cpu20, '.1f')} % at {_f(c20['goodput_mbit'].iloc[0], '.1f')} Mbit/s")
    if meta:
        lines.append(f"  machine: {meta.get('cpus')} CPUs, load average at start "
                     f"{' '.join(meta.get('loadavg_start', []))}, at end "
                     f"{' '.join(meta.get('loadavg_end', []))} (numbers are noisy when loaded)")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--backend", action="append")
    a = ap.parse_args()
    run_benchmark(a.out, a.quick, a.backend)
