"""A small synthetic results store in the documented format (docs/results.md).

For tests and demos only: nothing here is a measurement. The numbers follow the
mechanisms the real experiments exercise (Linux SYN schedule, RobE strategies,
failover stalls from this machine's prototype) so figures and the expectation
table look like they will on real data. Seeded: the same seed, the same store.

    .venv/bin/python -m analysis.synthetic /tmp/synth && ./tb report /tmp/synth
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# Linux: SYN+MP_CAPABLE at 0, 1, 2 s, then plain-TCP SYNs (notes/mptcp-linux.md)
SYN_TIMES = [0, 1, 2, 3, 4, 5, 7, 11, 19, 35, 67]
MP_SYNS = 3
SCENARIOS = ["healthy", "lossy10", "lossy30", "lossy50", "blackhole", "slow_default", "mptcp_drop"]
ROBE = ["tcp", "mptcp", "timer", "sim", "ips", "sim+ips", "timer+ips"]
TIMEOUT_S = 10.0
TIMER_S = 1.0
SLOW_DELAY_MS = 100.0


def _topology(rtts: dict[str, float], rates: dict[str, float]) -> dict[str, Any]:
    return {"name": "two-path", "default_path": "wifi", "server_side": "router",
            "paths": [{"name": n, "rate_mbit": rates[n], "delay_ms": rtts[n] / 2}
                      for n in rtts]}


def _calibration(rng: np.random.Generator, topo: dict[str, Any], bad: bool) -> dict[str, Any]:
    """Shaped like testbed.core.emulation.calibrate.calibrate()."""
    paths = {}
    for p in topo["paths"]:
        cfg = 2 * p["delay_ms"]
        mean = cfg + 0.18 + abs(rng.normal(0, 0.05)) + (0.8 * cfg + 2 if bad and p["name"] == "wifi" else 0)
        good = p["rate_mbit"] * rng.uniform(0.935, 0.955)
        paths[p["name"]] = {"rtt_configured_ms": cfg, "rtt_mean_ms": mean, "rtt_p99_ms": mean + 0.3,
                            "rtt_min_ms": mean - 0.1, "pings": 50, "rtt_tolerance_ms": max(cfg * 0.05, 1),
                            "rtt_ok": abs(mean - cfg) <= max(cfg * 0.05, 1),
                            "rate_up": {"configured_mbit": p["rate_mbit"], "goodput_mbit": good,
                                        "ratio": good / p["rate_mbit"], "ok": True}}
    reason = "; ".join(f"{n}: RTT {e['rtt_mean_ms']:.2f} ms, configured {e['rtt_configured_ms']:g} ms"
                       for n, e in paths.items() if not e["rtt_ok"])
    return {"valid": not reason, "reason": reason or None, "backend": "userspace",
            "tolerance": {"rtt_pct": 5.0, "rtt_ms": 1.0, "rate_low": 0.9, "rate_high": 1.01},
            "paths": paths, "duration_s": 4.1}


def _write_run(root: Path, exp: str, grid: dict[str, Any], rep: int, seed: int,
               metrics: dict[str, Any], tables: dict[str, pd.DataFrame], topo: dict[str, Any],
               status: str = "complete", reason: str = "", day: int = 0,
               exp_params: dict[str, Any] | None = None, calibrate: bool = True) -> None:
    """One run directory shaped like testbed.harness.runner.run_one() writes it."""
    phash = hashlib.sha256(json.dumps(grid, sort_keys=True).encode()).hexdigest()[:8]
    run_id = f"{phash}-r{rep:03d}"
    d = root / exp / run_id
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    params = dict(exp_params or {})
    params.update({k.removeprefix("params."): v for k, v in grid.items() if k.startswith("params.")})
    calib = _calibration(rng, topo, bad=status == "invalid") if calibrate else None
    start = pd.Timestamp("2025-11-26T08:00:00Z") + pd.Timedelta(days=day, seconds=seed % 5000)
    manifest = {
        "schema_version": 1, "experiment": exp, "run_id": run_id,
        "scenario": {"experiment": exp, "path": f"experiments/{exp}.toml", "repetitions": 4,
                     "topology": {"name": "two-path", "params": {}}, "params": params},
        "params": grid, "repetition": rep, "seed": seed, "status": status, "reason": reason,
        "git": {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": False,
                "describe": "0123456-synthetic"},
        "kernel": {"release": "6.18.0-synthetic", "version": "#1 SMP PREEMPT_DYNAMIC",
                   "mptcp_enabled": "1", "netem_module": False},
        "host": {"hostname": "synthetic", "cpus": 2, "machine": "x86_64", "python": "3.11.2"},
        "tools": {"iperf3": "iperf 3.12", "tshark": "TShark 4.0.17",
                  "python_packages": {"pandas": pd.__version__}},
        "testbed": {"topology": topo, "paths": [{"name": p["name"], "client_addr": f"10.0.{i}.1"}
                                                for i, p in enumerate(topo["paths"])],
                    "congestion_control": {"client": grid.get("hosts.client.congestion_control", "cubic")}},
        "emulation": {"backend": "userspace", "calibration": calib},
        "qdiscs": {}, "clock": {"t0_ns": 10**12, "monotonic_ns": 10**12, "realtime_ns": 1_764_144_000 * 10**9},
        "start": start.isoformat(), "end": (start + pd.Timedelta(seconds=12)).isoformat(), "duration_s": 12.0,
    }
    (d / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (d / "metrics.json").write_text(json.dumps(metrics if status != "failed" else {}))
    if status != "failed":
        for name, df in tables.items():
            df.to_parquet(d / f"{name}.parquet", index=False)


def _attempt(rng: np.random.Generator, rtt: float, loss: float, broken: bool,
             mp_dropped: bool, plain_after: int | None) -> tuple[float, bool, int]:
    """(completion time or inf, handshake was MPTCP, SYNs sent) for one path."""
    for i, t in enumerate(SYN_TIMES):
        if t >= TIMEOUT_S:
            return float("inf"), False, i
        mptcp = plain_after is None or i < plain_after
        ok = not broken and not (mptcp and mp_dropped) and rng.random() < (1 - loss) ** 2
        if ok:
            return t + rtt + abs(rng.normal(0.0003, 0.0002)), mptcp, i + 1
    return float("inf"), False, len(SYN_TIMES)


def _establishment(rng: np.random.Generator, scenario: str, strategy: str) -> tuple[dict, dict, pd.DataFrame]:
    rtt = {"wifi": 0.020, "lte": 0.040}
    if scenario == "slow_default":  # applied at run time: the manifest's topology still says 10 ms
        rtt = {"wifi": 2 * SLOW_DELAY_MS / 1000, "lte": 0.040}
    loss = {"wifi": int(scenario[5:]) / 100 if scenario.startswith("lossy") else 0.0, "lte": 0.0}
    broken = {"wifi": scenario == "blackhole", "lte": False}
    dropped = {"wifi": scenario == "mptcp_drop", "lte": False}

    def on(path: str, plain_after: int | None = MP_SYNS) -> tuple[float, bool, int]:
        return _attempt(rng, rtt[path], loss[path], broken[path], dropped[path], plain_after)

    base = strategy.replace("sim+ips", "ips").replace("timer+ips", "timer")
    first = "wifi"
    if "ips" in strategy:  # after warm-up, history steers away from a bad default path
        bad = scenario in ("blackhole", "slow_default", "mptcp_drop", "lossy30", "lossy50")
        first = "lte" if bad or (scenario == "lossy10" and rng.random() < 0.5) else "wifi"
    other = "lte" if first == "wifi" else "wifi"
    rsts = 0
    if base == "tcp":
        t, _, syns = on("wifi", plain_after=0)
        win, mp = "wifi", False
    elif base in ("mptcp", "ips"):
        t, mp, syns = on(first)
        win = first
    elif base == "timer":
        t, mp, syns = on(first, plain_after=None)
        win = first
        if t > TIMER_S:  # abort, fresh SYN+MP_CAPABLE on the next path
            t2, mp, s2 = on(other, plain_after=None)
            t, win, syns = TIMER_S + t2, other, min(syns, 2) + s2
    else:  # sim
        (tw, _, sw), (tl, _, sl) = on("wifi", None), on("lte", None)
        win, t, mp, syns, rsts = ("wifi", tw, True, sw + sl, 1) if tw <= tl else ("lte", tl, True, sw + sl, 1)
    loser = "lte" if win == "wifi" else "wifi"
    outcome = "failed" if not np.isfinite(t) else "tcp" if base == "tcp" else "mptcp" if mp else "fallback_tcp"
    multipath = float("nan")
    if outcome == "mptcp":
        tj, _, _ = on(loser, plain_after=None)
        if tj < TIMEOUT_S - t:
            multipath = t + tj
    setup = t if np.isfinite(t) else float("nan")
    m = {"setup_s": setup, "ttfb_s": setup + rtt[win] + 0.001 if np.isfinite(t) else float("nan"),
         "multipath_s": multipath, "outcome": outcome, "syns_sent": int(syns), "rsts_sent": rsts,
         "extra_handshakes": rsts, "winner_path": win if np.isfinite(t) else None}
    ev = [(0.0, "app", "client", "connect_start", None)]
    if np.isfinite(t):
        ev += [(setup, "pm", "client", "established", 1234), (setup + rtt[win], "app", "client", "first_byte", None)]
    if np.isfinite(multipath):
        ev.append((multipath, "pm", "client", "sub_established", 1234))
    events = pd.DataFrame(ev, columns=["t", "source", "host", "event", "token"]).assign(
        detail=lambda d: [json.dumps({"path": win}) for _ in range(len(d))])
    topo = _topology({"wifi": 20.0, "lte": 40.0}, {"wifi": 20, "lte": 20})
    return m, topo, events


def _failover(rng: np.random.Generator, fault: str, mode: str) -> tuple[dict, dict, dict[str, pd.DataFrame]]:
    dt, t_fault, dur = 0.1, 4.0, 10.0
    stall = rng.uniform(0.3, 0.6) if fault == "link_down" else rng.uniform(0.6, 1.2)
    recovery = stall + rng.uniform(0.5, 1.1)
    t = np.round(np.arange(dt, dur + dt / 2, dt), 3)
    wifi = np.where(t <= t_fault, 18.5 if mode == "normal" else 19.0, 0.0)
    lte_before = 17.5 if mode == "normal" else 0.1
    ramp = np.clip((t - t_fault - stall) / max(recovery - stall, 1e-3), 0, 1)
    lte = np.where(t <= t_fault, lte_before, np.where(t <= t_fault + stall, 0.0, 4 + 15.3 * ramp))
    rates = {"wifi": wifi, "lte": lte}
    rows = []
    for path, r in rates.items():
        noisy = np.clip(r * rng.normal(1, 0.03, len(t)), 0, None)
        rows += [(x, "server", "delivered_bytes", path, v * 1e6 / 8 * dt) for x, v in zip(t, noisy)]
    ts = pd.DataFrame(rows, columns=["t", "host", "series", "key", "value"])
    total = ts.groupby("t", as_index=False)["value"].sum().assign(host="server", series="delivered_bytes", key="total")
    ts = pd.concat([ts, total[ts.columns]], ignore_index=True)
    sub = []
    for i, path in enumerate(rates):
        acked = np.cumsum(ts[(ts.key == path)]["value"].to_numpy())
        name = f"10.0.{i}.1:4{i}000-10.9.0.1:5201"
        for x, a in zip(t, acked):
            alive = path != "wifi" or x <= t_fault
            sub.append((x, "client", name, path, int(40 + 10 * rng.random()),
                        int((20000 if path == "wifi" else 50000) + rng.normal(0, 800)), int(a),
                        0, int(0 if alive else 3), "ESTABLISHED" if alive else "CLOSE"))
    subflows = pd.DataFrame(sub, columns=["t", "host", "subflow", "path", "cwnd", "srtt_us", "bytes_acked",
                                          "bytes_received", "retrans", "state"])
    events = pd.DataFrame([(0.0, "app", "client", "transfer_start", None, "{}"),
                           (t_fault, "fault", "router", fault, None, json.dumps({"path": "wifi"}))],
                          columns=["t", "source", "host", "event", "token", "detail"])
    delivered = float(ts[ts.key == "total"]["value"].sum())
    m = {"stall_s": stall, "recovery_s": recovery, "recovered": True, "bytes": delivered,
         "goodput_mbit": delivered * 8 / dur / 1e6, "sha256_match": True, "fault_at_s": t_fault,
         "fault": fault, "failed_path": "wifi", "remaining_rate_mbit": 20.0}
    topo = _topology({"wifi": 20.0, "lte": 40.0}, {"wifi": 20, "lte": 20})
    return m, topo, {"timeseries": ts, "subflows": subflows, "events": events}


def _throughput(rng: np.random.Generator, rates: str, delays: str, cc: str) -> tuple[dict, dict, pd.DataFrame]:
    r = [float(x) for x in rates.split("/")]
    d = [float(x) for x in delays.split("/")]
    eff = np.clip(rng.normal(0.93 if d[0] == d[1] else 0.88, 0.015), 0.5, 0.99) - (0.03 if cc == "bbr" else 0)
    goodput = eff * sum(r)
    # the faster / shorter path carries slightly more than its rate share
    w = np.array(r) * np.array([1.0 + 0.05 * (d[1] - d[0]) / 25, 1.0])
    shares = w / w.sum()
    dur = 10.0
    ts = pd.DataFrame([(float(s), "server", "delivered_bytes", p, goodput * sh * 1e6 / 8 * rng.normal(1, 0.02))
                       for s in range(1, int(dur) + 1) for p, sh in zip(("wifi", "lte"), shares)],
                      columns=["t", "host", "series", "key", "value"])
    size = goodput * 1e6 / 8 * dur
    m = {"goodput_mbit": goodput, "sum_rates_mbit": sum(r), "best_path_mbit": max(r),
         "efficiency": goodput / sum(r), "paths": 2, "cc": cc, "transfer_s": dur,
         "ideal_transfer_s": size * 8 / (sum(r) * 1e6), "bytes": size,
         **{f"share.{p}": sh for p, sh in zip(("wifi", "lte"), shares)}}
    topo = _topology({"wifi": 2 * d[0], "lte": 2 * d[1]}, {"wifi": r[0], "lte": r[1]})
    return m, topo, ts


def _benchmark(rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for backend, overhead in (("forwarder", 0.18), ("bridge", 0.03)):
        for rate in (10, 50, 100, 500):
            for delay in (0, 5, 25, 50):
                if backend == "bridge" and delay:
                    continue  # the bridge backend cannot delay (no netem on this kernel)
                for loss in (0, 1, 5):
                    cfg = 2 * delay
                    load = cfg + overhead + (1500 * 8 * 20 / (rate * 1e6) * 1000 if rate < 100 else 0.3)
                    cpu = (100 if rate == 500 else rate / 5) * (1 if backend == "forwarder" else 0.1)
                    rows.append((backend, rate, delay, cfg, cfg + overhead + abs(rng.normal(0, 0.03)),
                                 load, rate * (0.955 if rate < 500 else 0.7) * (1 - loss / 100),
                                 loss, max(0, loss + rng.normal(0, 0.2 * max(loss, 0.1))), min(cpu, 100)))
    return pd.DataFrame(rows, columns=["backend", "rate_mbit", "delay_ms", "rtt_cfg_ms", "rtt_idle_ms",
                                       "rtt_load_ms", "goodput_mbit", "loss_cfg_pct", "loss_meas_pct", "cpu_pct"])


def generate(root: str | Path, reps: int = 4, seed: int = 1) -> Path:
    """Write a synthetic store below root (created); returns root."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = 0
    exp_params = {"timeout_s": TIMEOUT_S, "slow_delay_ms": SLOW_DELAY_MS, "warmup_trials": 3}
    for scenario in SCENARIOS:  # baseline and RobE strategies share experiment "establishment"
        for strategy in ROBE:
            for rep in range(reps):
                n += 1
                m, topo, ev = _establishment(rng, scenario, strategy)
                grid = {"params.scenario": scenario, "params.strategy": strategy}
                _write_run(root, "establishment", grid, rep, seed * 100_000 + n, m, {"events": ev},
                           topo, exp_params=exp_params, calibrate=False)
    for fault in ("link_down", "blackhole"):
        for backup in (False, True):
            for rep in range(reps):
                n += 1
                m, topo, tables = _failover(rng, fault, "backup" if backup else "normal")
                grid = {"events.0.action": fault, "topology.params.lte_backup": backup}
                _write_run(root, "failover", grid, rep, seed * 100_000 + n, m, tables, topo, day=1,
                           exp_params={"seconds": 10.0})
    for rates in ("10/10", "20/20", "15/5", "10/3"):
        for delays in ("0/0", "1/25"):
            for cc in ("cubic", "bbr"):
                for rep in range(reps):
                    n += 1
                    m, topo, ts = _throughput(rng, rates, delays, cc)
                    grid = {"topology.params.rates": [int(x) for x in rates.split("/")],
                            "topology.params.delays": [int(x) for x in delays.split("/")],
                            "hosts.client.congestion_control": cc}
                    _write_run(root, "throughput", grid, rep, seed * 100_000 + n, m, {"timeseries": ts},
                               topo, day=1, exp_params={"seconds": 10.0, "direction": "up"})
    # what the report must show as excluded: a crashed run and one that failed calibration
    m, topo, tables = _throughput(rng, "10/10", "0/0", "cubic")
    grid = {"topology.params.rates": [10, 10], "topology.params.delays": [0, 0],
            "hosts.client.congestion_control": "cubic"}
    _write_run(root, "throughput", grid, reps, seed * 100_000 + n + 1, m, {}, topo, day=1,
               status="failed", reason="TestbedError: app client exited with status 1 (ENOTCONN)")
    _write_run(root, "throughput", grid, reps + 1, seed * 100_000 + n + 2, m, {"timeseries": tables}, topo,
               day=1, status="invalid", reason="calibration: wifi: RTT 18.2 ms, configured 0 ms")
    tmp = root / "establishment" / ".tmp-deadbeef-r000"  # a run still being written: ignored
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "manifest.json").write_text("{ half-written")
    bench = root / "emulation_bench"
    bench.mkdir(exist_ok=True)
    _benchmark(rng).to_csv(bench / "benchmark.csv", index=False)
    return root


if __name__ == "__main__":
    out = generate(sys.argv[1] if len(sys.argv) > 1 else "build/synthetic-results")
    print(out)
