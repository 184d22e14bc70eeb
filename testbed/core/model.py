"""The domain model: paths with link characteristics, topologies, host settings.

Everything is a validated pydantic model with unknown keys forbidden, so a typo
in a TOML file is an error naming the key, never a silently ignored setting.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, Literal, NamedTuple, Sequence

from pydantic import Field, model_validator

from testbed.base.strict import FrozenStrict

if TYPE_CHECKING:
    from testbed.core.addressing import Graph

MAX_PATHS = 8  # the kernel's hard maximum of subflows per connection
PATH_NAME = r"^[a-z][a-z0-9]{0,6}$"  # short: it becomes part of interface names
# HTB takes its rate in whole kbit/s: below 10 kbit/s the rounding error passes
# 5 %, and under 0.5 kbit/s the rate becomes "0kbit".
MIN_RATE_MBIT = 0.01
MAX_QUEUE_PKTS = 1_000_000  # a bottleneck queue's limit in packets (pfifo holds a u32)
INT_MAX = 2**31 - 1  # the kernel's MPTCP sysctls are C ints


class GilbertElliott(FrozenStrict):
    """Bursty loss: a two-state Markov chain evaluated per packet."""

    p_pct: float = Field(ge=0, le=100, description="P(good -> bad) per packet, %")
    r_pct: float = Field(gt=0, le=100, description="P(bad -> good) per packet, %")
    bad_loss_pct: float = Field(100, ge=0, le=100)
    good_loss_pct: float = Field(0, ge=0, le=100)

    def mean_loss_pct(self) -> float:
        """The long-run loss rate of the two-state model, in percent."""
        p, r = self.p_pct / 100, self.r_pct / 100
        bad_share = p / (p + r) if p + r else 0.0
        return bad_share * self.bad_loss_pct + (1 - bad_share) * self.good_loss_pct


class LinkParams(FrozenStrict):
    """What one direction of an emulated link does to packets."""

    rate_mbit: float | None = Field(None, ge=MIN_RATE_MBIT, le=100_000, description="None: unshaped")
    delay_ms: float = Field(0, ge=0, le=10_000, description="one-way propagation delay")
    jitter_ms: float = Field(0, ge=0, le=10_000)
    loss_pct: float = Field(0, ge=0, le=100, description="independent random loss")
    gilbert: GilbertElliott | None = None
    queue_pkts: int | None = Field(None, ge=1, le=MAX_QUEUE_PKTS)
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
        """True when these parameters need delay, jitter or loss emulation."""
        return bool(self.delay_ms or self.jitter_ms or self.loss_pct or self.gilbert)

    def queue_limit_pkts(self, rtt_ms: float, mtu: int = 1500) -> int:
        """Bottleneck buffer in packets; default one BDP of the path, at least 20."""
        if self.queue_pkts is not None:
            return self.queue_pkts
        bdp_pkts = (self.rate_mbit or 1000) * 1e6 / 8 * rtt_ms / 1000 / mtu
        return max(20, round(bdp_pkts * (self.queue_bdp or 1.0)))

    def check_queue(self, rtt_ms: float, mtu: int) -> None:
        """Refuse a queue in BDPs larger than a queue can hold (ValueError naming the bound)."""
        limit = self.queue_limit_pkts(max(rtt_ms, 1.0), mtu)
        if limit > MAX_QUEUE_PKTS:
            raise ValueError(f"queue of {limit} packets ({self.queue_bdp or 1:g} BDP at "
                             f"{self.rate_mbit} Mbit/s, RTT {rtt_ms:g} ms) is more than "
                             f"{MAX_QUEUE_PKTS} packets: lower queue_bdp or give queue_pkts")


class DirectionOverride(FrozenStrict):
    """Per-direction overrides; unset fields inherit from the path."""

    rate_mbit: float | None = Field(None, ge=MIN_RATE_MBIT, le=100_000)
    delay_ms: float | None = Field(None, ge=0, le=10_000)
    jitter_ms: float | None = Field(None, ge=0, le=10_000)
    loss_pct: float | None = Field(None, ge=0, le=100)
    gilbert: GilbertElliott | None = None
    queue_pkts: int | None = Field(None, ge=1, le=MAX_QUEUE_PKTS)


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
        for which in ("up", "down"):
            self.direction(which).check_queue(self.rtt_ms(), self.mtu)
        return self

    def direction(self, which: Literal["up", "down"]) -> LinkParams:
        """The link parameters of one direction: the path's own with that direction's overrides."""
        base = {k: getattr(self, k) for k in LinkParams.model_fields}
        override = self.up if which == "up" else self.down
        if override is not None:
            base.update({k: v for k, v in override.model_dump().items() if v is not None})
        return LinkParams(**base)

    def rtt_ms(self) -> float:
        """The configured round-trip delay (up + down)."""
        return self.direction("up").delay_ms + self.direction("down").delay_ms


class BottleneckSpec(LinkParams):
    """A link shared by all paths, between the router and the server."""

    mtu: int = Field(1500, ge=576, le=9000)

    @model_validator(mode="after")
    def _queue_fits(self) -> "BottleneckSpec":
        self.check_queue(2 * self.delay_ms, self.mtu)
        return self


class Hop(NamedTuple):
    """One link a path crosses: its parameters in the path's up (client -> server)
    and down directions, and its MTU."""

    name: str
    up: LinkParams
    down: LinkParams
    mtu: int = 1500


class ComposedPath(FrozenStrict):
    """What a path does end to end, composed from the links it crosses
    (`compose_path`; docs/topologies.md): per direction one LinkParams."""

    links: tuple[str, ...]
    up: LinkParams
    down: LinkParams
    mtu: int
    slowest: dict[str, str | None]  # direction -> the link that sets its rate (None: unshaped)

    def direction(self, which: Literal["up", "down"]) -> LinkParams:
        """The composed parameters of one direction."""
        return self.up if which == "up" else self.down

    def rtt_ms(self) -> float:
        """The configured round-trip delay (up + down)."""
        return self.up.delay_ms + self.down.delay_ms


def _loss_fraction(p: LinkParams) -> float:
    return (p.gilbert.mean_loss_pct() if p.gilbert is not None else p.loss_pct) / 100


def compose_path(hops: Sequence[Hop]) -> ComposedPath:
    """A path's characteristics from its links, client first: per direction the
    one-way delays add, the rate is the slowest link's (its queue, in packets as
    that link is built, is where a standing queue forms), independent losses
    combine as 1 - prod(1 - p) (a Gilbert-Elliott link by its mean, kept as the
    chain when it is the only lossy link), the uniform jitters add (the widest
    deviation they can sum to), reorder if any link reorders, and the MTU is the
    smallest."""
    out: dict[str, LinkParams] = {}
    slowest: dict[str, str | None] = {}
    for d in ("up", "down"):
        params = [(h, h.up if d == "up" else h.down) for h in hops]
        shaped = [(h, p) for h, p in params if p.rate_mbit is not None]
        slow = min(shaped, key=lambda hp: hp[1].rate_mbit or 0, default=None)
        slowest[d] = slow[0].name if slow is not None else None
        queue = None
        if slow is not None:
            h, p = slow
            queue = p.queue_limit_pkts(max(h.up.delay_ms + h.down.delay_ms, 1.0), h.mtu)
        lossy = [p for _h, p in params if _loss_fraction(p) > 0]
        keep = {"gilbert": lossy[0].gilbert} if len(lossy) == 1 and lossy[0].gilbert else {
            "loss_pct": 100 * (1 - math.prod(1 - _loss_fraction(p) for p in lossy))}
        out[d] = LinkParams(rate_mbit=slow[1].rate_mbit if slow is not None else None,
                            delay_ms=sum(p.delay_ms for _h, p in params),
                            jitter_ms=sum(p.jitter_ms for _h, p in params),
                            queue_pkts=queue, reorder=any(p.reorder for _h, p in params), **keep)
    return ComposedPath(links=tuple(h.name for h in hops), up=out["up"], down=out["down"],
                        mtu=min((h.mtu for h in hops), default=1500), slowest=slowest)


NODE_NAME = r"^[a-z][a-z0-9]{0,5}$"  # short: "<node>-<link>" names an interface
LINK_NAME = r"^[a-z][a-z0-9]{0,9}$"
IFNAME_MAX = 15  # IFNAMSIZ - 1
NodeRole = Literal["client", "server", "host", "router"]


class NodeSpec(FrozenStrict):
    """A node of a general topology: an MPTCP client, a server, a cross-traffic
    host, or a router (the only role that forwards)."""

    name: str = Field(pattern=NODE_NAME)
    role: NodeRole


class LinkSpec(PathSpec):
    """A link between nodes `a` and `b`, emulated like a path (`up` is a -> b).

    `emulated = false` makes it a plain veth pair (no emulator, no changes during
    a run); `cost` is the routing metric (a loop needs costs that pick one way);
    `net` picks its subnet 10.<net>.0.0/24 (default: its 1-based position).
    Endpoint flags apply where the link touches a client (client_endpoint,
    backup) or a server (server_endpoint).
    """

    name: str = Field(pattern=LINK_NAME)
    a: str = Field(pattern=NODE_NAME)
    b: str = Field(pattern=NODE_NAME)
    emulated: bool = True
    cost: int = Field(1, ge=1, le=1000)
    net: int | None = Field(None, ge=1, le=254)

    def path_spec(self) -> PathSpec:
        """This link's characteristics as a PathSpec (the path it starts, as built)."""
        return PathSpec(**{k: getattr(self, k) for k in PathSpec.model_fields})


