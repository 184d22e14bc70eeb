"""Run scenarios: one run = build, calibrate, probe, run the experiment, store.

A sweep is the grid x repetitions in a seeded random order. It resumes: runs
already stored are skipped, failed ones are retried on request, and a run
interrupted by kill -9 is redone. Ctrl-C stops after removing the partial run.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd

from testbed.base.errors import TestbedError
from testbed.base.netns import run_command
from testbed.core.emulation.calibrate import capacity_warning, emulator_counters, judge_run
from testbed.harness import experiment as experiments
from testbed.harness import probes
from testbed.harness.experiment import RunContext, RunOutput
from testbed.core.net import Testbed
from testbed.harness.overrides import flatten
from testbed.harness.provenance import git_state, namespace_sysctls, static_provenance
from testbed.harness.results import RunLock, RunWriter, now_iso, remove_abandoned, run_stamp
from testbed.harness.scenario import RunSpec, Scenario, expand
from testbed.harness.schema import PHASES


class PhaseClock:
    """Wall time of one run by phase (schema.PHASES): each phase runs until the next begins."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._current: str | None = None
        self._since = 0.0

    def begin(self, phase: str) -> None:
        """End the phase under way (if any) and start `phase`."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        self.end()
        self._current, self._since = phase, time.monotonic()

    def end(self) -> None:
        """End the phase under way; a phase entered twice adds up."""
        if self._current is not None:
            spent = time.monotonic() - self._since
            self.seconds[self._current] = round(self.seconds.get(self._current, 0.0) + spent, 4)
            self._current = None

    def record(self) -> dict[str, float]:
        """Seconds per phase, in schema order, phases not reached left out."""
        return {p: self.seconds[p] for p in PHASES if p in self.seconds}


class TestbedPool:
    """Keeps the last run's testbed for the next run with the same identity
    (topology, backend, host settings but those set per socket): it is reset
    and checked against the spec instead of being torn down and built again,
    and its last valid full calibration is kept with it (calibrated runs in
    between get the drift check).
    Not for mptcpd, whose own state a reset cannot restore."""
    __test__ = False  # not a pytest class despite the name

    def __init__(self) -> None:
        self._kept: tuple[str, Testbed] | None = None
        self._built = 0
        # The kept testbed's last valid full calibration and the calibrated runs since.
        self._calibration: dict[str, Any] | None = None
        self._since_calibration = 0

    @staticmethod
    def identity(sc: Scenario) -> str | None:
        """What makes two runs' testbeds interchangeable; None: this run gets its own."""
        if "mptcpd" in (sc.hosts.client.path_manager, sc.hosts.server.path_manager):
            return None
        hosts = {role: getattr(sc.hosts, role).namespace_settings() for role in ("client", "server")}
        return json.dumps([sc.topology.resolve().model_dump(mode="json"), sc.backend, hosts],
                          sort_keys=True, default=str)

    @contextlib.contextmanager
    def testbed(self, sc: Scenario, fresh: Callable[[], Testbed],
                note: dict[str, Any]) -> Iterator[Testbed]:
        """A testbed for one run: the kept one when it resets to its spec, else a
        new one (note says which, and why). Kept after the run unless it raised."""
        key = self.identity(sc)
        tb = None
        if key is not None and self._kept is not None and self._kept[0] == key:
            tb = self._kept[1]
            self._kept = None
            try:
                problems = tb.reset()
                if not problems:
                    tb.adopt_per_socket_settings(sc.hosts.client, sc.hosts.server)
            except BaseException as exc:  # Ctrl-C or the run's timer mid-reset too
                tb.__exit__(type(exc), exc, None)
                raise
            if problems:
                note.update(reused=False, reason=f"reset did not verify: {problems[0]}")
                tb.__exit__(None, None, None)
                tb = None
            else:
                note.update(reused=True, reason="reset verified against the spec")
        else:
            self.close()
            note.update(reused=False, reason="no kept testbed of this identity" if key
                        else "mptcpd path manager: a fresh testbed")
        if tb is None:
            self._built += 1
            self._calibration, self._since_calibration = None, 0
            tb = fresh().__enter__()
        try:
            yield tb
        except BaseException as exc:
            tb.__exit__(type(exc), exc, None)
            raise
        if key is None:
            tb.__exit__(None, None, None)
        else:
            self._kept = (key, tb)

    def close(self) -> None:
        """Tear down the kept testbed, if any."""
        self._calibration, self._since_calibration = None, 0
        if self._kept is not None:
            _key, tb = self._kept
            self._kept = None
            tb.__exit__(None, None, None)

    def calibrate(self, tb: Testbed, every: int) -> dict[str, Any]:
        """Calibrate tb fully when it has no valid calibration or `every` runs
        have passed since the last one; otherwise the cheap drift check against
        that calibration. The result says which (`kind`), with `every` and
        `runs_since_full` (0 for a full calibration)."""
        from testbed.core.emulation.drift import drift_check

        if self._calibration is not None and self._since_calibration + 1 < every:
            self._since_calibration += 1
            result = drift_check(tb, self._calibration)
            result.update(kind="drift_check", every=every,
                          runs_since_full=self._since_calibration,
                          full_calibration_s=self._calibration.get("duration_s"))
            if not result["valid"]:  # the next run recalibrates fully
                self._calibration = None
            return result
        result = {**_calibrate(tb), "kind": "full", "every": every, "runs_since_full": 0}
        self._calibration = result if result["valid"] else None
        self._since_calibration = 0
        return result


