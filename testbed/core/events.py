"""Events: the timed faults and changes a run applies to a built testbed (the "what").

Scenario files list them as `[[events]]`; experiments build them in code. Each
is validated when it is created, so a scenario with a bad event is refused at
load, before any namespace exists. Applying one is `Testbed.apply_event`.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Action = Literal["link_down", "link_up", "blackhole", "unblackhole", "set_link",
                 "syn_drop", "syn_pass", "mptcp_drop", "mptcp_strip", "middlebox_off",
                 "backup_on", "backup_off"]


class EventSpec(BaseModel):
    """A timed fault or change, relative to the workload start (at_s=0: before it)."""

    model_config = ConfigDict(extra="forbid")

    at_s: float = Field(ge=0)
    action: Action
    path: str = Field(description="path name, or 'bottleneck' for set_link")
    direction: Literal["up", "down", "both"] = "both"
    changes: dict[str, Any] = Field(default_factory=dict, description="set_link: LinkParams fields")
