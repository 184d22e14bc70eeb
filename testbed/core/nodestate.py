"""What a run leaves in a node's namespace that the next run on the same
testbed must not inherit, read back and cleared: learnt ARP entries (and the
static ones a carrier loss removed), connection-tracking entries, nftables
rules, and TCP/MPTCP connections (subflows in TIME_WAIT, a socket a leaking
thread still holds, an MPTCP connection whose userspace path-manager state
lives as long as it does).

Everything is read in the node's own namespace (a fresh testbed has no
conntrack entry, no nft rule, only the static neighbours the build installed,
and no connection but listeners); nothing outside the project's namespaces is
read or touched.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass

from pyroute2 import Conntrack, IPRoute
from pyroute2.nftables.main import NFTables

from testbed.base.netns import run_command, run_in_netns

NUD_PERMANENT = 0x80
NUD_NOARP = 0x40
CONNTRACK_COUNT = "/proc/sys/net/netfilter/nf_conntrack_count"
NFPROTO_UNSPEC = 0


@dataclass(frozen=True)
class StaticNeighbour:
    """A permanent ARP entry the build installs: on `ifname`, `ip` is at `mac`."""
    ifname: str
    ip: str
    mac: str


def clear(pid: int, statics: list[StaticNeighbour], sockets: bool) -> None:
    """Undo a run's traces in pid's namespace: learnt neighbours deleted, the
    static ones installed again, conntrack flushed, and (sockets) every TCP
    socket but listeners destroyed (SOCK_DESTROY; MPTCP connections lose their
    subflows with them)."""
    run_in_netns(pid, lambda: _clear_here(statics))
    if sockets and any(state != "LISTEN" for _kind, state in connections(pid)):
        run_command(pid, ["ss", "-HtaK", "exclude", "listening"])


def _clear_here(statics: list[StaticNeighbour]) -> None:
    with IPRoute() as ipr:
        index = {link.get_attr("IFLA_IFNAME"): link["index"] for link in ipr.get_links()}
        for entry in ipr.get_neighbours(family=socket.AF_INET):
            if not entry["state"] & (NUD_PERMANENT | NUD_NOARP):
                ipr.neigh("del", dst=entry.get_attr("NDA_DST"), ifindex=entry["ifindex"])
        for n in statics:
            ipr.neigh("replace", dst=n.ip, lladdr=n.mac, ifindex=index[n.ifname],
                      state=NUD_PERMANENT)
    if _conntrack_count() > 0:
        with Conntrack() as ct:
            ct.flush()


def _conntrack_count() -> int:
    try:
        with open(CONNTRACK_COUNT) as f:
            return int(f.read())
    except FileNotFoundError:  # no conntrack in this kernel: nothing tracked
        return 0


def connections(pid: int) -> list[tuple[str, str]]:
    """(tcp|mptcp, state) of every socket in pid's namespace, listeners included."""
    res = run_command(pid, ["ss", "-HtaMn"])
    # Fixed columns: Netid State Recv-Q Send-Q Local Peer (ss has no structured output).
    return [(cols[0], cols[1]) for cols in (line.split() for line in res.stdout.splitlines())
            if len(cols) >= 2]


def problems(pid: int, name: str, statics: list[StaticNeighbour], sockets: bool) -> list[str]:
    """Where pid's namespace differs from a freshly built node's, each naming
    what was found and what a fresh node has ([]: none)."""
    out = run_in_netns(pid, lambda: _problems_here(name, statics))
    if sockets:
        left = sorted({f"{kind} {state}" for kind, state in connections(pid) if state != "LISTEN"})
        if left:
            out.append(f"{name}: connections still open: {', '.join(left)} (a fresh node has "
                       "listeners only)")
    return out


def _problems_here(name: str, statics: list[StaticNeighbour]) -> list[str]:
    out: list[str] = []
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        found = {StaticNeighbour(names.get(e["ifindex"], "?"), e.get_attr("NDA_DST"),
                                 e.get_attr("NDA_LLADDR") or "")
                 for e in ipr.get_neighbours(family=socket.AF_INET)
                 if e["state"] & NUD_PERMANENT}
        learnt = sorted(e.get_attr("NDA_DST") for e in ipr.get_neighbours(family=socket.AF_INET)
                        if not e["state"] & (NUD_PERMANENT | NUD_NOARP))
    missing = sorted(f"{n.ip} on {n.ifname}" for n in set(statics) - found)
    if missing:
        out.append(f"{name}: static neighbours missing: {', '.join(missing)}")
    extra = sorted(f"{n.ip} on {n.ifname}" for n in found - set(statics))
    if extra:
        out.append(f"{name}: permanent neighbours not built: {', '.join(extra)}")
    if learnt:
        out.append(f"{name}: learnt neighbours {', '.join(learnt)} (a fresh node has none)")
    tracked = _conntrack_count()
    if tracked:
        out.append(f"{name}: {tracked} conntrack entries (a fresh node has 0)")
    with NFTables(nfgen_family=NFPROTO_UNSPEC) as nft:  # every family: ip, inet, netdev, ...
        rules = nft.get_rules()
    if rules:
        out.append(f"{name}: {len(rules)} nftables rules in force (a fresh node has 0)")
    return out
