"""Scenario files: one TOML file says what to run, on what, how often.

    experiment = "throughput"        # a registered experiment type
    repetitions = 5
    seed = 1
    [topology]                       # by name + params, or inline `spec = {...}`
    name = "two-path"
    params = { rate_mbit = 20 }
    [hosts.client]                   # HostSettings (MPTCP sysctls, cc)
    [params]                         # the experiment type's own parameters
    [[events]]                       # timed faults / link changes
    at_s = 3.0
    action = "link_down"
    path = "wifi"
    [grid]                           # cross product over dotted keys
    "params.cc" = ["cubic", "bbr"]

Everything is validated before anything starts: unknown keys, wrong types,
values out of the model's ranges, unknown names (experiment type, topology,
backend, probe, MPTCP scheduler), events this topology cannot carry out and a
grid over a key that does not exist or larger than MAX_GRID_POINTS are each a
one-line error naming the key and the bound.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from testbed.base.errors import TestbedError, format_validation_error
from testbed.base.strict import Strict
from testbed.base.tomlfile import read_toml
from testbed.core import emulation, mptcp_config
from testbed.core.cross import CrossFlow, check_cross
from testbed.core.events import EventSpec, check_events
from testbed.core.model import HostSettings, TopologySpec
from testbed.core.topology import apply_overrides, from_dict, load as load_topology, set_dotted


class TopologyRef(Strict):
    """The scenario's topology: a registered name with parameters, or an inline spec."""
    name: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    spec: dict[str, Any] | None = None  # an inline topology

    def resolve(self) -> TopologySpec:
        """The TopologySpec this reference names, overrides applied."""
        if self.spec is not None:
            return from_dict({"name": "inline", **self.spec}, where="scenario topology.spec")
        if self.name is None:
            raise TestbedError("scenario topology: give `name` or `spec`")
        return load_topology(self.name, **self.params)


class Hosts(Strict):
    """MPTCP settings of the client and the server."""
    client: HostSettings = Field(default_factory=HostSettings)
    server: HostSettings = Field(default_factory=HostSettings)

    @model_validator(mode="after")
    def _one_congestion_control(self) -> "Hosts":
        # The workloads set the client's choice on the sockets of both ends (iperf3
        # -C, the app's --cc): a server value of its own would never be used. (The
        # default stands for "not chosen": a grid point's dump carries it.)
        default = HostSettings.model_fields["congestion_control"].default
        if self.server.congestion_control not in (default, self.client.congestion_control):
            raise ValueError(f"hosts.server.congestion_control {self.server.congestion_control!r} "
                             "is not applied: a connection uses hosts.client.congestion_control "
                             f"({self.client.congestion_control!r}) at both ends; set that")
        return self


MAX_TIMEOUT_S = 86_400.0  # a day per run
MAX_GRID_POINTS = 10_000  # grid points per scenario (each is validated at load)
MAX_RUNS = 100_000  # grid points x repetitions
MAX_CROSS_FLOWS = 16  # each is two threads of the runner's process
# A testbed kept across runs is calibrated fully when built and then every N
# runs, the runs in between get the drift check (testbed.core.emulation.drift).
CALIBRATE_EVERY = 10
VOID_RETRIES = 1


class Scenario(Strict):
    """One scenario file, validated: what to run, on what, how often."""

    experiment: str
    description: str = ""
    repetitions: int = Field(1, ge=1, le=10_000)
    seed: int = 1
    timeout_s: float = Field(300, gt=0, le=MAX_TIMEOUT_S)
    backend: str = "auto"
    calibrate: bool = True
    calibrate_every: int = Field(CALIBRATE_EVERY, ge=1, le=10_000)  # full calibration every N runs
    # A run the testbed itself voided (its calibration or drift check out of
    # tolerance, the link emulator late during the run) is run again up to N times;
    # the stored run lists the voided attempts with their reasons.
    void_retries: int = Field(VOID_RETRIES, ge=0, le=5)
    topology: TopologyRef
    hosts: Hosts = Field(default_factory=Hosts)
    params: dict[str, Any] = Field(default_factory=dict)
    events: list[EventSpec] = Field(default_factory=list)
    # Competing flows, started and stopped by events (cross_start/cross_stop).
    cross: list[CrossFlow] = Field(default_factory=list, max_length=MAX_CROSS_FLOWS)
    probes: list[str] = Field(default_factory=lambda: ["pm_events", "nstat", "subflows"])
    probe_interval_ms: float = Field(50, gt=0)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    path: str | None = None  # where it was loaded from (recorded, not user-set)


IDENTITY_EXCLUDED = {"repetitions", "description", "path", "timeout_s", "calibrate_every",
                     "void_retries"}


