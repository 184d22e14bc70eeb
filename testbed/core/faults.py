"""Middleboxes: SYN drop, dropping or stripping the MPTCP option.

They are nftables rules in the router's forward path — the place a real
middlebox sits — or, for a multihomed server, in front of its input. One table
per testbed, deleted at teardown with the namespace. Events reach them through
`Testbed.apply_event`, the one route for every change during a run.
"""
from __future__ import annotations


from testbed.base.errors import TestbedError
from testbed.base.netns import run_command

TABLE = "mptb_faults"
# Rule bodies per middlebox action.
MIDDLEBOX = {
    "syn_drop": "tcp flags & (syn | ack) == syn drop",
    "mptcp_drop": "tcp option mptcp exists drop",
    "mptcp_strip": "tcp option mptcp exists reset tcp option mptcp",
}


def set_middlebox(pid: int, hook: str, path: str, far_if: str, action: str | None) -> None:
    """Put middlebox `action` on packets arriving from path `path` at interface
    `far_if` of the namespace of `pid` (hook: "forward" on a router, "input" on a
    server), replacing the path's previous one; None removes it."""
    chain = f"mb_{path}"
    # Flush-and-refill keeps this idempotent: at most one middlebox per path.
    script = [f"table inet {TABLE} {{", f"  chain {chain} {{", f"    type filter hook {hook} priority 0;",
              "  }", "}", f"flush chain inet {TABLE} {chain}"]
    if action is not None:
        script.append(f'add rule inet {TABLE} {chain} iifname "{far_if}" {MIDDLEBOX[action]}')
    res = run_command(pid, ["nft", "-f", "-"], input="\n".join(script) + "\n")
    if res.returncode != 0:
        raise TestbedError(f"nft for middlebox {action or 'off'} on path {path!r}: "
                           f"{res.stderr.strip().splitlines()[0]}")
