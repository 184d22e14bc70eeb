"""Testbed: build a TopologySpec as Mininet nodes running kernel MPTCP.

    with Testbed(load("two-path")) as tb:
        tb.client.cmd("ping -c1", tb.server_addr)

Shape (no switches, no controller, no Open vSwitch):

    client --c-<path>==[x<i> emulator]==r-<path>-- router --r-srv==s-eth0-- server

The emulator node of each path (and of an optional shared bottleneck between
router and server) holds the link emulation; with server_side="multihomed" the
paths end at the server itself. Teardown removes everything, also on
exceptions, SIGINT and SIGTERM; a state file lets `invoke clean` finish the job
after a kill -9.
"""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

from mininet.net import Mininet
from mininet.node import Node
from pyroute2 import IPRoute

from testbed.core import addressing as A
from testbed.core import emulation, faults
from testbed.core.emulation.base import EmulatedLink
from testbed.core.events import MIDDLEBOXES, AppliedEvent, EventSpec, LinkState
from testbed.base.errors import TestbedError
from testbed.core.model import HostSettings, LinkParams, PathSpec, TopologySpec
from testbed.core import mptcp_config
from testbed.base.netns import run_in_netns, write_sysctl
from testbed.base.rtnl import RawRtnl
from testbed.core.state import RunState, kill_recorded, namespace_members

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
    """A built path: its spec, addresses, interfaces and emulated link."""

    spec: PathSpec
    index: int
    addr: A.PathAddresses
    client_if: str
    far_if: str
    link: EmulatedLink

    @property
    def name(self) -> str:
        return self.spec.name