class RunTimeout(Exception):
    """A run took longer than its scenario's timeout_s."""
    pass


@dataclass
class SweepSummary:
    """What a sweep planned, skipped and ran, by status."""
    planned: int = 0
    skipped: int = 0
    elsewhere: int = 0  # being written by another process sweeping the same store
    voided: int = 0  # attempts the testbed voided that were run again (not stored)
    done: dict[str, int] = field(default_factory=dict)  # status -> count
    run_dirs: list[Path] = field(default_factory=list)

    def line(self) -> str:
        """The summary in one line."""
        parts = ", ".join(f"{n} {s}" for s, n in sorted(self.done.items())) or "nothing run"
        busy = f", {self.elsewhere} left to another process" if self.elsewhere else ""
        again = f" ({self.voided} attempts the testbed voided were run again)" if self.voided else ""
        return f"{self.planned} runs planned, {self.skipped} already stored{busy}, {parts}{again}"


def wanted(seen: tuple | None, retry_failed: bool) -> bool:
    """Whether a run with this stamp (results.run_stamp) is to be run: not stored,
    or stored failed under --retry-failed."""
    return seen is None or (retry_failed and seen[0] == "failed")


def lane_walk(keys: list[str], lane: int = 0, lanes: int = 1) -> list[int]:
    """The order (indices into keys, already grouped by testbed identity) in
    which lane `lane` of `lanes` walks a sweep: the groups rotated so that each
    lane starts on a group of its own. Lanes sharing a sweep then keep their
    testbeds (one build per group) instead of taking turns inside one group
    and building a testbed per run; they meet only in the last groups."""
    starts = [i for i, key in enumerate(keys) if i == 0 or key != keys[i - 1]]
    groups = [list(range(a, b)) for a, b in zip(starts, starts[1:] + [len(keys)])]
    first = (lane * len(groups)) // max(lanes, 1) if groups else 0
    return [i for g in groups[first:] + groups[:first] for i in g]


