"""Fault injection: link down/up, blackhole, link changes and middleboxes.

Middleboxes (SYN drop, dropping or stripping the MPTCP option) are nftables
rules in the router's forward path — the place a real middlebox sits — or, for
a multihomed server, in front of its input. One table per testbed, deleted at
teardown with the namespace.
"""
from __future__ import annotations

import subprocess

from testbed.base.errors import TestbedError
from testbed.core.model import LinkParams
from testbed.core.events import EventSpec

TABLE = "mptb_faults"
# Rule bodies per middlebox action; the handle comment lets us delete them again.
MIDDLEBOX = {
    "syn_drop": "tcp flags & (syn | ack) == syn drop",
    "mptcp_drop": "tcp option mptcp exists drop",
    "mptcp_strip": "tcp option mptcp exists reset tcp option mptcp",
}


def apply(tb, event: EventSpec) -> None:
    a = event.action
    directions = ["up", "down"] if event.direction == "both" else [event.direction]
    if a in ("link_down", "link_up"):
        tb.set_path_state(event.path, up=(a == "link_up"))
    elif a in ("blackhole", "unblackhole"):
        for d in directions:
            tb.backend.set_blackhole(tb.link(event.path), d, a == "blackhole")
    elif a == "set_link":
        try:
            LinkParams(**event.changes)
        except Exception as exc:  # noqa: BLE001 - pydantic or type errors, reported as one line
            raise TestbedError(f"set_link on {event.path!r}: {exc}".splitlines()[0]) from None
        for d in directions:
            tb.update_link(event.path, d, **event.changes)
    elif a in MIDDLEBOX:
        _middlebox(tb, event.path, a, on=True)
    elif a in ("syn_pass", "middlebox_off"):
        _middlebox(tb, event.path, None, on=False)
    elif a in ("backup_on", "backup_off"):
        _set_backup(tb, event.path, a == "backup_on")
    else:  # the scenario model lists every action; this is a programming error
        raise TestbedError(f"unknown fault action {a!r}")


def describe(event: EventSpec) -> str:
    where = event.path + ("" if event.direction == "both" else f"/{event.direction}")
    what = f" {event.changes}" if event.changes else ""
    return f"{event.action} {where}{what}"


def _nft(node, script: str) -> None:
    res = subprocess.run(["mnexec", "-a", str(node.pid), "nft", "-f", "-"], input=script,
                         capture_output=True, text=True, timeout=10)
    if res.returncode != 0:
        raise TestbedError(f"nft on {node.name}: {res.stderr.strip().splitlines()[0]}")


def _middlebox(tb, path: str, action: str | None, on: bool) -> None:
    p = tb.path(path)
    node = tb.router or tb.server
    hook = "forward" if tb.router else "input"
    chain = f"mb_{p.name}"
    # Flush-and-refill keeps this idempotent: at most one middlebox per path.
    script = [f"table inet {TABLE} {{", f"  chain {chain} {{", f"    type filter hook {hook} priority 0;",
              "  }", "}", f"flush chain inet {TABLE} {chain}"]
    if on and action:
        script.append(f'add rule inet {TABLE} {chain} iifname "{p.far_if}" {MIDDLEBOX[action]}')
    _nft(node, "\n".join(script) + "\n")


def _set_backup(tb, path: str, backup: bool) -> None:
    """MP_PRIO: flip the backup flag of the path's client endpoint (kernel PM)."""
    p = tb.path(path)
    flag = "backup" if backup else "nobackup"
    out = tb.client.cmd(f"ip mptcp endpoint change id {p.index} {flag}; echo rc=$?")
    if "rc=0" not in out:
        raise TestbedError(f"MP_PRIO on path {path!r} failed: {out.strip().splitlines()[0]}")