class TopologySpec(FrozenStrict):
    """Clients, servers, cross-traffic hosts and routers joined by emulated links.

    Two ways to write one (docs/topologies.md):
    - `paths` (the shorthand): one client and one server joined by 1..8 paths.
      server_side = "router": every path ends at a router in front of a
      single-homed server (WiFi + LTE to a server on the Internet); with a
      `bottleneck` the router-server link is emulated and shared by all paths.
      server_side = "multihomed": each path ends at its own server interface.
    - `nodes` and `links`: any graph. Addresses and routes are derived
      (testbed.core.addressing); a path is what routing gives from a client's
      interface to the server.
    Both compile to the same graph (`graph()`), which is what Testbed builds.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    description: str = ""
    paths: list[PathSpec] = Field(default_factory=list, max_length=MAX_PATHS)
    default_path: str | None = Field(None, description="path holding the default route")
    server_side: Literal["router", "multihomed"] = "router"
    bottleneck: BottleneckSpec | None = None
    nodes: list[NodeSpec] = Field(default_factory=list, max_length=64)
    links: list[LinkSpec] = Field(default_factory=list, max_length=254)

    @model_validator(mode="after")
    def _consistent(self) -> "TopologySpec":
        if self.nodes or self.links:
            if self.paths or self.bottleneck is not None or self.server_side != "router":
                raise ValueError("give either paths (with server_side, bottleneck) or nodes "
                                 "and links, not both")
            self.graph()  # a graph that cannot be routed is refused here, at load
            return self
        if not self.paths:
            raise ValueError("paths: give at least 1 path (or nodes and links)")
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

    def graph(self) -> "Graph":
        """The topology as built: nodes, addressed links, routes and paths."""
        # Imported here: addressing derives from this model, so it imports it.
        from testbed.core.addressing import compile_graph
        return compile_graph(self)

    def path_specs(self) -> list[PathSpec]:
        """Every client's paths (the first client's first), as PathSpecs."""
        return [p.spec for p in self.graph().paths]

    @property
    def default(self) -> PathSpec:
        """The first client's path holding its default route."""
        return self.graph().default_path().spec

    def path(self, name: str) -> PathSpec:
        """The path with this name; ValueError naming the known ones."""
        for p in self.path_specs():
            if p.name == name:
                return p
        raise KeyError(name)

    def needs_delay_line(self) -> bool:
        """True when any emulated link needs delay, jitter or loss."""
        return any(link.spec.direction(d).needs_delay_line()
                   for link in self.graph().links if link.spec.emulated for d in ("up", "down"))


