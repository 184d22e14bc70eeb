"""Parallel runs on one machine: `--parallel K` runs up to K testbeds at once.

Each lane is a process of a concurrent.futures process pool running the
ordinary sweep (runner.sweep) of the same scenarios into the same store: the
runs are planned once, here, and each is taken by whichever lane gets its run
lock first (results.RunLock), so every run is written once, by the store,
under its lock. A lane keeps its own testbed between runs (reuse works per
lane) and starts on a testbed identity of its own (runner.lane_walk); lanes
go from one scenario of a group to the next without waiting for each other
(sweep_many_in_lanes). Lanes share no testbed state: each testbed lives in
namespaces of its own (interfaces, addresses, routes, nft tables, qdiscs and
the emulator processes are per namespace) and its state record is named after
the lane's process.

An experiment gets min(K, its `max_parallel`) lanes: how many runs at once kept
every run's calibration and emulator check passing and its metrics where a
serial run puts them, measured on this project's 2-core machine by
`./tb bench.parallel` (docs/performance.md). Every run still judges itself: one
that lost fidelity to its neighbours is stored invalid, naming the measured
value and the bound. An experiment with one lane runs in this process, exactly
as without --parallel.

Ctrl-C, SIGTERM or SIGHUP to the sweep sends SIGINT to every lane (lanes have their own
process group, so a terminal's Ctrl-C reaches each exactly once, through here),
each lane unwinds its run as a serial sweep does (testbed torn down, partial
run removed), and the sweep returns only when every lane has ended. A lane
whose parent dies without that (kill -9) gets SIGTERM from the kernel
(PR_SET_PDEATHSIG) and tears its testbed down.
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Iterator

from testbed.base.errors import TestbedError
from testbed.base.signals import exit_signals_unwind, restore_handlers, unwind_on_exit_signals
from testbed.harness import experiment as experiments
from testbed.harness.results import run_stamp
from testbed.harness.runner import SweepSummary, sweep, wanted
from testbed.harness.scenario import Scenario, expand

# The highest K that kept fidelity for any experiment here (establishment: at
# 8 the emulator sent packets late; docs/performance.md): beyond it runs would
# lose fidelity, so it is refused rather than left to each run's judge.
MAX_PARALLEL = 6
PR_SET_PDEATHSIG = 1
POLL_S = 0.5  # how often the progress bar looks at the store


def check_parallel(k: int | str) -> int:
    """The number of lanes asked for (an int or its text), refused in one line
    unless an integer in 1..MAX_PARALLEL."""
    try:
        k = int(k)
    except ValueError:
        raise TestbedError(f"--parallel: must be an integer 1..{MAX_PARALLEL}, got {k!r}") from None
    if not 1 <= k <= MAX_PARALLEL:
        raise TestbedError(f"--parallel: must be 1..{MAX_PARALLEL} (the most runs at once "
                           f"measured to keep fidelity on this machine; docs/performance.md), got {k}")
    return k


def lanes_for(scenario: Scenario, k: int) -> int:
    """How many of K lanes this scenario gets: its experiment's max_parallel, narrowed to the
    least any of its grid points allows (Experiment.max_parallel_for)."""
    cls = experiments.experiment_class(scenario.experiment)
    cap = min(cls.max_parallel_for(spec.scenario.params) for spec in expand(scenario, validate_only=True))
    return max(1, min(k, cap))


def overlap_lanes(scenario: Scenario) -> int:
    """How many of this scenario's runs may run beside the campaign's
    one-at-a-time (bulk) runs: the least its experiment allows for any of its
    grid points (Experiment.overlap_lanes_for); 0: not beside them."""
    cls = experiments.experiment_class(scenario.experiment)
    if cls.overlap_lanes <= 0:
        return 0
    return min(cls.overlap_lanes_for(spec.scenario.params)
               for spec in expand(scenario, validate_only=True))


def parallel_sweep(scenarios: list[Scenario], root: Path, k: int, retry_failed: bool = False,
                   progress: bool = True, overlap: bool = True) -> list[tuple[str, SweepSummary]]:
    """Sweep each scenario in turn into `root`, each with lanes_for(scenario, k)
    lanes at once; one summary per scenario, in the given order, as the serial
    sweeps give. Consecutive scenarios with the same number of lanes are
    swept as one group (sweep_many_in_lanes). With overlap (and k > 1): first
    the scenarios with several lanes that may not overlap; then the one-lane
    scenarios go in order through one lane of their own while those that may
    overlap run beside them, each with up to its overlap_lanes."""
    check_parallel(k)
    room = beside_rooms(scenarios, k) if overlap else dict.fromkeys(map(id, scenarios), 0)
    beside = [s for s in scenarios if room[id(s)] > 0]
    chain = [s for s in scenarios if not room[id(s)] and lanes_for(s, k) == 1] if beside else []
    alone = [s for s in scenarios if not any(s is t for t in beside + chain)]
    out: dict[int, tuple[str, SweepSummary]] = {}
    with lane_pool(k) as pool:  # one pool for the whole campaign: lanes start once
        for n, group in _same_lanes(alone, k):
            for scenario in group:
                if n < k:  # said, not silently done: more were allowed
                    print(f"note: {scenario.experiment}: {n} run(s) at once (the most measured "
                          "to keep its fidelity here; docs/performance.md)", file=sys.stderr,
                          flush=True)
            if n == 1:
                summaries = [sweep(s, root, retry_failed=retry_failed, progress=progress)
                             for s in group]
            else:
                summaries = sweep_many_in_lanes(pool, group, root, n, retry_failed, progress)
            for scenario, summary in zip(group, summaries):
                out[scenarios.index(scenario)] = (scenario.experiment, summary)
        if beside:
            print(f"note: {', '.join(_name(s) for s in chain)} one run at a time in a lane "
                  f"of their own, {', '.join(_name(s) for s in beside)} beside them "
                  "(docs/performance.md)", file=sys.stderr, flush=True)
            for scenario, summary in _beside_chain(pool, chain, beside, root, k, room,
                                                   retry_failed, progress):
                out[scenarios.index(scenario)] = (scenario.experiment, summary)
    return [out[i] for i in sorted(out)]


def beside_rooms(scenarios: list[Scenario], k: int) -> dict[int, int]:
    """id(scenario) -> the lanes it may use beside the one-at-a-time chain (0:
    not beside). All 0 unless there is both something to run beside and a
    one-lane scenario to run beside: then each runs in its own turn."""
    room = {id(s): overlap_lanes(s) if k > 1 else 0 for s in scenarios}
    if not any(room.values()) or not any(not room[id(s)] and lanes_for(s, k) == 1 for s in scenarios):
        return dict.fromkeys(room, 0)
    return room


def _same_lanes(scenarios: list[Scenario], k: int) -> list[tuple[int, list[Scenario]]]:
    """Consecutive scenarios with the same number of lanes, grouped: their lanes
    go from one scenario to the next without waiting for the others' last runs."""
    groups: list[tuple[int, list[Scenario]]] = []
    for scenario in scenarios:
        n = lanes_for(scenario, k)
        if groups and groups[-1][0] == n:
            groups[-1][1].append(scenario)
        else:
            groups.append((n, [scenario]))
    return groups