def sweep(scenario: Scenario, root: Path, retry_failed: bool = False,
          progress: bool = True, reuse: bool = True, lane: int = 0,
          lanes: int = 1, planned: dict[str, Any] | None = None) -> SweepSummary:
    """Run every planned run that is not stored yet; several processes may sweep
    one store at once: each run is written by whoever takes its lock first.
    With reuse, consecutive runs of one testbed identity share a testbed (reset
    and verified between runs); runs are grouped by identity, keeping the seeded
    shuffled order within each group, and lane `lane` of `lanes` sweeping
    together starts at a group of its own (lane_walk). `planned` (run id ->
    the stamp it was planned with): the runs a parallel sweep planned once for
    all its lanes; a lane takes only those, and only while their stamp holds,
    so a run another lane stored since is never run twice."""
    specs = expand(scenario)
    for warning in capacity_warnings(specs):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    remove_abandoned(root, scenario.experiment)
    todo = []
    for spec in specs:
        if planned is not None:
            if spec.run_id in planned:
                todo.append((spec, planned[spec.run_id]))
            continue
        seen = run_stamp(root, scenario.experiment, spec.run_id)
        if wanted(seen, retry_failed):
            todo.append((spec, seen))
    summary = SweepSummary(planned=len(specs), skipped=len(specs) - len(todo))
    pool = TestbedPool() if reuse else None
    if pool is not None:  # stable: the shuffled order holds within a group
        keyed = sorted(((TestbedPool.identity(spec.scenario) or "", i) for i, (spec, _) in
                        enumerate(todo)), key=lambda pair: pair[0])  # each identity built once
        todo = [todo[keyed[i][1]] for i in lane_walk([k for k, _ in keyed], lane, lanes)]
    bar = _progress(len(todo), scenario.experiment, progress)
    try:
        for spec, seen in todo:
            lock = RunLock(root, scenario.experiment, spec.run_id)
            if not lock.acquire():
                summary.elsewhere += 1  # another process is writing it
                status = "elsewhere"
            else:
                try:
                    # Planned before the lock was taken: another writer may have stored it since.
                    if run_stamp(root, scenario.experiment, spec.run_id) != seen:
                        summary.skipped += 1
                        status = "stored meanwhile"
                    else:
                        run_dir = run_one(spec, root, pool)
                        stored = json.loads((run_dir / "manifest.json").read_text())
                        status = stored["status"]
                        summary.voided += len(stored.get("voided_attempts") or [])
                        summary.done[status] = summary.done.get(status, 0) + 1
                        summary.run_dirs.append(run_dir)
                finally:
                    lock.release()
            if bar is not None:
                bar.set_postfix_str(f"last: {status}")
                bar.update(1)
    finally:
        if pool is not None:
            pool.close()
        if bar is not None:
            bar.close()
    return summary


def capacity_warnings(specs: list[RunSpec]) -> list[str]:
    """Runs asking the link emulator for more aggregate rate than this machine
    measured it can carry in time (one line per distinct topology)."""
    from testbed.core import emulation

    out: dict[str, str] = {}
    for spec in specs:
        topology = spec.scenario.topology.resolve()
        try:
            backend = emulation.select(spec.scenario.backend, topology).name
        except Exception:  # noqa: BLE001 - an unusable backend fails the run itself, with its reason
            continue
        line = capacity_warning(topology, backend)
        if line is not None:
            out.setdefault(line, line)
    return list(out)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True)


def run_one(spec: RunSpec, root: Path, pool: TestbedPool | None = None) -> Path:
    """Run and store one grid point's repetition; a run the testbed voided is run
    again up to the scenario's void_retries times, its voided attempts listed."""
    voided: list[dict[str, Any]] = []
    while True:
        writer, manifest = _attempt(spec, root, pool, voided)
        # Only the testbed's own failures: a failed run or one a probe voided is the
        # measurement's outcome, and running it again would hide it.
        if (manifest["status"] != "invalid" or not manifest.get("voided_by_testbed")
                or len(voided) >= spec.scenario.void_retries):
            return writer.commit()
        # Never stored: interrupted before the next attempt is stored, the run is
        # absent and a resumed sweep runs it again.
        writer.discard()
        voided.append({key: manifest.get(key) for key in
                       ("start", "end", "duration_s", "reason", "emulation")})
        if pool is not None:  # the testbed let the run down: the next attempt builds and calibrates afresh
            try:
                pool.close()
            except TestbedError as exc:  # its teardown's trouble is not this run's
                print(f"warning: tearing down the testbed of a voided run: {exc}",
                      file=sys.stderr, flush=True)


