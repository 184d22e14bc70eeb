"""`./tb bench.chaos`: a sweep that keeps getting killed, and what it leaves.

A sweep of N short throughput runs (userspace link emulation, so real-time
forwarder processes exist to leak) is started as a child process; random
attempts get SIGKILL, SIGINT or SIGTERM at a random moment (build, workload,
teardown or store), each followed by `./tb clean` and a resume, until the sweep
finishes. Then the figures: every planned run stored complete exactly once,
nothing left (namespaces, host interfaces, qdiscs, nft tables, state files,
processes) and the host's /proc/sys/net (plus kernel.pty.max) byte-for-byte
unchanged. Targets: all zero but the runs stored.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from testbed.base.errors import TestbedError
from testbed.core.state import STATE_DIR

ROOT = Path(__file__).resolve().parents[3]
SCENARIO = textwrap.dedent("""
    experiment = "throughput"
    description = "chaos benchmark: short runs, killed at random"
    repetitions = {runs}
    seed = {seed}
    timeout_s = 60
    backend = "userspace"
    calibrate = false
    probes = ["pm_events", "nstat"]
    [topology]
    name = "two-path"
    params = {{ rate_mbit = 20, wifi_delay_ms = 2, lte_delay_ms = 2 }}
    [params]
    seconds = 1.5
""")
SWEEP = textwrap.dedent("""
    import sys
    from pathlib import Path
    from testbed.harness import scenario as sc
    from testbed.harness.runner import sweep
    print(sweep(sc.load(sys.argv[1]), Path(sys.argv[2]), progress=False).line(), flush=True)