class HostSettings(FrozenStrict):
    """MPTCP settings of one host: pinned in its namespace and recorded.

    Defaults are the kernel's, except blackhole_timeout = 0: blackhole detection
    would silently turn MPTCP off for an hour after exactly the failures that
    establishment experiments provoke.
    """

    enabled: Literal[0, 1] = 1
    path_manager: Literal["kernel", "userspace", "mptcpd"] = Field(
        "kernel", description="mptcpd: the in-kernel path manager with its endpoints made by "
        "Debian's mptcpd daemon (addr_adv plugin), run in the host's namespace")
    blackhole_timeout: int = Field(0, ge=0, le=INT_MAX)
    syn_retrans_before_tcp_fallback: int = Field(2, ge=0, le=255)
    stale_loss_cnt: int = Field(4, ge=1, le=INT_MAX)
    add_addr_timeout: int = Field(120, ge=0, le=INT_MAX)
    checksum_enabled: Literal[0, 1] = 0
    close_timeout: int = Field(60, ge=0, le=INT_MAX)
    allow_join_initial_addr_port: Literal[0, 1] = 1
    scheduler: str = "default"
    congestion_control: Literal["cubic", "reno", "bbr"] = Field(
        "cubic", description="set per socket: a namespace cannot change the default"
    )
    # Applied to each socket by the workload, not pinned in the namespace: a
    # built testbed serves any value of these.
    PER_SOCKET: ClassVar[frozenset[str]] = frozenset({"congestion_control"})

    def namespace_settings(self) -> dict[str, object]:
        """The settings pinned in the host's namespace (all but the per-socket ones)."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in self.PER_SOCKET}

    def sysctls(self) -> dict[str, str | int]:
        """The net.mptcp.* sysctls these settings pin."""
        out = {f"net.mptcp.{k}": v for k, v in self.model_dump().items() if k not in self.PER_SOCKET}
        if self.path_manager == "mptcpd":  # mptcpd drives the in-kernel PM
            out["net.mptcp.path_manager"] = "kernel"
        return out
