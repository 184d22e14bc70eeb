"""Topologies by name: Python classes registered with @register, or TOML files.

A new topology is one small module (a registered class) or one TOML file in
testbed/core/topologies/ or in a directory listed in $MPTB_TOPOLOGY_PATH.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, ValidationError, validate_call

from testbed.base.errors import TestbedError, format_validation_error
from testbed.base.registry import Registry
from testbed.base.tomlfile import read_toml
from testbed.core.model import TopologySpec


class Topology:
    """Base class of Python topologies: `spec(**params)` builds the TopologySpec."""

    name: str = ""
    description: str = ""

    def spec(self, **params: Any) -> TopologySpec:
        """The TopologySpec for these parameters."""
        raise NotImplementedError


TOPOLOGIES: Registry[Topology] = Registry("topology", "testbed.core.topologies")
register = TOPOLOGIES.register
BUILTIN_DIR = Path(__file__).parent / "topologies"


def _search_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("MPTB_TOPOLOGY_PATH", "").split(":") if p]
    return [*extra, BUILTIN_DIR]


def available() -> dict[str, str]:
    """name -> description of every known topology."""
    out = TOPOLOGIES.available()
    for d in _search_dirs():
        for f in sorted(d.glob("*.toml")):
            out.setdefault(f.stem, _read_toml(f).get("description", ""))
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    return read_toml(path, "topology file")


def from_dict(data: dict[str, Any], where: str = "topology") -> TopologySpec:
    """A validated TopologySpec from a dict; TestbedError naming the bad key."""
    try:
        return TopologySpec(**data)
    except ValidationError as exc:
        raise TestbedError(format_validation_error(where, exc)) from None
    except TypeError as exc:
        raise TestbedError(f"{where}: {exc}") from None


def load(name_or_path: str, **params: Any) -> TopologySpec:
    """Resolve a topology by registered name, TOML name, or path to a TOML file."""
    if name_or_path in TOPOLOGIES:
        # The spec() signature's types are enforced: n = "abc" or n = 2.9 for an
        # int is refused, not crashed on or truncated.
        spec = validate_call(TOPOLOGIES.cls(name_or_path)().spec,
                             config=ConfigDict(arbitrary_types_allowed=True))
        try:
            return spec(**params)
        except ValidationError as exc:
            raise TestbedError(format_validation_error(f"topology {name_or_path!r}", exc)) from None
        except TypeError as exc:
            raise TestbedError(f"topology {name_or_path!r}: {exc}") from None
    candidates = [Path(name_or_path)] if name_or_path.endswith(".toml") else [
        d / f"{name_or_path}.toml" for d in _search_dirs()
    ]
    for path in candidates:
        if path.is_file():
            data = _read_toml(path)
            data.setdefault("name", path.stem)
            data = apply_overrides(data, params)
            return from_dict(data, where=str(path))
    known = ", ".join(sorted(available()))
    raise TestbedError(f"unknown topology {name_or_path!r} (known: {known})")


def apply_overrides(data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Apply dotted overrides like {'paths.0.delay_ms': 20} to a plain dict."""
    data = _deepcopy(data)
    for key, value in params.items():
        set_dotted(data, key, value)
    return data


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set data[key] for a dotted key (list entries by index)."""
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            node = node[_index(node, parts, i, key)]
        else:
            node = node.setdefault(part, [] if nxt.isdigit() else {})
    last = parts[-1]
    if isinstance(node, list):
        node[_index(node, parts, len(parts) - 1, key)] = value
    else:
        node[last] = value


def _index(node: list[Any], parts: list[str], i: int, key: str) -> int:
    """parts[i] as an index into node, which must already have that entry."""
    part = parts[i]
    if not part.isdigit():
        raise TestbedError(f"override {key!r}: {part!r} is not a list index")
    if int(part) >= len(node):
        where = ".".join(parts[:i + 1])
        held = f"0..{len(node) - 1}" if node else "none"
        raise TestbedError(f"{where}: no such entry in override {key!r} "
                           f"({len(node)} entr{'y' if len(node) == 1 else 'ies'}: {held})")
    return int(part)


def _deepcopy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _deepcopy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deepcopy(v) for v in x]
    return x