""")
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}


def host_sysctls() -> dict[str, str]:
    """Every readable setting under /proc/sys/net of this namespace, and kernel.pty.max.

    Read-only entries are counters (nf_conntrack_count moves with any traffic
    on the host), not settings anyone changed: they are left out."""
    out = {}
    for d, _, files in os.walk("/proc/sys/net"):
        for f in files:
            if not os.stat(os.path.join(d, f)).st_mode & 0o222:
                continue
            try:
                out[os.path.join(d, f)] = Path(d, f).read_text()
            except OSError:  # write-only or unreadable
                pass
    out["/proc/sys/kernel/pty/max"] = Path("/proc/sys/kernel/pty/max").read_text()
    return out


def footprint() -> dict[str, set[str]]:
    """What exists outside the processes we run: namespaces (used or held by a
    descriptor) with the processes in them, host interfaces, qdiscs, nft
    tables, state files."""
    netns: set[str] = set()
    members: dict[str, set[str]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ns = os.readlink(f"/proc/{pid}/ns/net")
            netns.add(ns)
            members.setdefault(ns, set()).add(f"{pid} {Path(f'/proc/{pid}/comm').read_text().strip()}")
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("net:["):
                    netns.add(target)
        except OSError:
            pass

    def lines(argv: list[str]) -> set[str]:
        return set(subprocess.run(argv, capture_output=True, text=True).stdout.splitlines())

    return {"netns": netns,
            "processes": {p for ns, ps in members.items() for p in ps if ns not in _host_netns()},
            "host interfaces": {line.split(":")[1].strip() for line in lines(["ip", "-o", "link", "show"])},
            "qdiscs": lines(["tc", "qdisc", "show"]),
            "nft tables": lines(["nft", "list", "tables"]),
            "state files": {p.name for p in STATE_DIR.glob("*.json")} if STATE_DIR.exists() else set()}


def _host_netns() -> set[str]:
    return {os.readlink("/proc/self/ns/net")}


@dataclass
class ChaosResult:
    """What the chaos sweep did and what it left."""

    planned: int
    attempts: int = 0
    interrupts: Counter = field(default_factory=Counter)
    clean_failures: int = 0
    stored_complete: int = 0
    stored_other: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    half_written: int = 0
    leaked: dict[str, list[str]] = field(default_factory=dict)
    sysctls_changed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def ok(self) -> bool:
        """Every target met."""
        return (self.stored_complete == self.planned and not self.stored_other and not self.missing
                and not self.half_written and not any(self.leaked.values())
                and not self.sysctls_changed and not self.clean_failures)

    def render(self) -> str:
        """The figures, measured against their targets."""
        rows = [
            ("runs planned", self.planned, ""),
            ("sweep attempts (1 + interruptions)", self.attempts, ""),
            ("interruptions", sum(self.interrupts.values()),
             ", ".join(f"{k} {v}" for k, v in sorted(self.interrupts.items()))),
            ("stored complete exactly once", self.stored_complete, f"target {self.planned}"),
            ("stored with another status", len(self.stored_other), "target 0"),
            ("planned but not stored", len(self.missing), "target 0"),
            ("half-written (.tmp-) runs left", self.half_written, "target 0"),
            ("`clean` exits non-zero", self.clean_failures, "target 0"),
            *[(f"leaked {k}", len(v), "target 0") for k, v in self.leaked.items()],
            ("host sysctls changed", len(self.sysctls_changed), "target 0"),
            ("wall time", f"{self.seconds:.0f} s", ""),
        ]
        width = max(len(r[0]) for r in rows)
        out = [f"{name:<{width}}  {value!s:>7}  {note}".rstrip() for name, value, note in rows]
        for k, v in self.leaked.items():
            out += [f"  {k}: {item}" for item in sorted(v)[:5]]
        out += [f"  sysctl: {name}" for name in self.sysctls_changed[:5]]
        out += [f"  {run}: {status}" for run, status in list(self.stored_other.items())[:5]]
        out.append("chaos: all targets met" if self.ok() else "chaos: TARGETS MISSED")
        return "\n".join(out)


def run_chaos(runs: int = 200, interrupts: int | None = None, seed: int = 1,
              out: str | Path = "results/bench-chaos", run_s: float = 2.5,
              progress: bool = True) -> ChaosResult:
    """The sweep of `runs` runs, interrupted `interrupts` times (default runs/10)."""
    rng = random.Random(seed)
    out = Path(out)
    store = out / "store"
    if store.exists():
        raise TestbedError(f"{store} exists: the benchmark needs a fresh store (pick another --out)")
    out.mkdir(parents=True, exist_ok=True)
    scenario = out / "chaos.toml"
    scenario.write_text(SCENARIO.format(runs=runs, seed=seed))
    interrupts = max(1, runs // 10) if interrupts is None else interrupts
    result = ChaosResult(planned=runs)
    sysctls, before = host_sysctls(), footprint()
    started = time.monotonic()
    invoke = Path(sys.executable).parent / "invoke"
    while True:
        result.attempts += 1
        errors = (out / "sweep.stderr").open("w")
        proc = subprocess.Popen([sys.executable, "-c", SWEEP, str(scenario), str(store)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=errors, text=True)
        left, interrupted = interrupts - sum(result.interrupts.values()), False
        if left > 0:
            stored = len(list(store.glob("*/*/manifest.json")))
            # A random moment within the next few runs: build, workload, teardown or store.
            delay = rng.uniform(0.2, run_s * min(5, max(1, runs - stored)))
            name = rng.choice(sorted(SIGNALS))
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(SIGNALS[name])
                result.interrupts[name] += 1
                interrupted = True
                if progress:
                    print(f"[chaos] attempt {result.attempts}: {name} after {delay:.1f} s "
                          f"({stored} runs stored)", flush=True)
        try:
            proc.wait(timeout=runs * 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        errors.close()
        clean = subprocess.run([str(invoke), "clean"], cwd=ROOT, capture_output=True, text=True)
        result.clean_failures += clean.returncode != 0
        if proc.returncode == 0:
            break
        if not interrupted:  # a sweep failing on its own would loop for ever
            last = (out / "sweep.stderr").read_text().strip().splitlines() or ["(no output)"]
            raise TestbedError(f"the sweep failed without being interrupted (exit {proc.returncode}): "
                               f"{last[-1]}")
    result.seconds = time.monotonic() - started
    _judge_store(result, scenario, store)
    time.sleep(0.5)  # namespaces go a moment after their last process
    after = footprint()
    result.leaked = {k: sorted(after[k] - before[k]) for k in after}
    now = host_sysctls()
    result.sysctls_changed = sorted(k for k in set(sysctls) | set(now) if sysctls.get(k) != now.get(k))
    (out / "chaos.json").write_text(json.dumps({**result.__dict__, "interrupts": dict(result.interrupts)},
                                               indent=1, default=str))
    return result


def _judge_store(result: ChaosResult, scenario: Path, store: Path) -> None:
    from testbed.harness import scenario as sc

    planned = {spec.run_id for spec in sc.expand(sc.load(scenario))}
    exp_dir = store / "throughput"
    dirs = [d for d in exp_dir.iterdir() if d.is_dir()] if exp_dir.exists() else []
    result.half_written = sum(d.name.startswith(".tmp-") for d in dirs)
    stored = {d.name: json.loads((d / "manifest.json").read_text()).get("status")
              for d in dirs if not d.name.startswith(".tmp-") and (d / "manifest.json").exists()}
    result.stored_complete = sum(1 for run_id, status in stored.items()
                                 if run_id in planned and status == "complete")
    result.stored_other = {r: str(s) for r, s in stored.items() if r not in planned or s != "complete"}
    result.missing = sorted(planned - set(stored))
