"""`--set key=value` command-line overrides, values parsed as TOML literals."""
from __future__ import annotations

import tomllib
from typing import Any

from testbed.base.errors import TestbedError


def parse_value(text: str) -> Any:
    """'10' -> 10, '2.5' -> 2.5, 'true' -> True, '[1, 2]' -> [1, 2], else the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings (values as TOML) -> a dict of dotted keys."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TestbedError(f"override {item!r} is not of the form key=value")
        out[key.strip()] = parse_value(value.strip())
    return out


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables as dotted keys: {"events.0": {"action": "x"}} ->
    {"events.0.action": "x"}, so every varied field is its own column."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
