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


def _topology(rtts: dict[str, float], rates: dict[str, float]) -> dict[str, Any]:
    return {"name": "two-path", "default_path": "wifi", "server_side": "router",
            "paths": [{"name": n, "rate_mbit": rates[n], "delay_ms": rtts[n] / 2}
                      for n in rtts]}


def _write_run(root: Path, exp: str, params: dict[str, Any], rep: int, seed: int,
               metrics: dict[str, Any], tables: dict[str, pd.DataFrame], topo: dict[str, Any],
               status: str = "complete", reason: str = "", day: int = 0) -> None:
    phash = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    run_id = f"{phash}-r{rep}"
    d = root / exp / run_id
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = {p["name"]: p for p in topo["paths"]}
    calib = {"verdict": "ok" if status != "invalid" else "failed", "paths": {
        n: {"rtt_cfg_ms": 2 * p["delay_ms"], "rtt_meas_ms": 2 * p["delay_ms"] + 0.18 + abs(rng.normal(0, 0.05)),
            "rate_cfg_mbit": p["rate_mbit"], "rate_meas_mbit": p["rate_mbit"] * rng.uniform(0.93, 0.97),
            "loss_cfg_pct": 0.0, "loss_meas_pct": 0.0} for n, p in paths.items()}}
    if status == "invalid":
        calib["paths"]["wifi"]["rtt_meas_ms"] *= 1.8
    start = pd.Timestamp("2025-11-26T08:00:00Z") + pd.Timedelta(days=day, seconds=seed % 5000)
    manifest = {
        "schema_version": 1, "experiment": exp, "run_id": run_id,
        "scenario": {"path": f"experiments/{exp}.toml", "name": exp},
        "params": params, "repetition": rep, "seed": seed, "status": status, "reason": reason,
        "git": {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": False,
                "describe": "v0.1.0-synthetic"},
        "kernel": {"release": "6.18.0-synthetic", "version": "#1 SMP PREEMPT_DYNAMIC",
                   "config": {"mptcp": True, "netem": False}},
        "host": {"hostname": "synthetic", "cpus": 2, "machine": "x86_64"},
        "tools": {"python": "3.11.2", "iperf3": "3.12", "tshark": "4.0.17", "pandas": pd.__version__},
        "testbed": {"topology": topo, "congestion_control": params.get("cc", "cubic")},
        "emulation": {"backend": "forwarder", "settings": {"busy_poll_us": 200}, "calibration": calib},
        "qdiscs": {}, "clock": {"t0_ns": 10**12, "monotonic_ns": 10**12, "realtime_ns": 1_764_144_000 * 10**9},
        "start": start.isoformat(), "end": (start + pd.Timedelta(seconds=12)).isoformat(),
    }
    (d / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if status != "failed":
        (d / "metrics.json").write_text(json.dumps(metrics))
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
    rtt = {"wifi": 0.020, "lte": 0.050}
    if scenario == "slow_default":
        rtt = {"wifi": 0.120, "lte": 0.040}
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
    outcome = "failed" if not np.isfinite(t) else "tcp" if base == "tcp" else "mptcp" if mp else "fallback"
    multipath = float("nan")
    if outcome == "mptcp":
        tj, _, _ = on(loser, plain_after=None)
        if tj < TIMEOUT_S - t:
            multipath = t + tj
    setup = t if np.isfinite(t) else float("nan")
    m = {"setup_s": setup, "ttfb_s": setup + rtt[win] + 0.001 if np.isfinite(t) else float("nan"),
         "multipath_s": multipath, "outcome": outcome, "syns_sent": int(syns), "rsts_sent": rsts,
         "initial_path": win if np.isfinite(t) else None}
    ev = [(0.0, "app", "client", "connect_start", None)]
    if np.isfinite(t):
        ev += [(setup, "pm", "client", "established", 1234), (setup + rtt[win], "app", "client", "first_byte", None)]
    if np.isfinite(multipath):
        ev.append((multipath, "pm", "client", "sub_established", 1234))
    events = pd.DataFrame(ev, columns=["t", "source", "host", "event", "token"]).assign(
        detail=lambda d: [json.dumps({"path": win}) for _ in range(len(d))])
    topo = _topology({k: v * 1000 for k, v in rtt.items()}, {"wifi": 20, "lte": 20})
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
    m = {"stall_s": stall, "recovery_s": recovery, "bytes_delivered": delivered,
         "goodput_mbit": delivered * 8 / dur / 1e6, "integrity": True}
    topo = _topology({"wifi": 20.0, "lte": 50.0}, {"wifi": 20, "lte": 20})
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
    m = {"goodput_mbit": goodput, "sum_rates_mbit": sum(r), "efficiency": goodput / sum(r),
         "transfer_s": dur, "ideal_s": size * 8 / (sum(r) * 1e6), "bytes": size}
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
    for exp, strategies in (("establishment", ["tcp", "mptcp"]), ("robe_establishment", ROBE)):
        for scenario in SCENARIOS:
            for strategy in strategies:
                for rep in range(reps):
                    n += 1
                    m, topo, ev = _establishment(rng, scenario, strategy)
                    params = {"scenario": scenario, "strategy": strategy, "timeout_s": TIMEOUT_S,
                              "timer_s": TIMER_S}
                    _write_run(root, exp, params, rep, seed * 100_000 + n, m, {"events": ev}, topo)
    for fault in ("link_down", "blackhole"):
        for mode in ("normal", "backup"):
            for rep in range(reps):
                n += 1
                m, topo, tables = _failover(rng, fault, mode)
                _write_run(root, "failover", {"fault": fault, "mode": mode}, rep, seed * 100_000 + n,
                           m, tables, topo, day=1)
    for rates in ("10/10", "20/20", "15/5", "10/3"):
        for delays in ("0/0", "1/25"):
            for cc in ("cubic", "bbr"):
                for rep in range(reps):
                    n += 1
                    m, topo, ts = _throughput(rng, rates, delays, cc)
                    _write_run(root, "throughput", {"rates": rates, "delays": delays, "cc": cc}, rep,
                               seed * 100_000 + n, m, {"timeseries": ts}, topo, day=1)
    # what the report must show as excluded: a crashed run and one that failed calibration
    m, topo, ev = _establishment(rng, "healthy", "sim")
    base = {"scenario": "healthy", "strategy": "sim", "timeout_s": TIMEOUT_S, "timer_s": TIMER_S}
    _write_run(root, "robe_establishment", base, reps, seed * 100_000 + n + 1, m, {"events": ev}, topo,
               status="failed", reason="client exited with status 1: ENOTCONN on subflow-create")
    _write_run(root, "robe_establishment", base, reps + 1, seed * 100_000 + n + 2, m, {"events": ev}, topo,
               status="invalid", reason="calibration: wifi RTT 36.3 ms measured, 20 ms configured")
    tmp = root / "robe_establishment" / ".tmp-deadbeef00-r0"  # a run still being written: ignored
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "manifest.json").write_text("{ half-written")
    bench = root / "emulation_bench"
    bench.mkdir(exist_ok=True)
    _benchmark(rng).to_csv(bench / "benchmark.csv", index=False)
    return root


if __name__ == "__main__":
    out = generate(sys.argv[1] if len(sys.argv) > 1 else "build/synthetic-results")
    print(out)