class Testbed:
    __test__ = False  # not a pytest class despite the name

    def __init__(self, topology: TopologySpec, backend: str = "auto",
                 client: HostSettings | None = None, server: HostSettings | None = None,
                 run_id: str | None = None):
        self.topology = topology
        self.backend = emulation.select(backend, topology)
        self.settings = {"client": client or HostSettings(), "server": server or HostSettings()}
        self.run_id = run_id or f"tb-{uuid.uuid4().hex[:8]}"
        self.paths: list[Path] = []
        self.bottleneck: EmulatedLink | None = None
        self.net: Mininet | None = None
        self._state: RunState | None = None
        self._procs: list[subprocess.Popen] = []
        self._old_sigterm: Any = None
        self._client_rtnl: RawRtnl | None = None  # hot-path netlink in the client's namespace
        self._client_ifindex: dict[str, int] = {}
        self._on_stop: list[Callable[[], None]] = []
        # Nodes exist from start() on; declared here so that every attribute has one home.
        self.client: Node = None  # type: ignore[assignment]
        self.server: Node = None  # type: ignore[assignment]
        self.router: Node | None = None
        self._emulators: list[Node] = []
        self._bottleneck_node: Node | None = None
        self.not_applied: dict[str, dict[str, str]] = {}  # per host: MPTCP knobs this kernel lacks
        # Every change during a run, in the order applied (apply_event), and the
        # faults in force per link (its parameters live in the EmulatedLink).
        self.applied_events: list[AppliedEvent] = []
        self._link_faults: dict[str, LinkState] = {}

    # ---- lifecycle -----------------------------------------------------
    def __enter__(self) -> "Testbed":
        self._install_sigterm()
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
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
        """Idempotent teardown: processes, emulation, nodes (and their namespaces)."""
        while self._on_stop:
            try:
                self._on_stop.pop()()
            except Exception as exc:  # teardown goes on; the rest must still be released
                warnings.warn(f"testbed {self.run_id}: on_stop callback failed: {exc}")
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        if self._client_rtnl is not None:
            self._client_rtnl.close()
            self._client_rtnl = None
        if self.net is not None:
            self.backend.stop_many(self.links)
            if self._state is not None:
                # Whatever still runs inside our namespaces (e.g. started from the
                # CLI) except the node shells, which net.stop() ends itself.
                shells = {n.pid for n in self.net.hosts}
                kill_recorded([m for m in namespace_members(self._state.data["pids"])
                               if m[0] not in shells])
            self.net.stop()
            self.net = None
        if self._state is not None:
            self._state.remove()
            self._state = None
        self._restore_sigterm()

    def _install_sigterm(self) -> None:
        # SIGTERM becomes an exception so that `with` blocks unwind and clean up.
        if _in_main_thread():
            def raise_exit(signum: int, frame: object) -> None:
                raise SystemExit(128 + signum)
            self._old_sigterm = signal.signal(signal.SIGTERM, raise_exit)

    def _restore_sigterm(self) -> None:
        if self._old_sigterm is not None and _in_main_thread():
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    # ---- build steps ---------------------------------------------------
    def _add_node(self, name: str) -> Node:
        assert self.net is not None and self._state is not None
        node = self.net.addHost(name, cls=Node, ip=None, inNamespace=True)
        self._state.add_pid(node.pid)
        return node

    def _create_nodes(self) -> None:
        topo = self.topology
        self.client = self._add_node("c")
        self.server = self._add_node("s")
        self.router = self._add_node("r") if topo.server_side == "router" else None
        self._emulators = [self._add_node(f"x{i + 1}") for i in range(len(topo.paths))]
        self._bottleneck_node = self._add_node("xb") if topo.bottleneck else None

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
        topo = self.topology
        far = self.router or self.server
        far_prefix = "r" if self.router else "s"
        for i, (spec, emu) in enumerate(zip(topo.paths, self._emulators), start=1):
            client_if, far_if = f"c-{spec.name}", f"{far_prefix}-{spec.name}"
            port_a, port_b = f"x{i}-a", f"x{i}-b"
            self._link(self.client, client_if, emu, port_a)
            self._link(emu, port_b, far, far_if)
            link = EmulatedLink(name=spec.name, node=emu, port_a=port_a, port_b=port_b,
                                up=spec.direction("up"), down=spec.direction("down"), mtu=spec.mtu)
            self.paths.append(Path(spec, i, A.PathAddresses(i), client_if, far_if, link))
        if self.router is not None:
            if topo.bottleneck is not None:
                bn = self._bottleneck_node
                self._link(self.router, "r-srv", bn, "xb-a")
                self._link(bn, "xb-b", self.server, "s-eth0")
                params = LinkParams(**{k: getattr(topo.bottleneck, k) for k in LinkParams.model_fields})
                self.bottleneck = EmulatedLink("bottleneck", bn, "xb-a", "xb-b", params, params,
                                               mtu=topo.bottleneck.mtu)
            else:
                self._link(self.router, "r-srv", self.server, "s-eth0")

    def _configure_addresses_and_routes(self) -> None:
        client_addrs = []
        for p in self.paths:
            client_addrs.append((p.client_if, p.addr.client, p.spec.mtu))
        default = self.path(self.topology.default.name)

        def client() -> None:
            with IPRoute() as ipr:
                _up(ipr, "lo")
                for p in self.paths:
                    idx = _addr(ipr, p.client_if, p.addr.client, p.spec.mtu)
                    # One table per source address: without it a join SYN from
                    # this address would leave by the default path and never
                    # establish (the classic "subflows never come up").
                    ipr.route("add", dst="0.0.0.0/0", gateway=p.addr.far, oif=idx, table=p.addr.table)
                    ipr.rule("add", src=p.addr.client, src_len=32, table=p.addr.table,
                             priority=1000 + p.index)
                idx = ipr.link_lookup(ifname=default.client_if)[0]
                ipr.route("add", dst="0.0.0.0/0", gateway=default.addr.far, oif=idx)

        run_in_netns(self.client.pid, client)
        for link in self.links:
            run_in_netns(link.pid, lambda link=link: _emulator_ports(link))
        if self.router is not None:
            def router() -> None:
                with IPRoute() as ipr:
                    _up(ipr, "lo")
                    for p in self.paths:
                        _addr(ipr, p.far_if, p.addr.far, p.spec.mtu)
                    _addr(ipr, "r-srv", A.ROUTER_SERVER_SIDE, self._server_mtu())

            run_in_netns(self.router.pid, router)
            write_sysctl(self.router.pid, {"net.ipv4.ip_forward": 1})

            def server() -> None:
                with IPRoute() as ipr:
                    _up(ipr, "lo")
                    _addr(ipr, "s-eth0", A.SERVER, self._server_mtu())
                    ipr.route("add", dst="0.0.0.0/0", gateway=A.ROUTER_SERVER_SIDE)

            run_in_netns(self.server.pid, server)
        else:
            def server_multihomed() -> None:
                # Connected routes send each reply back over the path it came by.
                with IPRoute() as ipr:
                    _up(ipr, "lo")
                    for p in self.paths:
                        _addr(ipr, p.far_if, p.addr.far, p.spec.mtu)

            run_in_netns(self.server.pid, server_multihomed)

    def _static_neighbours(self) -> None:
        """Permanent ARP entries on both ends of every segment. Otherwise the
        first handshake on a path pays an extra RTT for ARP, and a blackholed
        path (WiFi associated, no Internet: ARP still answers) would turn into
        EHOSTUNREACH after ~3 s instead of the kernel's SYN retries."""
        far = self.router or self.server
        segments = [(self.client, p.client_if, p.addr.client, far, p.far_if, p.addr.far)
                    for p in self.paths]
        if self.router is not None:
            segments.append((self.router, "r-srv", A.ROUTER_SERVER_SIDE, self.server, "s-eth0", A.SERVER))
        for n1, if1, ip1, n2, if2, ip2 in segments:
            mac1 = run_in_netns(n1.pid, lambda i=if1: _mac(i))
            mac2 = run_in_netns(n2.pid, lambda i=if2: _mac(i))
            run_in_netns(n1.pid, lambda i=if1, ip=ip2, m=mac2: _neigh(i, ip, m))
            run_in_netns(n2.pid, lambda i=if2, ip=ip1, m=mac1: _neigh(i, ip, m))

    def _disable_offloads(self) -> None:
        """Offloads off on every end of every emulated link: queues count real
        MTU-sized packets (not 64 KB GSO super-packets), loss hits single
        packets, and a user-space forwarder never sees partial checksums."""
        ends: dict[Node, list[str]] = {}
        far = self.router or self.server
        for p in self.paths:
            ends.setdefault(self.client, []).append(p.client_if)
            ends.setdefault(far, []).append(p.far_if)
        if self.bottleneck is not None:
            assert self.router is not None
            ends.setdefault(self.router, []).append("r-srv")
            ends.setdefault(self.server, []).append("s-eth0")
        for link in self.links:
            ends.setdefault(link.node, []).extend([link.port_a, link.port_b])
        for node, ifs in ends.items():
            script = "; ".join(f"ethtool -K {i} tx off rx off tso off gso off gro off" for i in ifs)
            out = node.cmd(f"{{ {script}; }} 2>&1 >/dev/null | grep -v 'not supported\\|Cannot change' ; true")
            if out.strip():
                raise TestbedError(f"ethtool on {node.name}: {out.strip().splitlines()[0]}")

    def _server_mtu(self) -> int:
        return self.topology.bottleneck.mtu if self.topology.bottleneck else 1500

    def _configure_mptcp(self) -> None:
        n = len(self.paths)
        hosts = {"client": self.client, "server": self.server}
        self.not_applied: dict[str, dict[str, str]] = {}
        for role, node in hosts.items():
            self.not_applied[role] = mptcp_config.apply_settings(node.pid, self.settings[role])
            mptcp_config.set_limits(node.pid, subflows=min(8, max(n, 2)), add_addr_accepted=min(8, n))
        default = self.topology.default.name
        if self.settings["client"].path_manager == "kernel":
            eps = [ep for ep in map(self._client_endpoint, self.paths) if ep is not None]
            mptcp_config.add_endpoints(self.client.pid, eps)
        if self.settings["server"].path_manager == "kernel" and self.router is None:
            eps = [mptcp_config.Endpoint(p.addr.far, p.far_if, tuple(p.spec.server_endpoint), id=p.index)
                   for p in self.paths if p.spec.server_endpoint and p.name != default]
            mptcp_config.add_endpoints(self.server.pid, eps)

    # ---- queries and helpers -------------------------------------------
    @property
    def links(self) -> list[EmulatedLink]:
        out = [p.link for p in self.paths]
        return out + ([self.bottleneck] if self.bottleneck else [])

    @property
    def server_addr(self) -> str:
        """The address the client connects to (over the default path)."""
        if self.router is not None:
            return A.SERVER
        return self.path(self.topology.default.name).addr.far

    @property
    def nodes(self) -> dict[str, Node]:
        assert self.net is not None
        return {n.name: n for n in self.net.hosts}

    def path(self, name: str) -> Path:
        for p in self.paths:
            if p.name == name:
                return p
        raise TestbedError(f"no path {name!r} in topology {self.topology.name!r} "
                           f"(paths: {', '.join(p.name for p in self.paths)})")

    def link(self, name: str) -> EmulatedLink:
        if name == "bottleneck" and self.bottleneck is not None:
            return self.bottleneck
        return self.path(name).link

    def in_ns(self, node: Node, fn: Callable[[], T]) -> T:
        """Run fn() in node's network namespace (sockets created there stay there)."""
        return run_in_netns(node.pid, fn)

    def popen(self, node: Node, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start a process in node's namespace; recorded, and killed at teardown."""
        assert self._state is not None
        proc = subprocess.Popen(["mnexec", "-da", str(node.pid), *argv], **kwargs)
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
        except Exception as exc:
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

    def _link_names(self) -> set[str]:
        return {link.name for link in self.links}

    def _initial_state(self, name: str) -> LinkState:
        link = self.link(name)
        ep = None if name == "bottleneck" else self._client_endpoint(self.path(name))
        kernel_pm = self.settings["client"].path_manager == "kernel"
        return LinkState(up=link.up, down=link.down,
                         backup="backup" in ep.flags if ep is not None and kernel_pm else None)

    def _set_fault(self, name: str, **update: Any) -> None:
        self._link_faults[name] = self.link_state(name).model_copy(update=update)

    def _apply(self, e: EventSpec) -> float | None:
        """Carry out one event; the emulator's own apply time where it has one."""
        a, link = e.action, self.link(e.path)
        if a in ("link_down", "link_up"):
            if e.path == "bottleneck":
                raise TestbedError("the bottleneck has no carrier to take down; use 'blackhole'")
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
                params = LinkParams(**{**link.params(d).model_dump(), **e.changes.given()})
                times.append(self.backend.update(link, d, params))
                if d == "up":
                    link.up = params
                else:
                    link.down = params
            return max((t for t in times if t is not None), default=None)
        p = self.path(e.path)
        if a in MIDDLEBOXES or a in ("syn_pass", "middlebox_off"):
            node = self.router or self.server
            faults.set_middlebox(node.pid, "forward" if self.router else "input", p.name, p.far_if,
                                 a if a in MIDDLEBOXES else None)
            self._set_fault(e.path, middlebox=a if a in MIDDLEBOXES else None)
            return None
        if a in ("backup_on", "backup_off"):
            ep = self._client_endpoint(p)
            if ep is None or self.settings["client"].path_manager != "kernel":
                raise TestbedError(f"{a}: path {p.name!r} has no kernel path-manager endpoint "
                                   "on the client")
            mptcp_config.set_backup(self.client.pid, ep, a == "backup_on")
            self._set_fault(e.path, backup=a == "backup_on")
            return None
        raise TestbedError(f"unknown event action {a!r}")  # EventSpec lists every action

    def _client_endpoint(self, p: Path) -> mptcp_config.Endpoint | None:
        """The client's kernel-PM endpoint on path p as built (none on the default path)."""
        if p.name == self.topology.default.name or not (p.spec.client_endpoint or p.spec.backup):
            return None
        flags = (*p.spec.client_endpoint, *(("backup",) if p.spec.backup else ()))
        return mptcp_config.Endpoint(p.addr.client, p.client_if, flags, id=p.index)

    def _set_carrier(self, name: str, up: bool) -> None:
        """Link down/up: the client's interface of the path goes down (carrier
        lost). Raw rtnetlink on a socket kept open in the client's namespace,
        so a timed failure lands well within a millisecond of its schedule."""
        assert self._client_rtnl is not None, "testbed not started"
        p = self.path(name)
        idx = self._client_ifindex[p.client_if]
        self._client_rtnl.set_link(idx, up)
        if up:  # the kernel dropped the path's routes with the carrier
            self._client_rtnl.replace_default(p.addr.far, idx, p.addr.table)
            if p.name == self.topology.default.name:
                self._client_rtnl.replace_default(p.addr.far, idx)

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
            "paths": [{"name": p.name, "client_addr": p.addr.client, "far_addr": p.addr.far,
                       "client_if": p.client_if, "table": p.addr.table} for p in self.paths],
            "hosts": {role: {**mptcp_config.snapshot(node.pid),
                             "not_applied": self.not_applied.get(role, {})}
                      for role, node in (("client", self.client), ("server", self.server))},
            "congestion_control": {r: s.congestion_control for r, s in self.settings.items()},
        }


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


__all__ = ["Testbed", "Path", "wait_until"]
