"""Built-in topologies (Python). TOML topologies live next to this file."""
from __future__ import annotations

from typing import Any

from testbed.model import TopologySpec
from testbed.topology import Topology, register


@register
class TwoPath(Topology):
    name = "two-path"
    description = "WiFi-like + LTE-like paths from a client to a server behind a router"

    def spec(self, rate_mbit: float = 20, wifi_delay_ms: float = 10,
             lte_delay_ms: float = 40, **over: Any) -> TopologySpec:
        return TopologySpec(
            name=self.name, description=self.description,
            paths=[
                {"name": "wifi", "rate_mbit": rate_mbit, "delay_ms": wifi_delay_ms},
                {"name": "lte", "rate_mbit": rate_mbit, "delay_ms": lte_delay_ms},
            ],
            **over,
        )


@register
class NPath(Topology):
    name = "n-path"
    description = "n identical paths (1..8) from a client to a server behind a router"

    def spec(self, n: int = 4, rate_mbit: float = 10, delay_ms: float = 10,
             **over: Any) -> TopologySpec:
        n = int(n)
        paths = [{"name": f"p{i + 1}", "rate_mbit": rate_mbit, "delay_ms": delay_ms}
                 for i in range(max(n, 0))]
        return TopologySpec(name=self.name, description=self.description, paths=paths, **over)


@register
class SharedBottleneck(Topology):
    name = "shared-bottleneck"
    description = "two access paths joining a shared router-server bottleneck (simult_flows shape)"

    def spec(self, access_rate_mbit: float = 100, bottleneck_mbit: float = 20,
             delay_ms: float = 5, **over: Any) -> TopologySpec:
        return TopologySpec(
            name=self.name, description=self.description,
            paths=[
                {"name": "a", "rate_mbit": access_rate_mbit, "delay_ms": delay_ms},
                {"name": "b", "rate_mbit": access_rate_mbit, "delay_ms": delay_ms},
            ],
            bottleneck={"rate_mbit": bottleneck_mbit},
            **over,
        )