def _beside_chain(pool: "LanePool", chain: list[Scenario], beside: list[Scenario], root: Path,
                  k: int, room: dict[int, int], retry_failed: bool,
                  progress: bool) -> list[tuple[Scenario, SweepSummary]]:
    """The chain in one lane while the beside scenarios sweep in turn, each with
    min(its lanes, its overlap room, k - 1) lanes; every scenario's summary."""
    out: list[tuple[Scenario, SweepSummary]] = []
    running, stopped = pool.submit_chain(chain, root, retry_failed), False
    try:
        for scenario in beside:
            n = max(1, min(lanes_for(scenario, k), room[id(scenario)], k - 1))
            try:
                summary = sweep_in_lanes(pool, scenario, root, n, retry_failed, progress)
            except BaseException:
                stopped = True  # it interrupted every lane, the chain's too
                raise
            out.append((scenario, summary))
        out += list(zip(chain, _wait_chain(running)))
    except BaseException:
        if not running.done():
            if stopped:  # interrupted once already: only wait for it to unwind
                _stop_lanes([running], signal_lanes=False)
            else:
                _stop_lanes([running])
        raise
    return out


def _name(scenario: Scenario) -> str:
    return Path(scenario.path).name if scenario.path else scenario.experiment


def _wait_chain(running: Future) -> list[SweepSummary]:
    """The chain lane's summaries once it ends; SIGTERM and SIGHUP unwind as Ctrl-C."""
    with exit_signals_unwind():
        try:
            return running.result()
        except BaseException:
            if not running.done():  # interrupted here: the chain's run unwinds, waited for
                _stop_lanes([running])
            raise


