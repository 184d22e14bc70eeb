"""Which local paths a connection may use: given explicitly or discovered.

A path is one source address (one interface). Discovery reads the current
network namespace: every UP interface with an IPv4 address (and, given the
destination, a route to it through that interface) is a path, named after the
interface; the one holding the main table's default route comes
first and is marked default — that is the path plain MPTCP would use.
"""
from __future__ import annotations

import ipaddress
import re

from pyroute2 import IPRoute

from testbed.robe.sockets import LocalPath

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")


class PathError(ValueError):
    """Bad path specification (reported as a one-line CLI error)."""


def discover(dest: str | None = None) -> list[LocalPath]:
    """Local paths of the calling thread's network namespace, default first.

    With `dest`, only interfaces that carry a route to it: the route lookup
    from the interface's address must leave through that interface (a bridge
    such as docker0 or a VPN tunnel whose traffic to `dest` would go out by the
    default interface is not a path)."""
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()
                 if link["flags"] & 1}  # IFF_UP
        default_oif = None
        for route in ipr.get_default_routes(family=2, table=254):
            default_oif = route.get_attr("RTA_OIF")
            break
        found = []
        for a in ipr.get_addr(family=2):
            idx, addr = a["index"], a.get_attr("IFA_ADDRESS")
            name = names.get(idx)
            if name is None or ipaddress.ip_address(addr).is_loopback:
                continue
            if dest is not None and _route_oif(ipr, dest, addr) != idx:
                continue
            found.append(LocalPath(_short(name), addr, name, default=(idx == default_oif)))
    found.sort(key=lambda p: not p.default)
    if not found:
        where = f" with a route to {dest}" if dest is not None else ""
        raise PathError(f"no usable local IPv4 address{where} found (give --bind-path NAME=ADDR)")
    return found


def _route_oif(ipr: IPRoute, dest: str, src: str) -> int | None:
    """Output interface of the route to dest from src (policy rules included)."""
    try:
        for route in ipr.route("get", dst=dest, src=src):
            return route.get_attr("RTA_OIF")
    except Exception:  # noqa: BLE001 - no route (ENETUNREACH) or a bad source: not a path
        return None
    return None


def _short(ifname: str) -> str:
    # Testbed interfaces are "c-<path>"; show the path name.
    return ifname.split("-", 1)[1] if ifname.startswith("c-") else ifname


def parse_bind(specs: list[str]) -> list[LocalPath]:
    """`NAME=ADDR[%IFNAME]` items; the first one is treated as the default path.
    Without %IFNAME the interface holding ADDR is looked up (when present)."""
    out: list[LocalPath] = []
    for i, spec in enumerate(specs):
        name, sep, rest = spec.partition("=")
        if not sep or not NAME.match(name):
            raise PathError(f"bad --bind-path {spec!r}: expected NAME=ADDR[%IFNAME]")
        addr, _, ifname = rest.partition("%")
        try:
            ipaddress.IPv4Address(addr)
        except ValueError:
            raise PathError(f"bad --bind-path {spec!r}: {addr!r} is not an IPv4 address") from None
        out.append(LocalPath(name, addr, ifname or _ifname_of(addr), default=(i == 0)))
    if len({p.name for p in out}) != len(out):
        raise PathError("--bind-path names must be unique")
    return out


def _ifname_of(addr: str) -> str | None:
    try:
        with IPRoute() as ipr:
            for a in ipr.get_addr(family=2, address=addr):
                link = ipr.get_links(a["index"])[0]
                return link.get_attr("IFLA_IFNAME")
    except Exception:  # lookup is a convenience: bind by address still works
        return None
    return None


def select(paths: list[LocalPath], names: list[str] | None) -> list[LocalPath]:
    """Restrict to `names` (in that order); the default flag stays where it was."""
    if not names:
        return paths
    by_name = {p.name: p for p in paths}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise PathError(f"unknown path(s) {', '.join(missing)} (have: {', '.join(by_name)})")
    return [by_name[n] for n in names]
