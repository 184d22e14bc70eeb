"""Built-in topologies (Python), registered by name; TOML topologies live next
to this file. Part of testbed.core: may use the model and testbed.base."""
from __future__ import annotations

from typing import Any

from testbed.core.model import TopologySpec
from testbed.core.topology import Topology, register


@register
class TwoPath(Topology):
    """WiFi-like and LTE-like paths from a client to a server behind a router."""
    name = "two-path"
    description = "WiFi-like + LTE-like paths from a client to a server behind a router"

    def spec(self, rate_mbit: float = 20, wifi_delay_ms: float = 10,
             lte_delay_ms: float = 40, rates: list[float] | None = None,
             delays: list[float] | None = None, lte_backup: bool = False,
             **over: Any) -> TopologySpec:
        """`rates`/`delays` = [wifi, lte] override the per-path values (sweepable pairs)."""
        wifi_rate, lte_rate = _pair("rates", rates, (rate_mbit, rate_mbit))
        wifi_delay, lte_delay = _pair("delays", delays, (wifi_delay_ms, lte_delay_ms))
        return TopologySpec(
            name=self.name, description=self.description,
            paths=[
                {"name": "wifi", "rate_mbit": wifi_rate, "delay_ms": wifi_delay},
                {"name": "lte", "rate_mbit": lte_rate, "delay_ms": lte_delay, "backup": lte_backup},
            ],
            **over,
        )


def _pair(name: str, value: list[float] | None, default: tuple[float, float]) -> tuple[float, float]:
    if value is None:
        return default
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise TypeError(f"{name} must be a list of two numbers [wifi, lte], got {value!r}")
    return value[0], value[1]


@register
class NPath(Topology):
    """n identical paths (1..8) from a client to a server behind a router."""
    name = "n-path"
    description = "n identical paths (1..8) from a client to a server behind a router"

    def spec(self, n: int = 4, rate_mbit: float = 10, delay_ms: float = 10,
             **over: Any) -> TopologySpec:
        """The topology with n paths of this rate and one-way delay."""
        n = int(n)
        paths = [{"name": f"p{i + 1}", "rate_mbit": rate_mbit, "delay_ms": delay_ms}
                 for i in range(max(n, 0))]
        return TopologySpec(name=self.name, description=self.description, paths=paths, **over)


@register
class SharedBottleneck(Topology):
    """Two access paths joining a shared router-server bottleneck."""
    name = "shared-bottleneck"
    description = "two access paths joining a shared router-server bottleneck (simult_flows shape)"

    def spec(self, access_rate_mbit: float = 100, bottleneck_mbit: float = 20,
             delay_ms: float = 5, **over: Any) -> TopologySpec:
        """The topology with these access rates, bottleneck rate and delay."""
        return TopologySpec(
            name=self.name, description=self.description,
            paths=[
                {"name": "a", "rate_mbit": access_rate_mbit, "delay_ms": delay_ms},
                {"name": "b", "rate_mbit": access_rate_mbit, "delay_ms": delay_ms},
            ],
            bottleneck={"rate_mbit": bottleneck_mbit},
            **over,
        )


# ---- general graphs (nodes and links; docs/topologies.md) --------------------
@register
class Dumbbell(Topology):
    """K MPTCP clients and M TCP senders through one bottleneck (or two, disjoint)."""
    name = "dumbbell"
    description = ("K MPTCP clients (two subflows each) and M TCP senders through one "
                   "bottleneck (disjoint=true: two bottlenecks, one per subflow)")

    def spec(self, k: int = 1, m: int = 2, bottleneck_mbit: float = 20, delay_ms: float = 10,
             access_mbit: float = 100, queue_bdp: float = 1.0, disjoint: bool = False,
             **over: Any) -> TopologySpec:
        """Clients m1..mK, TCP senders t1..tM, left router(s), right router r, server s.

        Shared: every flow crosses link `bn` (l -> r). Disjoint: subflow a crosses
        `bna` (la -> r), subflow b `bnb` (lb -> r); TCP senders alternate between them.
        Delay and rate sit on the bottleneck(s); the clients' access links are
        emulated (each subflow is its own path), the senders' and the server's
        are plain veths.
        """
        if not 1 <= k <= 8 or not 0 <= m <= 16:
            raise ValueError(f"dumbbell: k must be 1..8 and m 0..16, got k={k}, m={m}")
        left = ["la", "lb"] if disjoint else ["l", "l"]
        nodes = ([{"name": f"m{i}", "role": "client"} for i in range(1, k + 1)]
                 + [{"name": f"t{j}", "role": "host"} for j in range(1, m + 1)]
                 + [{"name": n, "role": "router"} for n in dict.fromkeys(left)]
                 + [{"name": "r", "role": "router"}, {"name": "s", "role": "server"}])
        links: list[dict[str, Any]] = []
        for i in range(1, k + 1):
            links += [{"name": f"m{i}{sub}", "a": f"m{i}", "b": router, "rate_mbit": access_mbit}
                      for sub, router in zip("ab", left)]
        links += [{"name": f"t{j}", "a": f"t{j}", "b": left[(j - 1) % 2], "emulated": False}
                  for j in range(1, m + 1)]
        bottleneck = {"rate_mbit": bottleneck_mbit, "delay_ms": delay_ms, "queue_bdp": queue_bdp}
        if disjoint:
            links += [{"name": "bna", "a": "la", "b": "r", **bottleneck},
                      {"name": "bnb", "a": "lb", "b": "r", **bottleneck}]
        else:
            links.append({"name": "bn", "a": "l", "b": "r", **bottleneck})
        links.append({"name": "srv", "a": "r", "b": "s", "emulated": False})
        return TopologySpec(name=self.name, description=self.description, nodes=nodes,
                            links=links, **over)