def _attempt(spec: RunSpec, root: Path, pool: TestbedPool | None,
             voided: list[dict[str, Any]]) -> tuple[RunWriter, dict[str, Any]]:
    """Build the testbed (or take the pool's, reset and verified), run one grid
    point's repetition with its probes, write it (not stored yet) and return the
    writer and the manifest."""
    sc = spec.scenario
    started = time.monotonic()
    clock = PhaseClock()
    clock.begin("prepare")
    exp_cls = experiments.experiment_class(sc.experiment)
    writer = RunWriter(root, sc.experiment, spec.run_id)
    manifest: dict[str, Any] = {
        "experiment": sc.experiment, "run_id": spec.run_id,
        "scenario": sc.model_dump(mode="json"), "params": flatten(spec.params),
        "repetition": spec.repetition, "seed": spec.seed,
        "git": git_state(), **static_provenance(), "start": now_iso(),
    }
    output = RunOutput(metrics={}, status="failed", reason="did not run")
    ctx: RunContext | None = None
    old_alarm = signal.signal(signal.SIGALRM, _on_timeout)
    signal.setitimer(signal.ITIMER_REAL, sc.timeout_s)
    try:
        random.seed(spec.seed)
        params = exp_cls.validate_params(sc.params)
        clock.begin("build")

        def fresh() -> Testbed:
            return Testbed(sc.topology.resolve(), backend=sc.backend, client=sc.hosts.client,
                           server=sc.hosts.server,
                           # per process: two sweeps of one store never share a state file
                           run_id=f"run-{spec.run_id}-{os.getpid()}")

        reuse: dict[str, Any] = {"reused": False, "reason": "no pool: a fresh testbed"}
        manifest["testbed_reuse"] = reuse
        with (pool.testbed(sc, fresh, reuse) if pool is not None else fresh()) as tb:
            try:  # the finally marks where teardown (the with's exit) begins
                manifest["testbed"] = tb.describe()
                manifest["namespace_sysctls"] = namespace_sysctls(tb)
                clock.begin("calibrate")
                calibration = None
                if sc.calibrate:  # without a pool (one testbed per run): every run fully
                    calibration = pool.calibrate(tb, sc.calibrate_every) if pool is not None \
                        else {**_calibrate(tb), "kind": "full", "every": 1, "runs_since_full": 0}
                ctx = RunContext(tb, spec, params, writer.raw_dir)
                emulator_before = emulator_counters(tb)
                output = _run_with_probes(exp_cls(), ctx, sc, clock)
                # The emulator is judged over the run too: each path passing calibration
                # alone does not mean all of them kept time together under load.
                emulation_run = judge_run(emulator_before, emulator_counters(tb))
                if (output.status == "complete" and calibration is not None
                        and not calibration.get("valid", True)):
                    output.status = "invalid"
                    what = "calibration" if calibration["kind"] == "full" else \
                        f"drift check ({calibration['runs_since_full']} runs after the calibration)"
                    output.reason = f"{what}: {calibration.get('reason') or 'out of tolerance'}"
                    manifest["voided_by_testbed"] = True
                elif output.status == "complete" and not emulation_run["valid"]:
                    output.status = "invalid"
                    output.reason = f"emulation during the run: {emulation_run['reason']}"
                    manifest["voided_by_testbed"] = True
                # At the end: the emulator's counters (drops by cause, lateness) cover the run.
                manifest["emulation"] = {**tb.backend.describe(), "calibration": calibration,
                                         "run": emulation_run}
                manifest["qdiscs"] = _qdisc_dump(tb)
                manifest["probes"] = ctx.probe_summaries
                # What the links were when the workload ended (with applied_events below,
                # every change that got them there): analysis reads these instead of
                # recomputing what was applied.
                manifest["links_at_end"] = {name: state.model_dump(mode="json")
                                            for name, state in tb.link_states().items()}
            finally:
                clock.begin("teardown")
    except KeyboardInterrupt:
        signal.setitimer(signal.ITIMER_REAL, 0)
        shutil.rmtree(writer.tmp, ignore_errors=True)  # no partial run passed off as data
        raise
    except RunTimeout:
        output = RunOutput(metrics=output.metrics, status="failed",
                           reason=f"timeout after {sc.timeout_s:g} s")
    except Exception as exc:  # noqa: BLE001 - any failure becomes a failed run, with its reason
        output = RunOutput(metrics=output.metrics, status="failed",
                           reason=f"{type(exc).__name__}: {exc}".splitlines()[0])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_alarm)
    clock.begin("store")
    manifest.update({"status": output.status, "reason": output.reason, "end": now_iso(),
                     "duration_s": round(time.monotonic() - started, 3)})
    if output.protocol:
        manifest["protocol"] = output.protocol
    if voided:
        manifest["voided_attempts"] = list(voided)
    if ctx is not None:
        # Also for a failed run: which change failed, and what had been applied before it.
        manifest["applied_events"] = [a.record(ctx.t0_ns / 1e9) for a in ctx.tb.applied_events]
        manifest["clock"] = {"t0_ns": ctx.t0_ns, "monotonic_ns": time.monotonic_ns(),
                             "realtime_ns": time.time_ns()}
        tables = dict(output.tables)
        tables["events"] = _merge_events(ctx, tables.get("events"))
        writer.write_tables(tables)
    clock.end()
    # store covers the tables; the manifest's own write and the rename come after
    manifest["phases"] = clock.record()
    writer.write(manifest, output.metrics)
    return writer, manifest


