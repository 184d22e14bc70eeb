"""The address plan and the routes, derived from a topology's graph.

Every link gets a /24, 10.<net>.0.0/24 (end `a` .1, end `b` .2); every node
interface is "<node>-<link>". Routers forward; clients, servers and
cross-traffic hosts never do. Routes:

- routers: a route to every subnet they are not on, by the cheapest way
  (sum of link `cost`) through routers only; two equally cheap ways are refused
  at load (give one link a higher cost), so every path is what it says;
- a client: one table per interface (TABLE_BASE + net) with a default route
  over it and a rule "from <its address>", so a join leaves by its own path,
  plus the main default route over its default path;
- a server or host with more than one router-facing interface: the same
  per-interface tables (a reply leaves by the interface its address is on);
  with one, just a default route over it.

A path is what this routing gives from a client interface to the server's
address; `Graph.paths` lists each one's links in order. The shorthand
topologies (paths, server_side, bottleneck) compile to the same graph with
the addresses they always had: path i is 10.i.0.0/24, the router-server
segment 10.100.0.0/24 (router .1, server .2).

Every address lives inside the testbed's own namespaces; nothing here is
reachable from (or routed to) the machine's real network.
"""
from __future__ import annotations

import heapq
import ipaddress
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:  # the model imports this module from TopologySpec.graph()
    from testbed.core.model import ComposedPath, Hop, LinkParams, LinkSpec, PathSpec, TopologySpec

SERVER_NET_INDEX = 100  # the shorthand's router-server segment: 10.100.0.0/24
TABLE_BASE = 100  # policy routing table of the interface on link net i is TABLE_BASE + i
RULE_BASE = 1000  # its rule's priority is RULE_BASE + i
PREFIX = 24
EMULATOR_NAME = re.compile(r"^x[0-9]+$")  # emulator nodes are x1, x2, ...
BOTTLENECK = "bottleneck"  # the shorthand's router-server link


@dataclass(frozen=True)
class PathAddresses:
    """A path's addresses: the client's, the next hop's (far), its routing table."""

    index: int  # the access link's net: endpoint id and table offset
    client: str
    far: str

    @property
    def subnet(self) -> str:
        """The path's /24 subnet."""
        return f"10.{self.index}.0.0/{PREFIX}"

    @property
    def table(self) -> int:
        """The policy-routing table of the path's client address."""
        return TABLE_BASE + self.index


@dataclass(frozen=True)
class LinkEnd:
    """One end of a link: the node, its interface and its address there."""

    node: str
    ifname: str
    addr: str


@dataclass(frozen=True)
class BuiltLink:
    """A link with its subnet, its two ends and its emulator node (None: plain veth)."""

    spec: LinkSpec
    net: int
    a: LinkEnd
    b: LinkEnd
    emulator: str | None

    @property
    def name(self) -> str:
        """The link's name (its spec's)."""
        return self.spec.name

    @property
    def subnet(self) -> str:
        """The link's /24 subnet."""
        return f"10.{self.net}.0.0/{PREFIX}"

    def end(self, node: str) -> LinkEnd:
        """This link's end at `node`."""
        return self.a if self.a.node == node else self.b

    def other(self, node: str) -> LinkEnd:
        """The end that is not at `node`."""
        return self.b if self.a.node == node else self.a


@dataclass(frozen=True)
class Route:
    """`ip route add <dst> via <via> dev <dev> [table <table>]`."""

    dst: str  # "0.0.0.0/0" or a subnet
    via: str
    dev: str
    table: int | None = None  # None: the main table


@dataclass(frozen=True)
class Rule:
    """`ip rule add from <src> table <table> priority <priority>`."""

    src: str
    table: int
    priority: int


