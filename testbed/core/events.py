"""Events: the timed faults and changes a run applies to a built testbed (the "what").

Scenario files list them as `[[events]]`; experiments build them in code. Each
is validated when it is created, so a scenario with a bad event is refused at
load, before any namespace exists. Applying one is `Testbed.apply_event`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

from pydantic import (BaseModel, Field, PrivateAttr, ValidationError, create_model,
                      field_serializer, model_serializer, model_validator)
from pydantic.fields import FieldInfo

from testbed.base.errors import TestbedError, format_validation_error
from testbed.base.strict import FrozenStrict, Strict
from testbed.core.emulation.base import Direction
from testbed.core.faults import MIDDLEBOX
from testbed.core.model import LinkParams, TopologySpec

Action = Literal["link_down", "link_up", "blackhole", "unblackhole", "set_link",
                 "syn_drop", "syn_pass", "mptcp_drop", "mptcp_strip", "middlebox_off",
                 "backup_on", "backup_off", "cross_start", "cross_stop"]
CROSS_ACTIONS = ("cross_start", "cross_stop")  # name a cross-traffic flow, not a path
MIDDLEBOXES = tuple(MIDDLEBOX)
# What a shared bottleneck (no carrier of its own, no endpoint, no router port) supports.
BOTTLENECK_ACTIONS = ("set_link", "blackhole", "unblackhole")
MAX_AT_S = 86_400.0  # a day: events of longer runs are a typo, not an experiment


def _partial(model: type[BaseModel], name: str, doc: str) -> type[BaseModel]:
    """`model` with every field optional (default unset), each keeping its own range."""
    fields: dict[str, Any] = {
        f: (Optional[info.annotation], FieldInfo.merge_field_infos(info, default=None))
        for f, info in model.model_fields.items()}
    return create_model(name, __base__=FrozenStrict, __doc__=doc, **fields)


_LinkChangesBase = _partial(LinkParams, "_LinkChangesBase", "")


class LinkChanges(_LinkChangesBase):  # type: ignore[misc,valid-type]
    """set_link: the LinkParams fields to change, each within LinkParams' own range;
    fields not given keep the link's current value."""

    _as_written: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _only_link_fields(cls, data: Any, handler: Any) -> Any:
        if isinstance(data, dict):
            other = sorted(set(data) - set(LinkParams.model_fields))
            if other:
                raise ValueError(f"{', '.join(other)} cannot change during a run "
                                 f"(set_link changes: {', '.join(LinkParams.model_fields)})")
        model = handler(data)
        if isinstance(data, dict):
            # Kept as the scenario wrote it (100, not 100.0): run ids hash the dump.
            model._as_written = dict(data)
        return model

    def as_written(self) -> dict[str, Any]:
        """The changes as the scenario gave them (validated: same values)."""
        return dict(self._as_written) if self._as_written else self.model_dump(exclude_unset=True)

    def given(self) -> dict[str, Any]:
        """The fields this change sets (field -> new value)."""
        return {f: getattr(self, f) for f in type(self).model_fields if f in self.model_fields_set}


class EventSpec(Strict):
    """A timed fault or change, relative to the workload start (at_s=0: before it)."""

    at_s: float = Field(ge=0, le=MAX_AT_S)
    action: Action
    path: str | None = Field(None, description="path or link name (every action but cross_*)")
    flow: str | None = Field(None, description="cross_start/cross_stop: the cross-traffic flow")
    direction: Literal["up", "down", "both"] = "both"
    changes: LinkChanges = Field(default_factory=LinkChanges, description="set_link: LinkParams fields")

    @model_validator(mode="after")
    def _changes_only_for_set_link(self) -> "EventSpec":
        if self.action in CROSS_ACTIONS:
            if self.flow is None:
                raise ValueError(f"{self.action} needs flow (a name from [[cross]])")
            if self.path is not None:
                raise ValueError(f"{self.action} takes flow, not path")
        else:
            if self.flow is not None:
                raise ValueError("flow only goes with cross_start and cross_stop")
            if self.path is None:
                raise ValueError(f"{self.action} needs path")
        if self.action == "set_link" and not self.changes.model_fields_set:
            raise ValueError("set_link needs changes, e.g. changes = { loss_pct = 100 }")
        if self.action != "set_link" and self.changes.model_fields_set:
            raise ValueError(f"changes only go with set_link, not {self.action}")
        return self

    @field_serializer("changes")
    def _changes_as_given(self, changes: LinkChanges) -> dict[str, Any]:
        # Only what the scenario set, as written: stored manifests and run ids stay as they were.
        return changes.as_written()

    @model_serializer(mode="wrap")
    def _without_unused_target(self, handler: Any) -> dict[str, Any]:
        # A link event has no flow and a cross event no path: left out, so the
        # dumps (and run ids) of scenarios written before cross traffic stay as they were.
        data = handler(self)
        for key in ("path", "flow"):
            if data.get(key) is None:
                data.pop(key, None)
        return data

    def directions(self) -> tuple[Direction, ...]:
        """The link directions this event touches."""
        return ("up", "down") if self.direction == "both" else (self.direction,)

    def describe(self) -> str:
        """One line for logs and the events table, e.g. "set_link wifi/up {'loss_pct': 100}"."""
        if self.action in CROSS_ACTIONS:
            return f"{self.action} {self.flow}"
        where = f"{self.path}" + ("" if self.direction == "both" else f"/{self.direction}")
        given = self.changes.as_written()
        return f"{self.action} {where}" + (f" {given}" if given else "")


