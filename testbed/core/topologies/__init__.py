"""Built-in topologies (Python). TOML topologies live next to this file."""
from __future__ import annotations

from typing import Any

from testbed.core.model import TopologySpec
from testbed.core.topology import Topology, register


@register
class TwoPath(Topology):
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