@dataclass(frozen=True)
class GraphPath:
    """What routing gives from one client interface to the server."""

    spec: PathSpec  # the access link's characteristics, named after it
    client: str
    client_if: str
    client_addr: str
    far: LinkEnd  # the access link's other end (the next hop)
    server: str
    server_addr: str
    links: tuple[str, ...]  # every link crossed, client first

    @property
    def name(self) -> str:
        """The path's name (its first link's spec's)."""
        return self.spec.name

    @property
    def index(self) -> int:
        """The access link's net: the client endpoint's id and the table offset."""
        return int(self.client_addr.split(".")[1])

    @property
    def addr(self) -> PathAddresses:
        """The path's client and far addresses and routing table."""
        return PathAddresses(self.index, self.client_addr, self.far.addr)


@dataclass(frozen=True)
class Graph:
    """A topology as built: roles, addressed links, routes, rules and paths."""

    roles: dict[str, str]  # node -> role, in the order written
    links: tuple[BuiltLink, ...]
    routes: dict[str, tuple[Route, ...]]
    rules: dict[str, tuple[Rule, ...]]
    paths: tuple[GraphPath, ...]
    default_links: dict[str, str]  # host -> the link of its main default route

    def nodes(self, role: str) -> list[str]:
        """Names of the nodes with `role`, in the order written."""
        return [n for n, r in self.roles.items() if r == role]

    @property
    def client(self) -> str:
        """The first client node."""
        return self.nodes("client")[0]

    @property
    def server(self) -> str:
        """The first server node."""
        return self.nodes("server")[0]

    @property
    def server_addr(self) -> str:
        """The address clients connect to (over their default path)."""
        return self.default_path().server_addr

    def link(self, name: str) -> BuiltLink:
        """The link with this name; TestbedError naming the known ones."""
        for link in self.links:
            if link.name == name:
                return link
        raise KeyError(name)

    def links_of(self, node: str) -> list[BuiltLink]:
        """The links touching `node`, in the order written."""
        return [link for link in self.links if node in (link.a.node, link.b.node)]

    def paths_of(self, client: str) -> list[GraphPath]:
        """The paths that start at this client."""
        return [p for p in self.paths if p.client == client]

    def default_path(self, client: str | None = None) -> GraphPath:
        """The path of `client` (default: the first) that holds its default route."""
        client = client or self.client
        name = self.default_links[client]
        return next(p for p in self.paths if p.client == client and p.name == name)

    def address(self, node: str) -> str:
        """Where traffic to `node` goes: the server's address clients connect to,
        else the node's address on its default (or first) link."""
        if node == self.server:
            return self.server_addr
        name = self.default_links.get(node) or self.links_of(node)[0].name
        return self.link(name).end(node).addr

    def route(self, src: str, dst: str) -> tuple[str, ...]:
        """The links a packet from `src` to `dst`'s address crosses by the main
        routing tables (GraphError when routing gives no way there)."""
        target = ipaddress.ip_address(self.address(dst))
        node, crossed = src, []
        while node != dst:
            if crossed and self.roles[node] != "router":
                raise GraphError(f"no path from {src!r} to {dst!r}: {node!r} is a "
                                 f"{self.roles[node]} (it does not forward)")
            nxt = _next_link(node, str(target), self.links, self.routes)
            if nxt is None or len(crossed) >= len(self.links):
                raise GraphError(f"no path from {src!r} to {dst!r}: {node!r} has no route "
                                 f"to {target}")
            crossed.append(nxt.name)
            node = nxt.other(node).node
        return tuple(crossed)

    def hops(self, path: GraphPath,
             current: dict[str, tuple[LinkParams, LinkParams]] | None = None) -> list[Hop]:
        """The links `path` crosses, client first, each with its parameters in the
        path's directions (a link crossed from its end b to a has its `down` as
        the path's up). Plain links add nothing but their MTU. `current`: an
        emulated link's (up, down) as it is now (default: as the spec builds it)."""
        from testbed.core.model import Hop, LinkParams  # noqa: PLC0415 - see TYPE_CHECKING above
        node, out = path.client, []
        for name in path.links:
            link = self.link(name)
            if not link.spec.emulated:
                up = down = LinkParams()
            else:
                up, down = (current or {}).get(name) or (link.spec.direction("up"),
                                                         link.spec.direction("down"))
            if link.a.node != node:  # crossed b -> a
                up, down = down, up
            out.append(Hop(name, up, down, link.spec.mtu))
            node = link.other(node).node
        return out

    def composed(self, path: GraphPath,
                 current: dict[str, tuple[LinkParams, LinkParams]] | None = None) -> ComposedPath:
        """What `path` does end to end: its links' characteristics composed
        (model.compose_path; routes are symmetric, so a path's replies cross the
        same links back)."""
        from testbed.core.model import compose_path  # noqa: PLC0415 - see TYPE_CHECKING above
        return compose_path(self.hops(path, current))

    def describe(self) -> dict[str, Any]:
        """JSON-ready: nodes, links (subnet, ends, emulator) and every path's links
        and composed characteristics (as specified)."""
        return {
            "nodes": dict(self.roles),
            "links": [{"name": link.name, "subnet": link.subnet, "emulator": link.emulator,
                       "a": vars(link.a), "b": vars(link.b)} for link in self.links],
            "paths": [{"name": p.name, "client": p.client, "client_if": p.client_if,
                       "client_addr": p.addr.client, "server_addr": p.server_addr,
                       "links": list(p.links),
                       "composed": self.composed(p).model_dump(mode="json")} for p in self.paths],
        }