@register
class MultiClient(Topology):
    """N clients sharing a WiFi-like and an LTE-like access path to one server."""
    name = "multi-client"
    description = "N clients sharing a WiFi-like and an LTE-like access path to one server"

    def spec(self, n: int = 2, wifi_mbit: float = 20, lte_mbit: float = 10,
             wifi_delay_ms: float = 10, lte_delay_ms: float = 40, queue_pkts: int | None = None,
             **over: Any) -> TopologySpec:
        """Clients c1..cN reach access router `ap` (WiFi) and `bs` (LTE) over plain
        links c<i>w and c<i>l (the paths' names); the shared links `wifi`
        (ap -> core) and `lte` (bs -> core) carry the rate, delay and queue
        (`queue_pkts`; default one BDP)."""
        if not 1 <= n <= 16:
            raise ValueError(f"multi-client: n must be 1..16, got {n}")
        nodes = ([{"name": f"c{i}", "role": "client"} for i in range(1, n + 1)]
                 + [{"name": r, "role": "router"} for r in ("ap", "bs", "core")]
                 + [{"name": "s", "role": "server"}])
        links: list[dict[str, Any]] = []
        for i in range(1, n + 1):
            links += [{"name": f"c{i}w", "a": f"c{i}", "b": "ap", "emulated": False},
                      {"name": f"c{i}l", "a": f"c{i}", "b": "bs", "emulated": False}]
        queue = {} if queue_pkts is None else {"queue_pkts": queue_pkts}
        links += [{"name": "wifi", "a": "ap", "b": "core", "rate_mbit": wifi_mbit,
                   "delay_ms": wifi_delay_ms, **queue},
                  {"name": "lte", "a": "bs", "b": "core", "rate_mbit": lte_mbit,
                   "delay_ms": lte_delay_ms, **queue},
                  {"name": "srv", "a": "core", "b": "s", "emulated": False}]
        return TopologySpec(name=self.name, description=self.description, nodes=nodes,
                            links=links, **over)


@register
class Multihop(Topology):
    """Two paths of 3 and 4 router hops that share a middle link."""
    name = "multihop"
    description = "two paths of 3 and 4 router hops that share a middle link"

    def spec(self, wifi_mbit: float = 20, lte_mbit: float = 20, middle_mbit: float = 30,
             delay_ms: float = 5, **over: Any) -> TopologySpec:
        """wifi: c -> a -> m1 -> m2 -> s; lte: c -> b -> h -> m1 -> m2 -> s; both
        cross `mid` (m1 -> m2)."""
        routers = ["a", "b", "h", "m1", "m2"]
        nodes = ([{"name": "c", "role": "client"}] + [{"name": r, "role": "router"} for r in routers]
                 + [{"name": "s", "role": "server"}])
        plain = {"emulated": False}
        links = [
            {"name": "wifi", "a": "c", "b": "a", "rate_mbit": wifi_mbit, "delay_ms": delay_ms},
            {"name": "lte", "a": "c", "b": "b", "rate_mbit": lte_mbit, "delay_ms": delay_ms},
            {"name": "am", "a": "a", "b": "m1", **plain},
            {"name": "bh", "a": "b", "b": "h", **plain},
            {"name": "hm", "a": "h", "b": "m1", **plain},
            {"name": "mid", "a": "m1", "b": "m2", "rate_mbit": middle_mbit, "delay_ms": delay_ms},
            {"name": "srv", "a": "m2", "b": "s", **plain},
        ]
        return TopologySpec(name=self.name, description=self.description, nodes=nodes,
                            links=links, **over)