class LinkState(FrozenStrict):
    """One emulated link as it is now: parameters per direction and the faults in force."""

    up: LinkParams
    down: LinkParams
    carrier: bool = True  # False after link_down (the client's interface is down)
    blackholed: tuple[Direction, ...] = ()
    middlebox: str | None = None  # the nftables middlebox on the path, if any
    backup: bool | None = None  # the client endpoint's backup flag; None: no endpoint


@dataclass(frozen=True)
class AppliedEvent:
    """What applying one event did. Times are time.monotonic() seconds."""

    event: EventSpec
    scheduled: float  # when it was due (for an immediate change: when it was asked for)
    began: float  # when applying started
    done: float  # when the last step returned
    applied: float  # when it took effect: the emulator's own clock where it has one, else done
    emulator_clock: bool  # `applied` is the emulator's timestamp
    ok: bool
    error: str | None
    link: LinkState | None  # the link right after (None: the event named no link)

    @property
    def start_lateness_ms(self) -> float:
        """How late applying began."""
        return round((self.began - self.scheduled) * 1000, 3)

    @property
    def applied_lateness_ms(self) -> float:
        """How late the change took effect."""
        return round((self.applied - self.scheduled) * 1000, 3)

    def record(self, t0: float) -> dict[str, Any]:
        """JSON-ready, times in seconds relative to t0 (the stored `applied_events`)."""
        return {"at_s": self.event.at_s, "event": self.event.describe(),
                "action": self.event.action, "path": self.event.path, "flow": self.event.flow,
                "direction": self.event.direction, "changes": self.event.changes.as_written(),
                "scheduled_s": round(self.scheduled - t0, 6), "began_s": round(self.began - t0, 6),
                "applied_s": round(self.applied - t0, 6), "done_s": round(self.done - t0, 6),
                "emulator_clock": self.emulator_clock,
                "start_lateness_ms": self.start_lateness_ms,
                "applied_lateness_ms": self.applied_lateness_ms,
                "ok": self.ok, "error": self.error,
                "link": self.link.model_dump(mode="json") if self.link is not None else None}


def check_events(events: Sequence[EventSpec], topology: TopologySpec,
                 client_path_manager: str = "kernel", cross: Sequence[str] = ()) -> None:
    """Refuse, as TestbedError naming `events.<i>.<key>`, any event this topology
    cannot carry out: an unknown path, an action the bottleneck has no means for,
    MP_PRIO without a client endpoint, set_link changes that leave the link
    outside the model's ranges (checked cumulatively, in the order events apply),
    or a cross-traffic flow that is not among `cross` (the declared flows' names)."""
    graph = topology.graph()
    # Every emulated link takes events; a path's own (client access) link takes them all.
    links = {link.name: ({d: link.spec.direction(d) for d in ("up", "down")}, link.spec.mtu)
             for link in graph.links if link.spec.emulated}
    path_client = {p.name: p.client for p in graph.paths}
    for i in sorted(range(len(events)), key=lambda i: events[i].at_s):  # the order they apply in
        e = events[i]
        if e.action in CROSS_ACTIONS:
            if e.flow not in cross:
                raise TestbedError(f"events.{i}.flow: no cross-traffic flow {e.flow!r} "
                                   f"(flows: {', '.join(cross) or 'none declared'})")
            continue
        if e.path not in links:
            raise TestbedError(f"events.{i}.path: no path {e.path!r} in topology {topology.name!r} "
                               f"(paths: {', '.join(links)})")
        what = "the bottleneck" if e.path == "bottleneck" else f"link {e.path!r}"
        if e.path not in path_client and e.action in ("link_down", "link_up"):
            raise TestbedError(f"events.{i}.path: {what} has no carrier to take down; "
                               "use action 'blackhole'")
        if e.path not in path_client and e.action not in BOTTLENECK_ACTIONS:
            raise TestbedError(f"events.{i}.path: {e.action} needs a path; {what} takes "
                               f"{', '.join(BOTTLENECK_ACTIONS)}")
        if e.action in ("backup_on", "backup_off"):
            spec = topology.path(e.path)
            if client_path_manager != "kernel":
                raise TestbedError(f"events.{i}.action: {e.action} flips a kernel path-manager "
                                   "endpoint; hosts.client.path_manager is not 'kernel'")
            if e.path == graph.default_links[path_client[e.path]] or not (
                    spec.client_endpoint or spec.backup):
                raise TestbedError(f"events.{i}.path: {e.action} needs a client endpoint on "
                                   f"{e.path!r}, and it has none (the default path never does)")
        if e.action == "set_link":
            params, mtu = links[e.path]
            for d in e.directions():
                try:
                    params[d] = LinkParams(**{**params[d].model_dump(), **e.changes.given()})
                    params[d].check_queue(params["up"].delay_ms + params["down"].delay_ms, mtu)
                except ValidationError as exc:
                    raise TestbedError(format_validation_error(f"events.{i}.changes", exc)) from None
                except ValueError as exc:
                    raise TestbedError(f"events.{i}.changes: {exc}") from None
