"""Testbed: build a TopologySpec's graph as Mininet nodes running kernel MPTCP.

    with Testbed(load("two-path")) as tb:
        run_command(tb.client.pid, ["ping", "-c1", tb.server_addr])

Every graph node (client, server, cross-traffic host, router) is a namespace;
every emulated link is an emulator namespace between its two ends (no
switches, no controller, no Open vSwitch), e.g. the two-path shorthand:

    c --c-wifi==[x1 emulator]==r-wifi-- r --r-bottleneck== s-bottleneck-- s

Addresses, routes and paths come from TopologySpec.graph()
(testbed.core.addressing). Teardown removes everything, also on
exceptions, SIGINT and SIGTERM; a state file lets `invoke clean` finish the job
after a kill -9.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

from mininet.net import Mininet
from mininet.node import Node
from pydantic import ValidationError
from pyroute2 import IPRoute

from testbed.core import addressing as A
from testbed.core import emulation, faults
from testbed.core.emulation.base import Direction, EmulatedLink
from testbed.core.cross import CrossFlow, CrossTraffic
from testbed.core.events import CROSS_ACTIONS, MIDDLEBOXES, AppliedEvent, EventSpec, LinkState
from testbed.base.errors import TestbedError, format_validation_error
from testbed.core.model import HostSettings, LinkParams, PathSpec, TopologySpec
from testbed.core import mptcp_config, nodestate
from testbed.mptcp import pm
from testbed.base.netns import run_command, run_in_netns, start_command, write_sysctl
from testbed.base.rtnl import RawRtnl
from testbed.base.signals import restore_handlers, unwind_on_exit_signals
from testbed.core.emulation.offloads import disable_offloads
from testbed.core.state import RunState, alive, end_recorded, namespace_members

T = TypeVar("T")

# TCP buffer sysctls pinned in every node's namespace. A new namespace copies
# tcp_rmem/tcp_wmem from the host's, so without this results would depend on
# host state no manifest records. The values are the ones every result stored
# so far was measured with (Mininet's init() used to write them into the host).
# net.core.rmem_max/wmem_max are set where a namespace has its own writable
# copy; on kernels where they are host-wide (read-only or absent inside a
# namespace, as on 6.18 and 6.1) they are skipped and the manifest records the
# host's value, which is what applies.
NAMESPACE_SYSCTLS: dict[str, str | int] = {
    "net.ipv4.tcp_rmem": "10240 87380 16777216",
    "net.ipv4.tcp_wmem": "10240 87380 16777216",
    "net.core.rmem_max": 16777216,
    "net.core.wmem_max": 16777216,
}
# Process limits Mininet's init() raised: they apply to this process only.
PROCESS_LIMITS = {resource.RLIMIT_NPROC: 8192, resource.RLIMIT_NOFILE: 16384}


class NamespacedMininet(Mininet):
    """Mininet that leaves the host alone.

    Mininet.__init__ calls Mininet.init(), whose fixLimits() raises host-wide
    sysctls (tcp_rmem/tcp_wmem, rmem_max/wmem_max, netdev_max_backlog,
    neigh.default.gc_thresh1-3, kernel.pty.max, ...) and never restores them.
    The class flag Mininet.inited is how Mininet itself skips that; we set it
    and raise only this process's limits. What experiments need in the network
    is set inside the nodes' namespaces instead (NAMESPACE_SYSCTLS).
    """

    def __init__(self, **kwargs: Any) -> None:
        Mininet.inited = True  # read by Mininet.init(), called unconditionally below
        for limit, wanted in PROCESS_LIMITS.items():
            soft, hard = resource.getrlimit(limit)
            if soft != resource.RLIM_INFINITY and soft < wanted:
                resource.setrlimit(limit, (wanted, hard if hard == resource.RLIM_INFINITY
                                           else max(hard, wanted)))
        super().__init__(**kwargs)


@dataclass
class Path:
    """A built path: its spec, addresses, interfaces and emulated link (the
    client's access link; `graph.links` names every link it crosses)."""

    spec: PathSpec
    index: int
    addr: A.PathAddresses
    client_if: str
    far_if: str
    link: EmulatedLink
    graph: A.GraphPath

    @property
    def name(self) -> str:
        """The path's name."""
        return self.spec.name


class Testbed:
    """A topology built as namespaces running kernel MPTCP, torn down on exit, error and signal."""
    __test__ = False  # not a pytest class despite the name

    def __init__(self, topology: TopologySpec, backend: str = "auto",
                 client: HostSettings | None = None, server: HostSettings | None = None,
                 run_id: str | None = None):
        self.topology = topology
        self.backend = emulation.select(backend, topology)
        self.settings = {"client": client or HostSettings(), "server": server or HostSettings()}
        self.run_id = run_id or f"tb-{uuid.uuid4().hex[:8]}"
        self.graph = topology.graph()  # what is built: nodes, addressed links, routes, paths
        self.paths: list[Path] = []  # the first client's paths
        self.all_paths: list[Path] = []  # every client's
        self._links: list[EmulatedLink] = []
        self.bottleneck: EmulatedLink | None = None
        self.net: Mininet | None = None
        self._state: RunState | None = None
        self._procs: list[subprocess.Popen] = []
        self._mptcpd: dict[str, subprocess.Popen] = {}  # node name -> its mptcpd (path_manager = mptcpd)
        self._old_handlers: dict[int, Any] = {}
        self._client_rtnl: RawRtnl | None = None  # hot-path netlink in the client's namespace
        self._client_ifindex: dict[str, int] = {}
        self._on_stop: list[Callable[[], None]] = []
        # Nodes exist from start() on; declared here so that every attribute has one home.
        self.client: Node = None  # type: ignore[assignment]
        self.server: Node = None  # type: ignore[assignment]
        self.router: Node | None = None  # the first router, if any
        self._nodes: dict[str, Node] = {}  # graph node name -> node
        self._emulators: dict[str, Node] = {}  # emulated link name -> its emulator node
        self.not_applied: dict[str, dict[str, str]] = {}  # per host: MPTCP knobs this kernel lacks
        # Every change during a run, in the order applied (apply_event), and the
        # faults in force per link (its parameters live in the EmulatedLink).
        self.applied_events: list[AppliedEvent] = []
        self._link_faults: dict[str, LinkState] = {}
        self.cross: CrossTraffic | None = None  # the run's cross traffic (use_cross_traffic)
        # The permanent ARP entries the build installs, per node name (a reset reinstalls them).
        self._statics: dict[str, list[nodestate.StaticNeighbour]] = {}

    # ---- lifecycle -----------------------------------------------------
    def __enter__(self) -> "Testbed":
        self._install_exit_signals()
        try:
            self.start()
        except BaseException:
            self._stop_quietly()
            raise
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            self.stop()
        else:
            self._stop_quietly()

    def _stop_quietly(self) -> None:
        """stop() while another exception propagates: that one stays the error,
        a teardown problem becomes a warning (and its state file stays for clean)."""
        try:
            self.stop()
        except TestbedError as err:
            warnings.warn(str(err))

    def start(self) -> None:
        """Build everything: nodes, links, addresses, routes, MPTCP settings, emulation."""
        self._state = RunState(self.run_id)
        self.net = NamespacedMininet(topo=None, controller=None, build=False, autoSetMacs=False)
        self._create_nodes()
        self._pin_namespace_sysctls()
        self._create_links()
        self._configure_addresses_and_routes()
        self._static_neighbours()
        self._configure_mptcp()
        self._disable_offloads()
        self.backend.start_many(self.links)
        for pid in self.backend.pids():
            self._state.add_pid(pid)
        self._client_rtnl = RawRtnl(self.client.pid)
        ifs = [p.client_if for p in self.paths]

        def ifindexes() -> dict[str, int]:
            with IPRoute() as ipr:
                return {name: ipr.link_lookup(ifname=name)[0] for name in ifs}

        self._client_ifindex = run_in_netns(self.client.pid, ifindexes)

    def on_stop(self, fn: Callable[[], None]) -> None:
        """Run fn first thing in stop() (last registered, first run): for what a
        caller opened inside our namespaces in this process, such as sockets a
        helper thread serves. The process can outlive many testbeds (a sweep),
        so anything left open would pile up."""
        self._on_stop.append(fn)

    def stop(self) -> None:
        """Idempotent teardown, step by step: each step runs even if an earlier one
        failed, and the signals that end a run are held until the last one is
        done (then delivered). The state file goes only when no recorded process
        survives; otherwise TestbedError names what failed or survived, and
        `./tb clean` finishes the job once this process is gone."""
        with _signals_deferred():
            problems = self._teardown()
        if problems:
            raise TestbedError(f"testbed {self.run_id}: teardown incomplete: " + "; ".join(problems))

    def _teardown(self) -> list[str]:
        problems: list[str] = []

        def step(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - collected; the next steps must still run
                problems.append(f"{what}: {type(exc).__name__}: {exc}".splitlines()[0])

        while self._on_stop:
            step("on_stop callback", self._on_stop.pop())
        step("processes started in the namespaces", self._end_started_processes)
        step("client netlink socket", self._close_client_rtnl)
        if self.net is not None:
            step("link emulation", lambda: self.backend.stop_many(self.links))
            # Whatever else runs inside our namespaces (e.g. started from the
            # CLI), except the node shells, which net.stop() ends itself.
            step("other processes in the namespaces", lambda: self._end_namespace_members(
                spare={n.pid for n in self.net.hosts} if self.net is not None else set()))
            step("nodes", self.net.stop)
            self.net = None
        if self._state is not None:
            survivors: list[int] = []
            step("recorded processes", lambda: survivors.extend(self._end_namespace_members(set())))
            if survivors or not _all_gone(self._state):
                problems.append(f"still running: PIDs {', '.join(map(str, survivors)) or '(recorded)'}; "
                                f"state file {self._state.path} kept for `./tb clean`")
            else:
                step("state file", self._state.remove)
                self._state = None
        self._restore_exit_signals()
        return problems

    def _end_started_processes(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass  # the last teardown step finds it and reports it
        self._procs.clear()

    def _close_client_rtnl(self) -> None:
        if self._client_rtnl is not None:
            rtnl, self._client_rtnl = self._client_rtnl, None
            rtnl.close()

    def _end_namespace_members(self, spare: set[int]) -> list[int]:
        """SIGKILL every recorded process and every process in our namespaces,
        except spare; returns those still alive after a few seconds."""
        assert self._state is not None
        pids = self._state.data["pids"]
        members = namespace_members(pids, self._state.data["netns"])
        return end_recorded([m for m in pids + members if m[0] not in spare])

    def _install_exit_signals(self) -> None:
        # SIGTERM and SIGHUP become exceptions so that `with` blocks unwind and
        # clean up (SIGINT already raises KeyboardInterrupt).
        self._old_handlers = unwind_on_exit_signals()

    def _restore_exit_signals(self) -> None:
        if self._old_handlers and _in_main_thread():
            restore_handlers(self._old_handlers)
            self._old_handlers = {}

    # ---- build steps ---------------------------------------------------
    def _add_node(self, name: str) -> Node:
        assert self.net is not None and self._state is not None
        node = self.net.addHost(name, cls=Node, ip=None, inNamespace=True)
        self._state.add_pid(node.pid)
        self._state.add_netns(node.pid)  # clean finds it even after its shell died
        return node

    def _create_nodes(self) -> None:
        """One namespace per graph node and one per emulated link (its emulator)."""
        g = self.graph
        self._nodes = {name: self._add_node(name) for name in g.roles}
        self._emulators = {link.name: self._add_node(link.emulator)
                           for link in g.links if link.emulator is not None}
        self.client = self._nodes[g.client]
        self.server = self._nodes[g.server]
        routers = g.nodes("router")
        self.router = self._nodes[routers[0]] if routers else None

    def _pin_namespace_sysctls(self) -> None:
        """NAMESPACE_SYSCTLS in every node's namespace (those the kernel has per namespace)."""
        assert self.net is not None

        def pin() -> None:  # /proc/sys/net shows the namespace of the thread reading it
            for name, value in NAMESPACE_SYSCTLS.items():
                path = "/proc/sys/" + name.replace(".", "/")
                if os.path.exists(path) and os.stat(path).st_mode & 0o200:  # else host-wide
                    with open(path, "w") as f:
                        f.write(str(value))

        for node in self.net.hosts:
            run_in_netns(node.pid, pin)

    def _link(self, n1: Node, if1: str, n2: Node, if2: str) -> None:
        assert self.net is not None
        self.net.addLink(n1, n2, intfName1=if1, intfName2=if2)

    def _create_links(self) -> None:
        """A veth pair per plain link; two, through the emulator, per emulated one."""
        for built in self.graph.links:
            a, b = self._nodes[built.a.node], self._nodes[built.b.node]
            emu = self._emulators.get(built.name)
            if emu is None:
                self._link(a, built.a.ifname, b, built.b.ifname)
                continue
            port_a, port_b = f"{built.emulator}-a", f"{built.emulator}-b"
            self._link(a, built.a.ifname, emu, port_a)
            self._link(emu, port_b, b, built.b.ifname)
            spec = built.spec
            self._links.append(EmulatedLink(name=built.name, node=emu, port_a=port_a, port_b=port_b,
                                            up=spec.direction("up"), down=spec.direction("down"),
                                            mtu=spec.mtu))
        by_name = {link.name: link for link in self._links}
        # A path's link is its access link, or (a plain access link) the first
        # emulated one it crosses.
        self.all_paths = [Path(gp.spec, gp.index, gp.addr, gp.client_if, gp.far.ifname,
                               next((by_name[n] for n in gp.links if n in by_name), None),  # type: ignore[arg-type]
                               gp)
                          for gp in self.graph.paths]
        self.paths = [p for p in self.all_paths if p.graph.client == self.graph.client]
        self.bottleneck = by_name.get(A.BOTTLENECK)

    def _configure_addresses_and_routes(self) -> None:
        """Addresses, routes and rules from the graph (testbed.core.addressing)."""
        g = self.graph
        for name, role in g.roles.items():
            ends = [(link.end(name), link.spec.mtu) for link in g.links_of(name)]

            def configure(ends=ends, name=name) -> None:
                with IPRoute() as ipr:
                    _up(ipr, "lo")
                    for end, mtu in ends:
                        _addr(ipr, end.ifname, end.addr, mtu)
                    for r in g.routes[name]:
                        idx = ipr.link_lookup(ifname=r.dev)[0]
                        extra = {"table": r.table} if r.table is not None else {}
                        ipr.route("add", dst=r.dst, gateway=r.via, oif=idx, **extra)
                    # One table per source address: without it a join SYN from
                    # this address would leave by the default path and never
                    # establish (the classic "subflows never come up").
                    for rule in g.rules[name]:
                        ipr.rule("add", src=rule.src, src_len=32, table=rule.table,
                                 priority=rule.priority)

            run_in_netns(self._nodes[name].pid, configure)
            if role == "router":
                write_sysctl(self._nodes[name].pid, {"net.ipv4.ip_forward": 1})
        for link in self.links:
            run_in_netns(link.pid, lambda link=link: _emulator_ports(link))

    def _static_neighbours(self) -> None:
        """Permanent ARP entries on both ends of every segment. Otherwise the
        first handshake on a path pays an extra RTT for ARP, and a blackholed
        path (WiFi associated, no Internet: ARP still answers) would turn into
        EHOSTUNREACH after ~3 s instead of the kernel's SYN retries."""
        for link in self.graph.links:
            n1, n2 = self._nodes[link.a.node], self._nodes[link.b.node]
            if1, ip1, if2, ip2 = link.a.ifname, link.a.addr, link.b.ifname, link.b.addr
            mac1 = run_in_netns(n1.pid, lambda i=if1: _mac(i))
            mac2 = run_in_netns(n2.pid, lambda i=if2: _mac(i))
            run_in_netns(n1.pid, lambda i=if1, ip=ip2, m=mac2: _neigh(i, ip, m))
            run_in_netns(n2.pid, lambda i=if2, ip=ip1, m=mac1: _neigh(i, ip, m))
            self._statics.setdefault(link.a.node, []).append(nodestate.StaticNeighbour(if1, ip2, mac2))
            self._statics.setdefault(link.b.node, []).append(nodestate.StaticNeighbour(if2, ip1, mac1))

    def _disable_offloads(self) -> None:
        """Offloads off on every end of every emulated link: queues count real
        MTU-sized packets (not 64 KB GSO super-packets), loss hits single
        packets, and a user-space forwarder never sees partial checksums."""
        ends: dict[Node, list[str]] = {}
        for built in self.graph.links:
            for end in (built.a, built.b):
                ends.setdefault(self._nodes[end.node], []).append(end.ifname)
        for link in self.links:
            ends.setdefault(link.node, []).extend([link.port_a, link.port_b])
        for node, ifs in ends.items():
            disable_offloads(node.pid, ifs)

    def _configure_mptcp(self) -> None:
        """Settings and limits on every client and server; kernel-PM endpoints on
        each client's non-default paths and on the server's flagged addresses."""
        g = self.graph
        self.not_applied: dict[str, dict[str, str]] = {}
        subflows, add_addr_accepted = self._pm_limits()
        for role in ("client", "server"):
            for name in g.nodes(role):
                node = self._nodes[name]
                lacks = mptcp_config.apply_settings(node.pid, self.settings[role])
                self.not_applied[role if name in (g.client, g.server) else name] = lacks
                mptcp_config.set_limits(node.pid, subflows=subflows,
                                        add_addr_accepted=add_addr_accepted)
                if self.settings[role].path_manager == "mptcpd":  # recorded, ended at teardown
                    self._mptcpd[name] = mptcp_config.start_mptcpd(
                        node.pid, lambda argv, node=node, **kw: self.popen(node, argv, **kw))
        for name, eps in self._spec_endpoints().items():
            pm.add_endpoints(self._nodes[name].pid, eps)

    def _pm_limits(self) -> tuple[int, int]:
        """The in-kernel PM's (subflows, add_addr_accepted) limits every client and server gets."""
        n = max(len(self.graph.paths_of(c)) for c in self.graph.nodes("client"))
        return min(8, max(n, 2)), min(8, n)

    def _spec_endpoints(self) -> dict[str, list[pm.Endpoint]]:
        """The kernel-PM endpoints the testbed gives each node (name -> endpoints):
        each client's non-default paths and the server's flagged addresses."""
        g = self.graph
        out: dict[str, list[pm.Endpoint]] = {}
        # A userspace-PM host gets none (RobE's temporary ones must not outlive a run);
        # mptcpd makes its own, so they are not the testbed's to give or check.
        if self.settings["client"].path_manager == "kernel":
            for name in g.nodes("client"):
                out[name] = [ep for ep in map(self._client_endpoint, self.all_paths)
                             if ep is not None and self._path_client(ep) == name]
        elif self.settings["client"].path_manager == "userspace":
            out.update({name: [] for name in g.nodes("client")})
        if self.settings["server"].path_manager == "userspace":
            out[g.server] = []
        elif self.settings["server"].path_manager == "kernel":
            primary = g.server_addr
            out[g.server] = [pm.Endpoint(link.end(g.server).addr, link.end(g.server).ifname,
                                         tuple(link.spec.server_endpoint), id=link.net)
                             for link in g.links_of(g.server)
                             if link.spec.server_endpoint and link.end(g.server).addr != primary]
        return out

    def _path_client(self, ep: pm.Endpoint) -> str:
        return next(p.graph.client for p in self.all_paths if p.addr.client == ep.addr)

    # ---- queries and helpers -------------------------------------------
    @property
    def links(self) -> list[EmulatedLink]:
        """Every emulated link, in the order the topology lists them."""
        return list(self._links)

    @property
    def server_addr(self) -> str:
        """The address the client connects to (over the default path)."""
        return self.graph.server_addr

    def node(self, name: str) -> Node:
        """The node the topology calls `name` (a client, server, host or router)."""
        if name not in self._nodes:
            raise TestbedError(f"no node {name!r} in topology {self.topology.name!r} "
                               f"(nodes: {', '.join(self.graph.roles)})")
        return self._nodes[name]

    @property
    def nodes(self) -> dict[str, Node]:
        """The Mininet nodes by name."""
        assert self.net is not None
        return {n.name: n for n in self.net.hosts}

    def path(self, name: str) -> Path:
        """Path `name` of any client (paths are named after their access link)."""
        for p in self.all_paths:
            if p.name == name:
                return p
        raise TestbedError(f"no path {name!r} in topology {self.topology.name!r} "
                           f"(paths: {', '.join(p.name for p in self.all_paths)})")

    def link(self, name: str) -> EmulatedLink:
        """Emulated link `name` (a path's access link, "bottleneck", any other link)."""
        for link in self._links:
            if link.name == name:
                return link
        raise TestbedError(f"no emulated link {name!r} in topology {self.topology.name!r} "
                           f"(links: {', '.join(link.name for link in self._links)})")

    def in_ns(self, node: Node, fn: Callable[[], T]) -> T:
        """Run fn() in node's network namespace (sockets created there stay there)."""
        return run_in_netns(node.pid, fn)

    def mptcpd_pids(self) -> dict[str, int]:
        """PID of the mptcpd started in each host that chose path_manager = 'mptcpd'."""
        return {name: proc.pid for name, proc in self._mptcpd.items()}

    def popen(self, node: Node, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start a process in node's namespace; recorded, and killed at teardown."""
        assert self._state is not None
        proc = start_command(node.pid, argv, **kwargs)
        self._procs.append(proc)
        self._state.add_pid(proc.pid)
        return proc

    # ---- changes during a run: every one goes through apply_event ------------
    def apply_event(self, event: EventSpec, scheduled: float | None = None) -> AppliedEvent:
        """Apply one event now (link down/up, blackhole, set_link, a middlebox, the
        backup flag) and record it in `applied_events`: when it was due
        (`scheduled`, time.monotonic(); default: now), when it took effect and the
        link right after. A failure is recorded too, then raised."""
        began = time.monotonic()
        emulator: float | None = None
        error: str | None = None
        try:
            emulator = self._apply(event)
        except BaseException as exc:  # also an interrupt mid-change: never recorded as ok
            error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise
        finally:
            done = time.monotonic()
            # A backend timestamp outside the call would be another change's.
            emulator = emulator if emulator is not None and began <= emulator <= done else None
            rec = AppliedEvent(event=event, scheduled=began if scheduled is None else scheduled,
                               began=began, done=done, applied=emulator or done,
                               emulator_clock=emulator is not None, ok=error is None, error=error,
                               link=self.link_state(event.path) if event.path in self._link_names()
                               else None)
            self.applied_events.append(rec)
        return rec

    def link_state(self, name: str) -> LinkState:
        """The link `name` now: parameters per direction and the faults in force."""
        link = self.link(name)
        state = self._link_faults.get(name) or self._initial_state(name)
        return state.model_copy(update={"up": link.up, "down": link.down})

    def link_states(self) -> dict[str, LinkState]:
        """Every link's state (the run stores them as links_at_end)."""
        return {link.name: self.link_state(link.name) for link in self.links}

    def use_cross_traffic(self, flows: Sequence[CrossFlow]) -> CrossTraffic:
        """The cross-traffic flows of the coming run (none running yet; the events
        cross_start/cross_stop start and stop them): replaces the last run's,
        whose running flows stop."""
        if self.cross is not None:
            self.cross.stop_all()
        self.cross = CrossTraffic(self, list(flows))
        return self.cross

    # ---- reuse between runs ---------------------------------------------
    def adopt_per_socket_settings(self, client: HostSettings, server: HostSettings) -> None:
        """Carry the next run's per-socket settings (congestion control) on this
        testbed; ValueError if the settings its namespaces pin differ too."""
        wanted = {"client": client, "server": server}
        for role, settings in wanted.items():
            if settings.namespace_settings() != self.settings[role].namespace_settings():
                raise ValueError(f"{role}: settings pinned in its namespace differ from the "
                                 "built testbed's: a testbed of its own is needed")
        self.settings.update(wanted)

    def reset(self) -> list[str]:
        """Undo what a run changed (link parameters, carrier, blackholes, middleboxes,
        backup flags, kernel-PM endpoints and limits, neighbours, conntrack entries,
        open connections and with them the userspace PM's state), then check
        the testbed against its spec: the mismatches, each naming what and the value
        found ([]: the testbed is as built and may carry the next run)."""
        if self.cross is not None:  # the last run's competing flows end with it
            self.cross.stop_all()
            self.cross = None
        for link in self.links:
            for d in ("up", "down"):
                built = self._built_link(link.name).spec.direction(d)
                if link.params(d) != built:
                    self.backend.update(link, d, built)
                    setattr(link, d, built)
        for name, state in list(self._link_faults.items()):
            if state.carrier is False:
                self._set_carrier(name, True)
            for d in state.blackholed or ():
                self.backend.set_blackhole(self.link(name), d, False)
            if state.middlebox is not None:
                p = self.path(name)
                far = p.graph.far.node
                hook = "forward" if self.graph.roles[far] == "router" else "input"
                faults.set_middlebox(self._nodes[far].pid, hook, p.name, p.far_if, None)
        subflows, add_addr_accepted = self._pm_limits()
        for name, eps in self._spec_endpoints().items():
            pid = self._nodes[name].pid
            if sorted(map(_endpoint_key, pm.endpoints(pid))) != sorted(map(_endpoint_key, eps)):
                for ep in pm.endpoints(pid):
                    pm.delete_endpoint(pid, ep.id)
                pm.add_endpoints(pid, eps)
        for role in ("client", "server"):
            for name in self.graph.nodes(role):
                mptcp_config.set_limits(self._nodes[name].pid, subflows=subflows,
                                        add_addr_accepted=add_addr_accepted)
        # Learnt neighbours go; static ones come back (an interface taken down
        # loses even its permanent entries); conntrack and connections go.
        for name, node in self._nodes.items():
            nodestate.clear(node.pid, self._statics.get(name, []),
                            sockets=self.graph.roles[name] in ("client", "server"))
        self._link_faults.clear()
        self.applied_events.clear()
        return self.reset_problems()

    def reset_problems(self) -> list[str]:
        """Where the testbed differs from its spec, read from the kernel where it
        can be (endpoints, limits, carrier, neighbours, conntrack, nftables rules,
        connections) and from the emulator's settings."""
        out = []
        for link in self.links:
            for d in ("up", "down"):
                built = self._built_link(link.name).spec.direction(d)
                if link.params(d) != built:
                    out.append(f"link {link.name} {d}: {link.params(d)} (spec {built})")
        for name, state in self._link_faults.items():
            out.append(f"link {name}: faults still in force: {state}")
        subflows, add_addr_accepted = self._pm_limits()
        for name, eps in self._spec_endpoints().items():
            found = sorted(map(_endpoint_key, pm.endpoints(self._nodes[name].pid)))
            if found != sorted(map(_endpoint_key, eps)):
                out.append(f"{name}: endpoints {found} (spec {sorted(map(_endpoint_key, eps))})")
        for role in ("client", "server"):
            for name in self.graph.nodes(role):
                lim = mptcp_config.snapshot(self._nodes[name].pid)
                got = (lim.get("subflows"), lim.get("add_addr_accepted"))
                if got != (subflows, add_addr_accepted):
                    out.append(f"{name}: PM limits (subflows, add_addr_accepted) {got} "
                               f"(spec {(subflows, add_addr_accepted)})")
        for p in self.all_paths:
            pid = self._nodes[p.graph.client].pid
            res = run_command(pid, ["ip", "-j", "link", "show", "dev", p.client_if])
            flags = json.loads(res.stdout)[0].get("flags", []) if res.returncode == 0 else []
            if "UP" not in flags:
                out.append(f"path {p.name}: client interface {p.client_if} flags {flags} (spec UP)")
        for name, node in self._nodes.items():
            out += nodestate.problems(node.pid, name, self._statics.get(name, []),
                                      sockets=self.graph.roles[name] in ("client", "server"))
        return out

    def _built_link(self, name: str) -> Any:
        """The graph's link `name` (its spec is what the link is built with)."""
        return next(link for link in self.graph.links if link.name == name)

    def _path_names(self) -> set[str]:
        return {p.name for p in self.all_paths}

    def _link_names(self) -> set[str]:
        return {link.name for link in self.links}

    def _initial_state(self, name: str) -> LinkState:
        link = self.link(name)
        ep = self._client_endpoint(self.path(name)) if name in self._path_names() else None
        kernel_pm = self.settings["client"].path_manager == "kernel"
        return LinkState(up=link.up, down=link.down,
                         backup="backup" in ep.flags if ep is not None and kernel_pm else None)

    def _set_fault(self, name: str, **update: Any) -> None:
        self._link_faults[name] = self.link_state(name).model_copy(update=update)

    def _apply(self, e: EventSpec) -> float | None:
        """Carry out one event; the emulator's own apply time where it has one."""
        if e.action in CROSS_ACTIONS:
            if self.cross is None:
                raise TestbedError(f"{e.describe()}: this run declares no cross traffic")
            (self.cross.start if e.action == "cross_start" else self.cross.stop)(e.flow or "")
            return None
        a, link = e.action, self.link(e.path)
        if a in ("link_down", "link_up"):
            if e.path not in self._path_names():
                what = "the bottleneck" if e.path == A.BOTTLENECK else f"link {e.path!r}"
                raise TestbedError(f"{what} has no carrier to take down; use 'blackhole'")
            self._set_carrier(e.path, up=a == "link_up")
            self._set_fault(e.path, carrier=a == "link_up")
            return None
        if a in ("blackhole", "unblackhole"):
            times = [self.backend.set_blackhole(link, d, a == "blackhole") for d in e.directions()]
            now = set(self.link_state(e.path).blackholed)
            now = now | set(e.directions()) if a == "blackhole" else now - set(e.directions())
            self._set_fault(e.path, blackholed=tuple(d for d in ("up", "down") if d in now))
            return max((t for t in times if t is not None), default=None)
        if a == "set_link":
            times = []
            for d in e.directions():
                params = self._changed_params(e, link, d)
                times.append(self.backend.update(link, d, params))
                if d == "up":
                    link.up = params
                else:
                    link.down = params
            return max((t for t in times if t is not None), default=None)
        p = self.path(e.path)
        if a in MIDDLEBOXES or a in ("syn_pass", "middlebox_off"):
            # Where the path's access link ends: a router forwards, a server takes it in.
            far = p.graph.far.node
            hook = "forward" if self.graph.roles[far] == "router" else "input"
            faults.set_middlebox(self._nodes[far].pid, hook, p.name, p.far_if,
                                 a if a in MIDDLEBOXES else None)
            self._set_fault(e.path, middlebox=a if a in MIDDLEBOXES else None)
            return None
        if a in ("backup_on", "backup_off"):
            ep = self._client_endpoint(p)
            if ep is None or self.settings["client"].path_manager != "kernel":
                raise TestbedError(f"{a}: path {p.name!r} has no kernel path-manager endpoint "
                                   "on the client")
            mptcp_config.set_backup(self._nodes[p.graph.client].pid, ep, a == "backup_on")
            self._set_fault(e.path, backup=a == "backup_on")
            return None
        raise TestbedError(f"unknown event action {a!r}")  # EventSpec lists every action

    @staticmethod
    def _changed_params(e: EventSpec, link: EmulatedLink, d: Direction) -> LinkParams:
        """link's parameters in direction d with e's changes, within the model's ranges
        (scenario events were checked at load; events built in code are checked here)."""
        try:
            params = LinkParams(**{**link.params(d).model_dump(), **e.changes.given()})
            params.check_queue(params.delay_ms + link.params("down" if d == "up" else "up").delay_ms,
                               link.mtu)
        except ValidationError as exc:
            raise TestbedError(format_validation_error(f"set_link on {e.path!r}", exc)) from None
        except ValueError as exc:
            raise TestbedError(f"set_link on {e.path!r}: {exc}") from None
        return params

    def _client_endpoint(self, p: Path) -> pm.Endpoint | None:
        """The client's kernel-PM endpoint on path p as built (none on the default path)."""
        default = self.graph.default_links[p.graph.client]
        if p.name == default or not (p.spec.client_endpoint or p.spec.backup):
            return None
        flags = (*p.spec.client_endpoint, *(("backup",) if p.spec.backup else ()))
        return pm.Endpoint(p.addr.client, p.client_if, flags, id=p.index)

    def _set_carrier(self, name: str, up: bool) -> None:
        """Link down/up: the client's interface of the path goes down (carrier
        lost). Raw rtnetlink on a socket kept open in the client's namespace,
        so a timed failure lands well within a millisecond of its schedule."""
        assert self._client_rtnl is not None, "testbed not started"
        p = self.path(name)
        if p.graph.client != self.graph.client:  # another client: a socket just for this
            pid = self._nodes[p.graph.client].pid
            rtnl = RawRtnl(pid)
            try:
                self._carrier(rtnl, p, run_in_netns(pid, lambda: _ifindex(p.client_if)), up)
            finally:
                rtnl.close()
            return
        self._carrier(self._client_rtnl, p, self._client_ifindex[p.client_if], up)

    def _carrier(self, rtnl: RawRtnl, p: Path, idx: int, up: bool) -> None:
        rtnl.set_link(idx, up)
        if up:  # the kernel dropped the path's routes with the carrier
            rtnl.replace_default(p.addr.far, idx, p.addr.table)
            if p.name == self.graph.default_links[p.graph.client]:
                rtnl.replace_default(p.addr.far, idx)

    def interface_bytes(self) -> dict[str, dict[str, int]]:
        """Bytes sent/received by the client on each path's interface."""
        def read() -> dict[str, dict[str, int]]:
            out = {}
            with IPRoute() as ipr:
                for p in self.paths:
                    link = ipr.get_links(ifname=p.client_if)[0]
                    st = link.get_attr("IFLA_STATS64")
                    out[p.name] = {"tx_bytes": st["tx_bytes"], "rx_bytes": st["rx_bytes"],
                                   "tx_packets": st["tx_packets"], "rx_packets": st["rx_packets"]}
            return out

        return run_in_netns(self.client.pid, read)

    def settled_interface_bytes(self, still_s: float = 0.25,
                                timeout_s: float = 3.0) -> dict[str, dict[str, int]]:
        """interface_bytes() once the counters have stopped moving for still_s.

        A sender that exits still has its socket buffer to flush (and FINs to
        exchange); reading the counters right away leaves that tail to be
        charged to whatever runs next on the same testbed."""
        last, deadline = self.interface_bytes(), time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            time.sleep(still_s)
            now = self.interface_bytes()
            if now == last:
                break
            last = now
        return last

    def describe(self) -> dict[str, Any]:
        """What was built, for the run manifest."""
        return {
            "run_id": self.run_id,
            "topology": self.topology.model_dump(mode="json"),
            "emulation": self.backend.describe(),
            "server_addr": self.server_addr,
            "paths": [{"name": p.name, "client": p.graph.client, "client_addr": p.addr.client,
                       "far_addr": p.addr.far, "client_if": p.client_if, "table": p.addr.table,
                       "server_addr": p.graph.server_addr, "links": list(p.graph.links)}
                      for p in self.all_paths],
            "graph": self.graph.describe(),
            "hosts": {role: {**mptcp_config.snapshot(node.pid),
                             "not_applied": self.not_applied.get(role, {}),
                             "mptcpd": mptcp_config.mptcpd_info(self._mptcpd.get(node.name))}
                      for role, node in (("client", self.client), ("server", self.server))},
            # The hosts' setting, which the workloads apply to both ends' sockets
            # unless a run names its own cc (raw output records the sockets').
            "congestion_control": {r: self.settings["client"].congestion_control
                                   for r in ("client", "server")},
        }


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


# What ends a run (Ctrl-C, kill, a closed terminal, the runner's per-run timer).
TEARDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold TEARDOWN_SIGNALS until the block is done, then deliver them.

    Blocked in the main thread (threads started inside inherit the mask); one
    sent to the process can still land on an older thread, so the handlers
    record it for the same delivery. Only the main thread runs Python signal
    handlers: elsewhere the block runs as it is."""
    if not _in_main_thread():
        yield
        return
    caught: list[int] = []

    def defer(signum: int, frame: object) -> None:
        caught.append(signum)

    old = {sig: signal.signal(sig, defer) for sig in TEARDOWN_SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, TEARDOWN_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # held ones reach defer() now
        restore_handlers(old)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


def _endpoint_key(ep: pm.Endpoint) -> tuple[str, int, tuple[str, ...]]:
    """What identifies an endpoint when comparing with the spec (the kernel does not report ifname)."""
    return (ep.addr, ep.id, tuple(sorted(ep.flags)))


def _all_gone(state: RunState) -> bool:
    return not any(alive(pid, st) for pid, st in state.data["pids"])


def _up(ipr: IPRoute, ifname: str) -> int:
    idx = ipr.link_lookup(ifname=ifname)[0]
    ipr.link("set", index=idx, state="up")
    return idx


def _addr(ipr: IPRoute, ifname: str, address: str, mtu: int) -> int:
    idx = ipr.link_lookup(ifname=ifname)[0]
    ipr.link("set", index=idx, mtu=mtu)
    ipr.addr("add", index=idx, address=address, prefixlen=A.PREFIX)
    ipr.link("set", index=idx, state="up")
    return idx


def _ifindex(ifname: str) -> int:
    with IPRoute() as ipr:
        return ipr.link_lookup(ifname=ifname)[0]


def _mac(ifname: str) -> str:
    with IPRoute() as ipr:
        return ipr.get_links(ifname=ifname)[0].get_attr("IFLA_ADDRESS")


def _neigh(ifname: str, ip: str, mac: str) -> None:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)[0]
        ipr.neigh("replace", dst=ip, lladdr=mac, ifindex=idx, state=0x80)  # NUD_PERMANENT


def _emulator_ports(link: EmulatedLink) -> None:
    with IPRoute() as ipr:
        _up(ipr, "lo")
        for port in (link.port_a, link.port_b):
            idx = ipr.link_lookup(ifname=port)[0]
            ipr.link("set", index=idx, mtu=link.mtu, state="up")


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll pred until it is true or timeout passes; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


__all__ = ["Testbed", "Path", "wait_until"]