def _path(spec: PathSpec, client: str, end: LinkEnd, far: LinkEnd, server: str,
          server_addr: str, links: tuple[str, ...]) -> GraphPath:
    return GraphPath(spec, client, end.ifname, end.addr, far, server, server_addr, links)


class GraphError(ValueError):
    """A topology that cannot be built or routed (one line, raised at load)."""


def compile_graph(topo: TopologySpec) -> Graph:
    """The graph of `topo` (either form), addressed and routed; GraphError if it
    cannot be: unknown or duplicate names, a disconnected node, a client link
    that leads nowhere, two equally cheap ways somewhere."""
    if topo.nodes or topo.links:
        roles = {}
        for n in topo.nodes:
            if n.name in roles:
                raise GraphError(f"nodes: duplicate node name {n.name!r}")
            if EMULATOR_NAME.match(n.name):
                raise GraphError(f"nodes: {n.name!r} is reserved for link emulators (x<number>)")
            roles[n.name] = n.role
        links, default = list(topo.links), topo.default_path
        primary_server_link = None
    else:
        roles, links, default, primary_server_link = _shorthand(topo)
    return _build(roles, links, default, primary_server_link)


def _shorthand(topo: TopologySpec) -> tuple[dict[str, str], list[LinkSpec], str | None, str | None]:
    """The shorthand (one client, 1..8 paths, a router or a multihomed server) as a graph."""
    from testbed.core.model import LinkSpec  # noqa: PLC0415 - see TYPE_CHECKING above
    far = "r" if topo.server_side == "router" else "s"
    roles = {"c": "client", "s": "server", **({"r": "router"} if far == "r" else {})}
    links = [LinkSpec(**p.model_dump(), a="c", b=far, net=i) for i, p in enumerate(topo.paths, 1)]
    if far == "r":
        bn = topo.bottleneck
        fields = bn.model_dump() if bn is not None else {}
        links.append(LinkSpec(**fields, name=BOTTLENECK, a="r", b="s", net=SERVER_NET_INDEX,
                              emulated=bn is not None, client_endpoint=[]))
    return roles, links, topo.default_path or topo.paths[0].name, BOTTLENECK if far == "r" else None