class LanePool:
    """Up to k lane processes, started when first needed."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._executor: ProcessPoolExecutor | None = None

    def submit(self, *args) -> Future:
        """Start a lane sweep (runner.sweep's arguments) in a lane process."""
        if self._executor is None:
            self._executor = ProcessPoolExecutor(max_workers=self.k, initializer=_lane_init,
                                                 mp_context=multiprocessing.get_context("spawn"))
        return self._executor.submit(_lane, *args)

    def submit_chain(self, scenarios: list[Scenario], root: Path, retry_failed: bool) -> Future:
        """Start one lane sweeping these scenarios in turn, each one run at a time."""
        if self._executor is None:
            self._executor = ProcessPoolExecutor(max_workers=self.k, initializer=_lane_init,
                                                 mp_context=multiprocessing.get_context("spawn"))
        return self._executor.submit(_chain, scenarios, root, retry_failed)

    def shutdown(self) -> None:
        """Wait for every lane process to end."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)


@contextlib.contextmanager
def lane_pool(k: int) -> Iterator[LanePool]:
    """A LanePool of k lanes, every lane process ended when the block ends."""
    pool = LanePool(k)
    try:
        yield pool
    finally:
        pool.shutdown()


def sweep_in_lanes(pool: LanePool, scenario: Scenario, root: Path, n: int,
                   retry_failed: bool = False, progress: bool = True) -> SweepSummary:
    """One scenario's sweep by n lanes of the pool at once (n <= pool.k, no cap
    by the experiment: the caller decided); merged into one summary."""
    return sweep_many_in_lanes(pool, [scenario], root, n, retry_failed, progress)[0]


def sweep_many_in_lanes(pool: LanePool, scenarios: list[Scenario], root: Path, n: int,
                        retry_failed: bool = False, progress: bool = True) -> list[SweepSummary]:
    """Scenarios swept in turn by n lanes at once, each lane going on to the next
    scenario as soon as it finds no run of the current one left to take; one
    merged summary per scenario."""
    n = min(n, pool.k)
    plans = [expand(scenario) for scenario in scenarios]
    # Planned once, here, for every lane: a lane that reaches a scenario late must
    # not plan again (it would take a run another lane just stored failed, under
    # --retry-failed); a run an earlier scenario of the group plans is left to it,
    # as a serial sweep finds it stored.
    todo: list[dict[str, tuple | None]] = []
    waiting: dict[tuple[str, str], tuple | None] = {}  # (experiment, run id): planned stamp
    for scenario, specs in zip(scenarios, plans):
        todo.append({})
        for spec in specs:
            key = (scenario.experiment, spec.run_id)
            if key in waiting:
                continue
            seen = run_stamp(root, *key)
            if wanted(seen, retry_failed):
                todo[-1][spec.run_id] = waiting[key] = seen
    total = len(waiting)
    bar = None
    if progress and total:
        from tqdm import tqdm
        names = "+".join(dict.fromkeys(s.experiment for s in scenarios))
        bar = tqdm(total=total, desc=f"{names} x{n}", unit="run", dynamic_ncols=True)
    futures: list[Future] = []
    # SIGTERM and SIGHUP (a closed terminal) unwind like Ctrl-C: lanes stopped, waited for.
    old = unwind_on_exit_signals()
    try:
        futures = [pool.submit(scenarios, root, retry_failed, lane, n, todo) for lane in range(n)]
        while True:
            finished, running = wait(futures, timeout=POLL_S, return_when=FIRST_EXCEPTION)
            if bar is not None:  # only the runs not seen stored yet are looked at again
                waiting = {key: seen for key, seen in waiting.items()
                           if run_stamp(root, key[0], key[1]) == seen}
                bar.update(total - len(waiting) - bar.n)
            if not running or any(f.exception() is not None for f in finished):
                break
        # A lane's error is the sweep's, raised now: collecting results in lane
        # order would first wait for the other lanes to finish the whole group.
        for f in futures:
            if f.done() and f.exception() is not None:
                raise f.exception()
        lanes = [f.result() for f in futures]
    except BaseException:
        _stop_lanes(futures)
        raise
    finally:
        restore_handlers(old)
        if bar is not None:
            bar.close()
    summaries = []
    for i, specs in enumerate(plans):
        summary = SweepSummary(planned=len(specs), skipped=len(specs) - len(todo[i]))
        for lane in lanes:
            for status, count in lane[i].done.items():
                summary.done[status] = summary.done.get(status, 0) + count
            summary.run_dirs += lane[i].run_dirs
            summary.voided += lane[i].voided
        # Neither run by a lane nor planned as stored: another process took it.
        summary.elsewhere = max(0, len(todo[i]) - sum(summary.done.values()))
        summaries.append(summary)
    return summaries


def _stop_lanes(futures: list[Future], signal_lanes: bool = True) -> None:
    """Interrupt every lane's run (SIGINT: each unwinds as a serial sweep does) and
    wait until every lane is idle again."""
    for f in futures:
        f.cancel()  # a lane not started yet never starts
    for child in multiprocessing.active_children() if signal_lanes else ():
        try:
            os.kill(child.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    while True:
        try:
            wait(futures)
            return
        except KeyboardInterrupt:  # a second Ctrl-C: the lanes are unwinding already
            continue


# ---- in a lane process -------------------------------------------------------

def _lane_init() -> None:
    """A lane's process: its own process group (the terminal's Ctrl-C comes
    through the parent, once), SIGTERM when the parent dies, SIGINT ignored
    between sweeps (nothing to unwind there)."""
    os.setpgid(0, 0)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:
        sys.exit(1)  # the parent died before PR_SET_PDEATHSIG took effect
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _chain(scenarios: list[Scenario], root: Path, retry_failed: bool) -> list[SweepSummary]:
    """One lane sweeping scenarios in turn (serially, testbed reuse within each)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return [sweep(s, root, retry_failed=retry_failed, progress=False) for s in scenarios]
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _lane(scenarios: list[Scenario], root: Path, retry_failed: bool, lane: int = 0,
          lanes: int = 1, plans: list[dict] | None = None) -> list[SweepSummary]:
    """One lane: the serial sweep of each scenario in turn, taking whichever
    planned run no other lane holds, starting at a testbed identity of its own;
    plans: the runs the parent planned per scenario (None: each sweep plans)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return [sweep(s, root, retry_failed=retry_failed, progress=False, lane=lane, lanes=lanes,
                      planned=plans[i] if plans is not None else None)
                for i, s in enumerate(scenarios)]
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