@dataclass(frozen=True)
class RunSpec:
    """One (grid point, repetition) of a scenario: what the runner executes."""

    scenario: Scenario  # with the grid point applied and the grid removed
    params: dict[str, Any]  # the grid point (dotted key -> value)
    repetition: int
    seed: int

    @property
    def point_id(self) -> str:
        """Hash of everything that shapes the measurement: two scenario files
        sharing an experiment type never share run ids, while raising
        `repetitions` (or the timeout) resumes the same points."""
        # No cross traffic leaves `cross` out: run ids from before it existed hold.
        unused = set() if self.scenario.cross else {"cross"}
        what = self.scenario.model_dump(mode="json", exclude=IDENTITY_EXCLUDED | unused)
        blob = json.dumps(what, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    @property
    def run_id(self) -> str:
        """The run's id: its grid point's id and repetition number."""
        return f"{self.point_id}-r{self.repetition:03d}"


def load(path: str | Path, overrides: dict[str, Any] | None = None,
         repetitions: int | None = None) -> Scenario:
    """Load and validate a scenario file with --set overrides; TestbedError naming the key."""
    p = Path(path)
    data = read_toml(p, "scenario file")
    overrides = overrides or {}
    # A --set on a key the grid sweeps pins it: otherwise the grid would silently
    # replace the user's value in every run (and a bad value would never be checked).
    grid = data.get("grid")
    if isinstance(grid, dict):
        pinned = [k for k in grid if any(k == key or k.startswith(key + ".") for key in overrides)]
        data["grid"] = {k: v for k, v in grid.items() if k not in pinned}
    try:
        data = apply_overrides(data, overrides)
    except TestbedError as exc:
        raise TestbedError(f"{p}: {exc}") from None
    if repetitions is not None:
        data["repetitions"] = repetitions
    data["path"] = str(p)
    return validate(data, where=str(p))


def validate(data: dict[str, Any], where: str = "scenario") -> Scenario:
    """Validate everything that can be checked before a single namespace exists."""
    from testbed.harness.experiment import experiment_class

    try:
        scenario = Scenario(**data)
    except ValidationError as exc:
        raise TestbedError(format_validation_error(where, exc)) from None
    experiment = experiment_class(scenario.experiment)
    plain = scenario.model_dump()
    for key, values in scenario.grid.items():
        if not values:
            raise TestbedError(f"{where}: grid.{key}: empty list of values")
        if not _exists(plain, key) and not _experiment_param(experiment, key):
            raise TestbedError(f"{where}: grid.{key}: no such parameter in the scenario")
    points = math.prod(len(v) for v in scenario.grid.values())
    if points > MAX_GRID_POINTS:
        raise TestbedError(f"{where}: grid: {' x '.join(str(len(v)) for v in scenario.grid.values())} "
                           f"= {points} points, more than MAX_GRID_POINTS = {MAX_GRID_POINTS}")
    if points * scenario.repetitions > MAX_RUNS:
        raise TestbedError(f"{where}: repetitions: {points} grid points x {scenario.repetitions} "
                           f"= {points * scenario.repetitions} runs, more than MAX_RUNS = {MAX_RUNS}")
    for spec in expand(scenario, validate_only=True):
        try:
            _check_names(spec.scenario)
            topology = spec.scenario.topology.resolve()
            check_cross(spec.scenario.cross, topology)
            check_events(spec.scenario.events, topology, spec.scenario.hosts.client.path_manager,
                         cross=[f.name for f in spec.scenario.cross])
            _check_cross_started(spec.scenario)
            experiment.check_topology(experiment.validate_params(spec.scenario.params), topology)
        except TestbedError as exc:
            point = f" (grid point {spec.params})" if spec.params else ""
            raise TestbedError(f"{where}: {exc}{point}") from None
    return scenario


def _check_cross_started(scenario: Scenario) -> None:
    """A declared cross flow that no event starts is a typo, not an experiment."""
    started = {e.flow for e in scenario.events if e.action == "cross_start"}
    for i, flow in enumerate(scenario.cross):
        if flow.name not in started:
            raise TestbedError(f"cross.{i}: flow {flow.name!r} is never started (add an event "
                               f"with action = 'cross_start', flow = '{flow.name}')")


def _check_names(scenario: Scenario) -> None:
    """Names that only a registry or this kernel knows: backend, probes, MPTCP scheduler."""
    known_backends = emulation.backends()
    if scenario.backend != "auto" and scenario.backend not in known_backends:
        raise TestbedError(f"backend: unknown link-emulation backend {scenario.backend!r} "
                           f"(known: auto, {', '.join(known_backends)})")
    from testbed.harness import probes

    known = probes.available()
    for i, name in enumerate(scenario.probes):
        if name not in known:
            raise TestbedError(f"probes.{i}: unknown probe {name!r} (known: {', '.join(known)})")
    schedulers = mptcp_config.available_schedulers()
    for role in ("client", "server"):
        name = getattr(scenario.hosts, role).scheduler
        if name not in schedulers:
            raise TestbedError(f"hosts.{role}.scheduler: {name!r} is not an MPTCP scheduler of "
                               f"this kernel (available: {', '.join(schedulers)})")


def _exists(data: dict[str, Any], key: str) -> bool:
    node: Any = data
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def _experiment_param(experiment: Any, key: str) -> bool:
    """params.<field> of the experiment type, or topology.params.<anything>."""
    if key.startswith("topology.params."):
        return True
    return key.startswith("params.") and key.split(".", 1)[1] in experiment.Params.model_fields


def expand(scenario: Scenario, validate_only: bool = False) -> list[RunSpec]:
    """Cross product of the grid x repetitions, in an order shuffled by the seed
    (so slow drift of the machine is not confounded with a parameter)."""
    keys = sorted(scenario.grid)
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(scenario.grid[k] for k in keys))]
    base = scenario.model_dump(exclude={"grid"})
    specs = []
    for point in points or [{}]:
        data = apply_overrides(base, {})
        for key, value in point.items():
            set_dotted(data, key, value)
        try:
            applied = Scenario(**data)
        except ValidationError as exc:
            raise TestbedError(format_validation_error(f"scenario grid point {point}", exc)) from None
        reps = 1 if validate_only else scenario.repetitions
        for rep in range(reps):
            specs.append(RunSpec(applied, point, rep, seed=_run_seed(scenario.seed, point, rep)))
    if not validate_only:
        random.Random(scenario.seed).shuffle(specs)
    return specs


def _run_seed(seed: int, point: dict[str, Any], rep: int) -> int:
    blob = json.dumps([seed, point, rep], sort_keys=True, default=str)
    return int(hashlib.sha256(blob.encode()).hexdigest()[:8], 16)