def _build(roles: dict[str, str], specs: list[LinkSpec], default: str | None,
           primary_server_link: str | None) -> Graph:
    clients = [n for n, r in roles.items() if r == "client"]
    servers = [n for n, r in roles.items() if r == "server"]
    if not clients or not servers:
        raise GraphError("nodes: a topology needs at least one client and one server")
    links = _address(roles, specs)
    for node in roles:
        if not any(node in (link.a.node, link.b.node) for link in links):
            raise GraphError(f"nodes: {node!r} has no link (a disconnected node)")
    _check_connected(roles, links)
    routers = {n for n, r in roles.items() if r == "router"}
    routes: dict[str, list[Route]] = {n: [] for n in roles}
    for target in links:
        _route_to(target, links, routers, routes)
    rules: dict[str, list[Rule]] = {n: [] for n in roles}
    default_links: dict[str, str] = {}
    for node, role in roles.items():
        if role == "router":
            continue
        mine = [link for link in links if node in (link.a.node, link.b.node)]
        if role == "client":
            via = mine  # every client interface gets its own table
            default_links[node] = default if role == "client" and default in {
                link.name for link in mine} else mine[0].name
        else:
            via = [link for link in mine if link.other(node).node in routers]
            if via:
                default_links[node] = via[0].name
        if role == "client" or len(via) > 1:
            for link in via:
                end, far = link.end(node), link.other(node)
                routes[node].append(Route("0.0.0.0/0", far.addr, end.ifname, TABLE_BASE + link.net))
                rules[node].append(Rule(end.addr, TABLE_BASE + link.net, RULE_BASE + link.net))
        if node in default_links:
            link = next(link for link in links if link.name == default_links[node])
            routes[node].append(Route("0.0.0.0/0", link.other(node).addr, link.end(node).ifname))
    if default is not None and default not in {link.name for link in links
                                               if clients[0] in (link.a.node, link.b.node)}:
        raise GraphError(f"default_path {default!r} is not a link of client {clients[0]!r}")
    paths = _paths(roles, links, routes, servers[0], primary_server_link, default_links)
    return Graph(dict(roles), tuple(links), {n: tuple(r) for n, r in routes.items()},
                 {n: tuple(r) for n, r in rules.items()}, tuple(paths), default_links)


def _address(roles: dict[str, str], specs: list[LinkSpec]) -> list[BuiltLink]:
    names: set[str] = set()
    nets: dict[int, str] = {}
    out = []
    emulators = 0
    for i, spec in enumerate(specs, start=1):
        where = f"links.{i - 1}"
        if spec.name in names:
            raise GraphError(f"{where}.name: duplicate link name {spec.name!r}")
        names.add(spec.name)
        for side in ("a", "b"):
            node = getattr(spec, side)
            if node not in roles:
                raise GraphError(f"{where}.{side}: no node {node!r} (nodes: {', '.join(roles)})")
            if len(f"{node}-{spec.name}") > 15:
                raise GraphError(f"{where}.name: interface name {node}-{spec.name} is longer than "
                                 "15 characters: shorten the node or link name")
        if spec.a == spec.b:
            raise GraphError(f"{where}: a link needs two different nodes, got {spec.a!r} twice")
        net = spec.net if spec.net is not None else i
        if net in nets:
            raise GraphError(f"{where}.net: subnet 10.{net}.0.0/24 is also link {nets[net]!r}'s")
        nets[net] = spec.name
        emulator = None
        if spec.emulated:
            emulators += 1
            emulator = f"x{emulators}"
        out.append(BuiltLink(spec, net, LinkEnd(spec.a, f"{spec.a}-{spec.name}", f"10.{net}.0.1"),
                             LinkEnd(spec.b, f"{spec.b}-{spec.name}", f"10.{net}.0.2"), emulator))
    return out


def _check_connected(roles: dict[str, str], links: list[BuiltLink]) -> None:
    first = next(iter(roles))
    seen, todo = {first}, [first]
    while todo:
        node = todo.pop()
        for link in links:
            if node in (link.a.node, link.b.node):
                nxt = link.other(node).node
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
    apart = [n for n in roles if n not in seen]
    if apart:
        raise GraphError(f"nodes: {apart[0]!r} is not connected to {first!r} (a disconnected node)")