def _on_timeout(signum: int, frame: object) -> None:
    raise RunTimeout()


def _run_with_probes(exp, ctx: RunContext, sc: Scenario, clock: PhaseClock) -> RunOutput:
    from testbed.core.emulation.events import EventScheduler

    tb = ctx.tb
    clock.begin("probes_up")
    t0 = ctx.start_clock()
    started = []
    scheduler = None
    try:  # whatever fails part-way, everything already started is stopped
        if sc.cross:  # declared here, started and stopped by the events
            tb.use_cross_traffic(sc.cross)
        for name in [*sc.probes, *(["cross"] if sc.cross and "cross" not in sc.probes else [])]:
            probe = probes.get(name, interval_ms=sc.probe_interval_ms)
            probe.start(tb, ctx.raw_dir, t0)
            started.append(probe)
        scheduler = EventScheduler(tb, sc.events)
        scheduler.start(t0 / 1e9)
        clock.begin("workload")
        output = exp.run(ctx)
    finally:
        clock.begin("collect")
        if scheduler is not None:
            scheduler.stop()
        if tb.cross is not None:  # competing flows end with the workload
            tb.cross.stop_all()
        for probe in started:
            probe.stop()
    for rec in tb.applied_events:  # the scheduler's and the experiment's own
        ctx.record("fault", "network", rec.event.describe(), ns=int(rec.began * 1e9),
                   scheduled_s=rec.event.at_s, ok=rec.ok, error=rec.error,
                   applied_lateness_ms=rec.applied_lateness_ms,
                   emulator_applied_s=rec.applied - t0 / 1e9 if rec.emulator_clock else None)
    failed = [r for r in tb.applied_events if not r.ok]
    if failed:  # the run did not see the fault it was meant to study
        output.status = "failed"
        output.reason = (f"event '{failed[0].event.describe()}' at {failed[0].event.at_s:g} s "
                         f"failed: {failed[0].error}")
    elif len(scheduler.records) < len(sc.events):
        output.status = "failed"
        output.reason = f"only {len(scheduler.records)} of {len(sc.events)} events were applied"
    tables = dict(output.tables)
    for probe in started:
        for name, frame in probe.tables().items():
            tables[name] = pd.concat([tables[name], frame], ignore_index=True) \
                if name in tables and len(tables[name]) else frame
        for key, value in probe.metrics().items():
            output.metrics.setdefault(key, value)
        ctx.probe_summaries[probe.name] = probe.summary()
    missed = [f"probe {probe.name}: {msg}" for probe in started for msg in probe.problems()]
    if missed and output.status == "complete":  # data with holes the tables would not show
        output.status = "invalid"
        output.reason = "; ".join(missed)
    output.tables = tables
    return output


def _calibrate(tb) -> dict[str, Any]:
    from testbed.core.emulation.calibrate import calibrate

    return calibrate(tb)


def _merge_events(ctx: RunContext, extra: pd.DataFrame | None) -> pd.DataFrame:
    rows = [{"t": (e["t_ns"] - ctx.t0_ns) / 1e9, "source": e["source"], "host": e["host"],
             "event": e["event"], "token": e["token"],
             "detail": json.dumps(e["detail"], default=str, sort_keys=True)} for e in ctx.events]
    frame = pd.DataFrame(rows, columns=["t", "source", "host", "event", "token", "detail"])
    if extra is not None and len(extra):
        frame = pd.concat([frame, extra], ignore_index=True) if len(frame) else extra
    if not len(frame):
        return frame
    frame = frame.astype({"t": "float64", "source": "string", "host": "string",
                          "event": "string", "token": "Int64", "detail": "string"})
    return frame.sort_values("t", kind="stable").reset_index(drop=True)


def _qdisc_dump(tb) -> dict[str, str]:
    out = {}
    for link in tb.links:
        res = run_command(link.pid, ["tc", "-s", "qdisc", "show"])
        out[link.node.name] = res.stdout
    return out
