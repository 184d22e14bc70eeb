"""The domain model: paths with link characteristics, topologies, host settings.

Everything is a validated pydantic model with unknown keys forbidden, so a typo
in a TOML file is an error naming the key, never a silently ignored setting.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from testbed.base.strict import FrozenStrict

MAX_PATHS = 8  # the kernel's hard maximum of subflows per connection
PATH_NAME = r"^[a-z][a-z0-9]{0,6}$"  # short: it becomes part of interface names


class GilbertElliott(FrozenStrict):
    """Bursty loss: a two-state Markov chain evaluated per packet."""

    p_pct: float = Field(ge=0, le=100, description="P(good -> bad) per packet, %")
    r_pct: float = Field(gt=0, le=100, description="P(bad -> good) per packet, %")
    bad_loss_pct: float = Field(100, ge=0, le=100)
    good_loss_pct: float = Field(0, ge=0, le=100)

    def mean_loss_pct(self) -> float:
        p, r = self.p_pct / 100, self.r_pct / 100
        bad_share = p / (p + r) if p + r else 0.0
        return bad_share * self.bad_loss_pct + (1 - bad_share) * self.good_loss_pct


class LinkParams(FrozenStrict):
    """What one direction of an emulated link does to packets."""

    rate_mbit: float | None = Field(None, gt=0, le=100_000, description="None: unshaped")
    delay_ms: float = Field(0, ge=0, le=10_000, description="one-way propagation delay")
    jitter_ms: float = Field(0, ge=0, le=10_000)
    loss_pct: float = Field(0, ge=0, le=100, description="independent random loss")
    gilbert: GilbertElliott | None = None
    queue_pkts: int | None = Field(None, ge=1, le=1_000_000)
    queue_bdp: float | None = Field(None, gt=0, le=100, description="queue as multiple of BDP")
    reorder: bool = Field(False, description="let jitter reorder packets")

    @model_validator(mode="after")
    def _one_queue_size(self) -> "LinkParams":
        if self.queue_pkts is not None and self.queue_bdp is not None:
            raise ValueError("give queue_pkts or queue_bdp, not both")
        if self.gilbert is not None and self.loss_pct:
            raise ValueError("give loss_pct or gilbert, not both")
        return self

    def needs_delay_line(self) -> bool:
        return bool(self.delay_ms or self.jitter_ms or self.loss_pct or self.gilbert)

    def queue_limit_pkts(self, rtt_ms: float, mtu: int = 1500) -> int:
        """Bottleneck buffer in packets; default one BDP of the path, at least 20."""
        if self.queue_pkts is not None:
            return self.queue_pkts
        bdp_pkts = (self.rate_mbit or 1000) * 1e6 / 8 * rtt_ms / 1000 / mtu
        return max(20, round(bdp_pkts * (self.queue_bdp or 1.0)))


class DirectionOverride(FrozenStrict):
    """Per-direction overrides; unset fields inherit from the path."""

    rate_mbit: float | None = Field(None, gt=0, le=100_000)
    delay_ms: float | None = Field(None, ge=0, le=10_000)
    jitter_ms: float | None = Field(None, ge=0, le=10_000)
    loss_pct: float | None = Field(None, ge=0, le=100)
    gilbert: GilbertElliott | None = None
    queue_pkts: int | None = Field(None, ge=1, le=1_000_000)


EndpointFlag = Literal["subflow", "signal", "fullmesh"]


class PathSpec(LinkParams):
    """One client-to-server path. Link fields apply to both directions unless
    `up` (client -> server) or `down` (server -> client) override them.

    Endpoints (kernel path manager): the client's address on every path but the
    default one gets `client_endpoint` flags (default: open a subflow from it);
    `server_endpoint` flags apply to the server's address on the path (only with
    a multihomed server; e.g. ["signal"] announces it with ADD_ADDR). `backup`
    adds the backup flag on the client side.
    """

    name: str = Field(pattern=PATH_NAME)
    mtu: int = Field(1500, ge=576, le=9000)
    backup: bool = False
    client_endpoint: list[EndpointFlag] = Field(default_factory=lambda: ["subflow"])
    server_endpoint: list[EndpointFlag] = Field(default_factory=list)
    up: DirectionOverride | None = None
    down: DirectionOverride | None = None

    @model_validator(mode="after")
    def _fullmesh_needs_subflow(self) -> "PathSpec":
        for side in ("client_endpoint", "server_endpoint"):
            flags = getattr(self, side)
            if "fullmesh" in flags and "subflow" not in flags:
                raise ValueError(f"{side}: fullmesh needs subflow too")
            if "fullmesh" in flags and "signal" in flags:
                raise ValueError(f"{side}: fullmesh and signal exclude each other")
        return self

    def direction(self, which: Literal["up", "down"]) -> LinkParams:
        base = {k: getattr(self, k) for k in LinkParams.model_fields}
        override = self.up if which == "up" else self.down
        if override is not None:
            base.update({k: v for k, v in override.model_dump().items() if v is not None})
        return LinkParams(**base)

    def rtt_ms(self) -> float:
        return self.direction("up").delay_ms + self.direction("down").delay_ms


class BottleneckSpec(LinkParams):
    """A link shared by all paths, between the router and the server."""

    mtu: int = Field(1500, ge=576, le=9000)


class TopologySpec(FrozenStrict):
    """A client and a server joined by 1..8 paths.

    server_side = "router": every path ends at a router in front of a
    single-homed server (WiFi + LTE to a server on the Internet); with a
    `bottleneck` the router-server link is emulated and shared by all paths.
    server_side = "multihomed": each path ends at its own server interface.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    description: str = ""
    paths: list[PathSpec] = Field(min_length=1, max_length=MAX_PATHS)
    default_path: str | None = Field(None, description="path holding the default route")
    server_side: Literal["router", "multihomed"] = "router"
    bottleneck: BottleneckSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "TopologySpec":
        names = [p.name for p in self.paths]
        if len(set(names)) != len(names):
            raise ValueError(f"path names must be unique, got {names}")
        if self.default_path is not None and self.default_path not in names:
            raise ValueError(f"default_path {self.default_path!r} is not one of {names}")
        if self.bottleneck is not None and self.server_side != "router":
            raise ValueError("a bottleneck needs server_side = 'router'")
        if self.server_side == "router" and any(p.server_endpoint for p in self.paths):
            raise ValueError("server_endpoint needs server_side = 'multihomed' "
                             "(a single-homed server has one address)")
        return self

    @property
    def default(self) -> PathSpec:
        name = self.default_path or self.paths[0].name
        return next(p for p in self.paths if p.name == name)

    def path(self, name: str) -> PathSpec:
        for p in self.paths:
            if p.name == name:
                return p
        raise KeyError(name)

    def needs_delay_line(self) -> bool:
        links: list[LinkParams] = [p.direction(d) for p in self.paths for d in ("up", "down")]
        if self.bottleneck is not None:
            links.append(self.bottleneck)
        return any(link.needs_delay_line() for link in links)


class HostSettings(FrozenStrict):
    """MPTCP settings of one host: pinned in its namespace and recorded.

    Defaults are the kernel's, except blackhole_timeout = 0: blackhole detection
    would silently turn MPTCP off for an hour after exactly the failures that
    establishment experiments provoke.
    """

    enabled: Literal[0, 1] = 1
    path_manager: Literal["kernel", "userspace"] = "kernel"
    blackhole_timeout: int = Field(0, ge=0)
    syn_retrans_before_tcp_fallback: int = Field(2, ge=0, le=255)
    stale_loss_cnt: int = Field(4, ge=1)
    add_addr_timeout: int = Field(120, ge=0)
    checksum_enabled: Literal[0, 1] = 0
    close_timeout: int = Field(60, ge=0)
    allow_join_initial_addr_port: Literal[0, 1] = 1
    scheduler: str = "default"
    congestion_control: Literal["cubic", "reno", "bbr"] = Field(
        "cubic", description="set per socket: a namespace cannot change the default"
    )

    def sysctls(self) -> dict[str, str | int]:
        skip = {"congestion_control"}
        return {f"net.mptcp.{k}": v for k, v in self.model_dump().items() if k not in skip}
