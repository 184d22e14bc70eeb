"""Link emulation backends (bridge, netem, our user-space forwarder), chosen
automatically or by name; calibration and offloads. Part of testbed.core."""
from __future__ import annotations

from testbed.core.emulation.base import Backend, EmulatedLink
from testbed.core.emulation.bridge import BridgeBackend
from testbed.base.errors import TestbedError
from testbed.core.model import TopologySpec

BACKENDS: dict[str, type[Backend]] = {BridgeBackend.name: BridgeBackend}
# Preference order for "auto"; backends that can delay come first.
AUTO_ORDER = ["netem", "userspace", "bridge"]


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make a backend selectable by its name."""
    BACKENDS[cls.name] = cls
    return cls


def backends() -> dict[str, type[Backend]]:
    """Every backend this installation has, by name (usable here or not: each
    one's check() says)."""
    _load_optional()
    return dict(BACKENDS)


def select(name: str, topology: TopologySpec | None = None) -> Backend:
    """Instantiate backend `name` ("auto": the best usable one) or explain why not."""
    _load_optional()
    if name != "auto":
        if name not in BACKENDS:
            raise TestbedError(f"unknown link-emulation backend {name!r} (known: {', '.join(BACKENDS)})")
        problem = BACKENDS[name].check()
        if problem:
            raise TestbedError(f"backend {name!r} unusable: {problem}")
        return BACKENDS[name]()
    needs_delay = topology is None or topology.needs_delay_line()
    reasons = []
    for candidate in AUTO_ORDER:
        cls = BACKENDS.get(candidate)
        if cls is None or (candidate == "bridge" and needs_delay):
            continue
        problem = cls.check()
        if problem is None:
            return cls()
        reasons.append(f"{candidate}: {problem}")
    raise TestbedError("no link-emulation backend can apply delay/loss on this machine ("
                       + "; ".join(reasons or ["none installed"]) + ")")


def _load_optional() -> None:
    """Import backends that register themselves (they may be absent)."""
    for mod in ("testbed.core.emulation.netem", "testbed.core.emulation.userspace"):
        try:
            __import__(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


__all__ = ["Backend", "EmulatedLink", "backends", "select", "register", "BACKENDS"]