def _route_to(target: BuiltLink, links: list[BuiltLink], routers: set[str],
              routes: dict[str, list[Route]]) -> None:
    """Every router's route to target's subnet: the cheapest way through routers."""
    dist = {n: 0 for n in (target.a.node, target.b.node) if n in routers}
    heap = [(0, n) for n in dist]
    while heap:
        d, node = heapq.heappop(heap)
        if d > dist[node]:
            continue
        for link in links:
            if node in (link.a.node, link.b.node):
                nxt = link.other(node).node
                if nxt in routers and d + link.spec.cost < dist.get(nxt, 1 << 30):
                    dist[nxt] = d + link.spec.cost
                    heapq.heappush(heap, (dist[nxt], nxt))
    for router in sorted(routers):
        if router in (target.a.node, target.b.node) or router not in dist:
            continue
        ways = [link for link in links if router in (link.a.node, link.b.node)
                and link.other(router).node in dist
                and link.spec.cost + dist[link.other(router).node] == dist[router]]
        if len(ways) > 1:
            raise GraphError(f"links: {router} reaches {target.name} ({target.subnet}) equally cheaply "
                             f"over {ways[0].name} and {ways[1].name}: give one of them a higher cost")
        link = ways[0]
        routes[router].append(Route(target.subnet, link.other(router).addr, link.end(router).ifname))


def _next_link(node: str, addr: str, links: Sequence[BuiltLink],
               routes: Mapping[str, Sequence[Route]]) -> BuiltLink | None:
    """The link `node` sends a packet for `addr` out on: a connected subnet, else
    its main table's longest matching route (routers have no default route)."""
    ip = ipaddress.ip_address(addr)
    mine = [link for link in links if node in (link.a.node, link.b.node)]
    for link in mine:
        if ip in ipaddress.ip_network(link.subnet):
            return link
    matching = [r for r in routes[node] if r.table is None and ip in ipaddress.ip_network(r.dst)]
    if not matching:
        return None
    best = max(matching, key=lambda r: ipaddress.ip_network(r.dst).prefixlen)
    return next(link for link in mine if link.end(node).ifname == best.dev)


def _paths(roles: dict[str, str], links: list[BuiltLink], routes: dict[str, list[Route]],
           server: str, primary_link: str | None, default_links: dict[str, str]) -> list[GraphPath]:
    """Walk routing from every client interface to the server."""
    server_links = [link for link in links if server in (link.a.node, link.b.node)]
    out = []
    for client in (n for n, r in roles.items() if r == "client"):
        mine = [link for link in links if client in (link.a.node, link.b.node)]
        if len(mine) > 8:
            raise GraphError(f"links: client {client!r} has {len(mine)} links; MPTCP uses at most 8")
        for access in mine:
            end, far = access.end(client), access.other(client)
            if far.node == server:  # the path ends at this server interface
                out.append(_path(access.spec.path_spec(), client, end, far, server, far.addr,
                                 (access.name,)))
                continue
            if roles[far.node] != "router":
                raise GraphError(f"links: {access.name} joins client {client!r} to {far.node!r}, "
                                 f"a {roles[far.node]} (it does not forward): end it at a router "
                                 "or the server")
            target = _server_address(server, server_links, default_links, primary_link)
            crossed, node = [access.name], far.node
            while roles[node] == "router":
                nxt = _next_link(node, target, links, routes)
                if nxt is None:
                    raise GraphError(f"links: no route from {node!r} to the server's address "
                                     f"{target} (path {access.name} of {client!r})")
                crossed.append(nxt.name)
                node = nxt.other(node).node
                if len(crossed) > len(links):
                    raise GraphError(f"links: path {access.name} of {client!r} loops")
            if node != server:
                raise GraphError(f"links: path {access.name} of {client!r} ends at {node!r}, "
                                 f"not at the server {server!r}")
            out.append(_path(access.spec.path_spec(), client, end, far, server, target,
                             tuple(crossed)))
    return out


def _server_address(server: str, server_links: list[BuiltLink], default_links: dict[str, str],
                    primary_link: str | None) -> str:
    """The server's address paths through routers lead to: on its default link."""
    name = primary_link or default_links.get(server) or server_links[0].name
    return next(link for link in server_links if link.name == name).end(server).addr

