"""The stack: attachment to a namespace, the packet loop, demultiplexing, and the API.

    with Stack(netns=pid) as st:
        conn = st.connect(("10.0.0.2", 5201), paths=["10.0.0.1", "10.1.0.1"])
        conn.send(b"..."); conn.close()

One thread per Stack runs poll() over the path ports, feeds packets to their
subflows, fires timers and sends ACKs; API calls from other threads take the
same lock and send directly. Every blocking call has a timeout.
"""
from __future__ import annotations

import ctypes
import logging
import os
import queue
import select
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from itertools import count

from testbed.stack import crypto, inactivity, rate_limit
from testbed.stack.attach import (CLIENT_PORTS, AttachError, Interface, NftGuard, PathPort, list_interfaces,
                                  netns_path, run_in_netns)
from testbed.stack.cc import CONTROLLERS
from testbed.stack.connection import Connection, ConnectionInfo, Event, StackError
from testbed.stack.options import RST_ADMIN, RST_MPTCP_ERROR, MpJoinSyn, MpTcpRst
from testbed.stack.esim import FLAG_ESIM
from testbed.stack.pm import PeerAddress, PmLimits
from testbed.stack.packet import ACK, RST, SYN, DecodeError, IpPacket, TcpSegment, decode_ipv4, encode_ipv4
from testbed.stack.scheduler import SCHEDULERS
from testbed.stack.subflow import MASK32, Subflow

log = logging.getLogger("testbed.stack")
_libc = ctypes.CDLL(None, use_errno=True)
_instances = count(1)

__all__ = ["Stack", "Listener", "Connection", "ConnectionInfo", "Event", "StackError", "AttachError",
           "SentSegment", "PmLimits", "PeerAddress"]


@dataclass(frozen=True)
class SentSegment:
    """What the stack meant to put on the wire (recorded for trace checks)."""
    time: float
    src: str
    dst: str
    segment: TcpSegment


def _check_choices(cc: str, scheduler: str) -> None:
    """Refuse an unknown congestion control or scheduler name before anything is attached or sent."""
    if cc not in CONTROLLERS and cc != "newreno":
        raise StackError(f"cc: unknown congestion control {cc!r} (one of {', '.join(CONTROLLERS)})")
    if scheduler not in SCHEDULERS:
        raise StackError(f"scheduler: unknown scheduler {scheduler!r} (one of {', '.join(SCHEDULERS)})")


class Listener:
    """A listening port of the stack; accept() returns established connections."""

    def __init__(self, stack: "Stack", port: int, backlog: int, checksum: bool, deny_join_initial: bool = False):
        self.stack = stack
        self.port = port
        self.backlog = backlog
        self.checksum = checksum
        self.deny_join_initial = deny_join_initial   # the C flag in its connections' SYN/ACKs
        self.ready: list[Connection] = []
        self.cond = threading.Condition(stack.lock)
        self.closed = False

    def accept(self, timeout: float = 30.0) -> Connection:
        """The next established connection; StackError on timeout."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.ready or self.closed, timeout):
                raise StackError(f"accept timed out after {timeout:g} s")
            if self.closed and not self.ready:
                raise StackError("listener closed")
            return self.ready.pop(0)

    def close(self) -> None:
        """Stop listening (established connections live on)."""
        with self.cond:
            if self.closed:
                return
            self.closed = True
            self.stack.listeners.pop(self.port, None)
            self.cond.notify_all()
        try:
            self.stack.nft.remove_port(self.port)
        except AttachError:
            pass


class Stack:
    """A user-space MPTCP endpoint attached to the path interfaces of one network namespace."""

    def __init__(self, netns: str | int | None = None, interfaces: list[str] | None = None, *,
                 checksum: bool = False, cc: str = "cubic", scheduler: str = "lowrtt", record: bool = False,
                 pm_limits: PmLimits | None = None, deny_join_initial: bool = False,
                 obfuscate_dsn: bool = False, external_keys: bool = False, esim: bool = False,
                 rate_limit_enforcement: str = "pacing", inactivity_s: int | None = None,
                 inactivity_bounds_s: tuple[int, int] = (0, 65535)):
        _check_choices(cc, scheduler)
        try:
            inactivity.check_policy(inactivity_s, inactivity_bounds_s)
        except ValueError as exc:
            raise StackError(str(exc)) from None
        # the inactivity-time option (stack/inactivity.py): our value (None: no ITO) and
        # the bounds within which a peer's value is adopted
        self.inactivity_s, self.inactivity_bounds_s = inactivity_s, tuple(inactivity_bounds_s)
        if rate_limit_enforcement not in rate_limit.MODES:
            raise ValueError(f"rate_limit_enforcement: {rate_limit_enforcement!r} is not one of "
                             f"{', '.join(rate_limit.MODES)}")
        self.rate_limit_enforcement = rate_limit_enforcement   # how a peer's SRL is enforced (stack/rate_limit.py)
        self.esim = esim   # listeners accept RobE_eSIM's MP_JOIN_CAP (stack/esim.py)
        self.esim_checks: Counter[str] = Counter()   # where each MP_JOIN_CAP check ended (esim.accept_as_join)
        # privacy extensions asked for / agreed to (stack/privacy.py)
        self.obfuscate_dsn, self.external_keys = obfuscate_dsn, external_keys
        self.pm_limits = pm_limits or PmLimits()     # how far ADD_ADDRs from peers are acted upon
        self.deny_join_initial = deny_join_initial   # listeners' default for the C flag
        # Test hooks emulating a middlebox inside the stack: each gets (subflow or None,
        # segment) and returns the segment to put on the wire / to process. What the
        # stack records as sent stays what it meant to send.
        self.tamper_tx = None
        self.tamper_rx = None
        self.netns = netns_path(netns)
        self.checksum = checksum
        self.cc = cc
        self.scheduler = scheduler      # the default for connections (connect() may choose another)
        self.lock = threading.RLock()
        self.t0 = time.monotonic()
        self.ts_offset = int.from_bytes(os.urandom(4), "big")
        self.subflows: dict[tuple[str, int, str, int], Subflow] = {}
        self.listeners: dict[int, Listener] = {}
        self.tokens: dict[int, Connection] = {}
        self.connections: set[Connection] = set()
        self.events: "queue.Queue[Event]" = queue.Queue()
        self.record = record
        self.sent: list[SentSegment] = []
        self.log_lines: list[str] = []
        self.stats = {"rx_packets": 0, "rx_bad": 0, "rx_stray": 0, "tx_packets": 0}
        self._ip_ident = 0
        self._next_port = CLIENT_PORTS[0]
        self._running = True
        self.ports: list[PathPort] = []
        self.nft: NftGuard | None = None
        self._route_sock: socket.socket | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        try:
            run_in_netns(self.netns, lambda: self._attach(interfaces))
        except BaseException:
            self._detach()
            raise
        self.by_addr = {p.iface.addr: p for p in self.ports}
        self._thread = threading.Thread(target=self._loop, name="mptcp-stack", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ attachment
    def _attach(self, names: list[str] | None) -> None:
        ifaces = list_interfaces()
        if names is not None:
            missing = sorted(set(names) - {i.name for i in ifaces})
            if missing:
                raise AttachError(f"no IPv4 interface {', '.join(missing)} in the namespace")
            ifaces = [i for i in ifaces if i.name in names]
        if not ifaces:
            raise AttachError("no IPv4 interface to attach to in the namespace")
        self.nft = NftGuard(f"mptb_stack_{os.getpid()}_{next(_instances)}")
        self.nft.add_addresses([i.addr for i in ifaces])
        for iface in ifaces:
            self.ports.append(PathPort(iface, [i.addr for i in ifaces]))
        self._route_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def _detach(self) -> None:
        for p in self.ports:
            p.close()
        self.ports = []
        if self._route_sock is not None:
            self._route_sock.close()
            self._route_sock = None
        if self.nft is not None:
            self.nft.close()
            self.nft = None
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    @property
    def interfaces(self) -> list[Interface]:
        """The path interfaces the stack attached to."""
        return [p.iface for p in self.ports]

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Abort every connection, stop the loop, remove the sockets and the nft table."""
        if not self._running:
            return
        with self.lock:
            for conn in list(self.connections):
                if conn.state != "CLOSED":
                    conn.abort()
            for lst in list(self.listeners.values()):
                lst.closed = True
                lst.cond.notify_all()
            self._running = False
        self.wake()
        self._thread.join(5)
        self._detach()

    # ------------------------------------------------------------------ hooks used by connections
    def ts_now(self) -> int:
        """TCP timestamp clock: milliseconds, random offset."""
        return (int((time.monotonic() - self.t0) * 1000) + self.ts_offset) & MASK32

    def transmit(self, sf: Subflow, seg: TcpSegment) -> None:
        """Encode and send a segment of a subflow on its path."""
        self._ip_ident = (self._ip_ident + 1) & 0xFFFF
        pkt = encode_ipv4(IpPacket(sf.laddr, sf.raddr, seg, ident=self._ip_ident))
        if self.record:
            self.sent.append(SentSegment(time.time(), sf.laddr, sf.raddr, seg))
        if self.tamper_tx is not None:
            wire = self.tamper_tx(sf, seg)
            if wire is None:
                return
            pkt = encode_ipv4(IpPacket(sf.laddr, sf.raddr, wire, ident=self._ip_ident))
        self.stats["tx_packets"] += 1
        sf.port.send(pkt, sf.raddr)

    def emit_event(self, ev: Event) -> None:
        """Publish a path-manager style event."""
        self.events.put(ev)

    def register_token(self, conn: Connection) -> None:
        """Make an established connection findable by its token (for MP_JOIN)."""
        self.tokens[conn.local_token] = conn

    def unregister(self, conn: Connection) -> None:
        """Forget a closed connection."""
        if self.tokens.get(conn.local_token) is conn:
            del self.tokens[conn.local_token]
        self.connections.discard(conn)

    def forget_subflow(self, sf: Subflow) -> None:
        """Stop demultiplexing to a closed subflow."""
        if self.subflows.get(sf.key) is sf:
            del self.subflows[sf.key]

    def listener_ready(self, conn: Connection) -> None:
        """A server connection got established: hand it to its listener's accept()."""
        for lst in self.listeners.values():
            if conn.accept_queue is lst.ready:
                lst.cond.notify_all()

    def log(self, msg: str) -> None:
        """Record a protocol-level incident (bad checksum, refused join, ...)."""
        self.log_lines.append(msg)
        log.info(msg)

    def wake(self) -> None:
        """Interrupt the loop's poll() (new data to send, a window to announce)."""
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    # ------------------------------------------------------------------ API
    def _alloc_port(self, laddr: str) -> int:
        lo, hi = CLIENT_PORTS
        used = {k[1] for k in self.subflows if k[0] == laddr}
        for _ in range(hi - lo + 1):
            port = self._next_port
            self._next_port = lo if port >= hi else port + 1
            if port not in used and port not in self.listeners:
                return port
        raise StackError("no free client port")

    def rescan(self) -> list[str]:
        """Re-read the namespace's interfaces: attach every IPv4 address that appeared since
        the stack started (a new interface, or a new primary address of one) and return the
        local addresses whose interface is up with a carrier (what a join can start from)."""
        with self.lock:
            if not self._running:
                raise StackError("stack is closed")
            ifaces = run_in_netns(self.netns, list_interfaces)
            for iface in ifaces:
                if iface.addr in self.by_addr:
                    continue
                port = run_in_netns(self.netns, lambda iface=iface: PathPort(iface, [iface.addr]))
                try:
                    self.nft.add_addresses([iface.addr])
                except AttachError:
                    port.close()
                    raise
                self.ports.append(port)
                self.by_addr[iface.addr] = port
                self.log(f"attached {iface.name} {iface.addr} (appeared after the stack started)")
            self.wake()
            return [i.addr for i in ifaces if i.running and i.addr in self.by_addr]

    def source_for(self, dst: str) -> str:
        """The local address the namespace's routing picks for dst."""
        try:
            # A connected UDP socket keeps the source address of its first route:
            # dissolve the association (connect to AF_UNSPEC) so each lookup is fresh.
            _libc.connect(self._route_sock.fileno(), bytes(16), 16)
            self._route_sock.connect((dst, 9))
            return self._route_sock.getsockname()[0]
        except OSError as exc:
            raise StackError(f"no route to {dst}: {exc.strerror}") from exc

    def open_subflow(self, conn: Connection, laddr: str, raddr: str, rport: int, *, join: bool,
                     backup: bool = False, addr_id: int = 0) -> Subflow:
        """Create a subflow from laddr and send its SYN (caller holds the lock)."""
        port = self.by_addr.get(laddr)
        if port is None:
            raise StackError(f"{laddr} is not an address of an attached interface")
        sf = Subflow(conn, port, laddr, self._alloc_port(laddr), raddr, rport, join=join, active=True,
                     backup=backup, addr_id=addr_id, cc=conn.cc)
        if join:
            sf.local_nonce = crypto.new_nonce()
        self.subflows[sf.key] = sf
        conn.subflows.append(sf)
        sf.send_syn()
        self.wake()
        return sf

    def connect(self, dest: tuple[str, int], paths: list[str] | None = None, *, timeout: float = 10.0,
                checksum: bool | None = None, cc: str | None = None, backup: list[str] | None = None,
                mptcp: bool = True, scheduler: str | None = None) -> Connection:
        """Open an MPTCP connection; paths are local addresses (first: initial subflow, rest: joins).
        mptcp=False opens plain TCP (no MP_CAPABLE in the SYN) over the first path."""
        conn = self.start_connect(dest, paths[0] if paths else None, checksum=checksum, cc=cc,
                                  mptcp=mptcp, scheduler=scheduler)
        conn.wait_established(timeout)
        for addr in (paths or [])[1:] if mptcp else []:
            try:
                conn.add_subflow(addr, backup=addr in (backup or []), timeout=timeout)
            except StackError as exc:
                # The connection works without this path; the failure is in the
                # event stream (sf_closed) and the log, like a kernel PM's join.
                self.log(f"join from {addr}: {exc}")
        return conn

    def start_connect(self, dest: tuple[str, int], path: str | None = None, *, checksum: bool | None = None,
                      cc: str | None = None, mptcp: bool = True, scheduler: str | None = None,
                      esim: bool = False) -> Connection:
        """Send the SYN from path (routing's choice when None) and return at once (non-blocking connect):
        the connection's `established` or `closed` event, or its state, tells how it ended.
        esim: the SYN asks for RobE_eSIM (ROBE_eSIM_EN; stack/esim.py)."""
        host, rport = dest
        try:
            raddr = socket.inet_ntoa(socket.inet_aton(host))
        except OSError:
            raise StackError(f"not an IPv4 address: {host!r}") from None
        if not self._running:
            raise StackError("stack is closed")
        _check_choices(cc or self.cc, scheduler or self.scheduler)
        with self.lock:
            first = path or self.source_for(raddr)
            conn = Connection(self, active=True, checksum=self.checksum if checksum is None else checksum,
                              cc=cc or self.cc, mptcp=mptcp, scheduler=scheduler or self.scheduler,
                              pm_limits=self.pm_limits, obfuscate_dsn=self.obfuscate_dsn,
                              external_keys=self.external_keys)
            self.connections.add(conn)
            if esim and mptcp:
                conn.privacy_wanted |= FLAG_ESIM
            self.open_subflow(conn, first, raddr, rport, join=False)
            self.emit_event(Event("created", conn.local_token, time.time(), conn.subflows[0].key))
        return conn

    def listen(self, port: int, backlog: int = 64, checksum: bool | None = None,
               deny_join_initial: bool | None = None) -> Listener:
        """Accept MPTCP (and plain TCP) connections on port, on every attached address.

        deny_join_initial sets the C flag (§3.1): peers may join only addresses announced with ADD_ADDR."""
        with self.lock:
            if port in self.listeners:
                raise StackError(f"port {port} is already listening")
            lst = Listener(self, port, backlog, self.checksum if checksum is None else checksum,
                           self.deny_join_initial if deny_join_initial is None else deny_join_initial)
            self.listeners[port] = lst
        self.nft.add_port(port)
        return lst

    def next_event(self, timeout: float = 5.0) -> Event | None:
        """The next event, or None after timeout."""
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        poller = select.poll()
        fds = {}
        for p in self.ports:
            poller.register(p.fileno(), select.POLLIN)
            fds[p.fileno()] = p
        poller.register(self._wake_r, select.POLLIN)
        while self._running:
            for p in self.ports[len(fds):]:   # attached by rescan() since
                poller.register(p.fileno(), select.POLLIN)
                fds[p.fileno()] = p
            timeout = self._next_deadline()
            try:
                ready = poller.poll(timeout)
            except InterruptedError:
                continue
            try:
                with self.lock:
                    if not self._running:
                        break
                    for fd, _ev in ready:
                        if fd == self._wake_r:
                            try:
                                os.read(self._wake_r, 4096)
                            except BlockingIOError:
                                pass
                            continue
                        self._drain(fds[fd])
                    self._after_batch()
            except Exception as exc:  # a bug must not silently kill the stack: log and go on
                log.exception("stack loop error")
                self.log(f"internal error: {exc!r}")

    def _drain(self, port: PathPort) -> None:
        for _ in range(512):
            got = port.receive()
            if got is None:
                return
            data, verify = got
            self.stats["rx_packets"] += 1
            try:
                pkt = decode_ipv4(data, verify_tcp_checksum=verify)
            except DecodeError:
                self.stats["rx_bad"] += 1
                continue
            self._dispatch(port, pkt)

    def _dispatch(self, port: PathPort, pkt: IpPacket) -> None:
        if self.tamper_rx is not None:
            pkt.tcp = self.tamper_rx(None, pkt.tcp)
            if pkt.tcp is None:
                return
        seg = pkt.tcp
        sf = self.subflows.get((pkt.dst, seg.dport, pkt.src, seg.sport))
        if sf is not None:
            sf.on_segment(seg)
            return
        lst = self.listeners.get(seg.dport)
        if lst is not None and seg.flags & SYN and not seg.flags & ACK and not lst.closed:
            self._passive_open(lst, port, pkt)
            return
        if lst is None and not (CLIENT_PORTS[0] <= seg.dport <= CLIENT_PORTS[1]):
            return  # not ours (a kernel socket's packet seen by the tap)
        self.stats["rx_stray"] += 1
        if not seg.flags & RST:
            # RFC 9293 §3.10.7.1: a segment for no connection gets a RST.
            if seg.flags & ACK:
                rst = TcpSegment(seg.dport, seg.sport, seg.ack, 0, RST, 0)
            else:
                rst = TcpSegment(seg.dport, seg.sport, 0, (seg.seq + seg.seg_len()) & MASK32, RST | ACK, 0)
            port.send(encode_ipv4(IpPacket(pkt.dst, pkt.src, rst)), pkt.src)

    def _passive_open(self, lst: Listener, port: PathPort, pkt: IpPacket) -> None:
        seg = pkt.tcp
        join = seg.option(MpJoinSyn)
        if join is not None:
            conn = self.tokens.get(join.token)
            refused = conn is None or conn.fallback or conn.state != "ESTABLISHED"
            if refused or not conn.accepts_join_to(pkt.dst, seg.dport):
                # §3.2: an unknown token is answered with a RST; so is a join to the
                # initial address and port after our SYN/ACK carried the C flag.
                rst = TcpSegment(seg.dport, seg.sport, 0, (seg.seq + 1) & MASK32, RST | ACK, 0,
                                 [MpTcpRst(RST_MPTCP_ERROR if refused else RST_ADMIN)])
                port.send(encode_ipv4(IpPacket(pkt.dst, pkt.src, rst)), pkt.src)
                return
            # The SYN/ACK carries our ID for the address joined; the peer's ID is the SYN's.
            sf = Subflow(conn, port, pkt.dst, seg.dport, pkt.src, seg.sport, join=True, active=False,
                         backup=join.backup, addr_id=conn.pm.local_id(pkt.dst), cc=conn.cc)
            sf.remote_addr_id = join.addr_id
            sf.remote_nonce = join.nonce
            sf.local_nonce = crypto.new_nonce()
        else:
            half_open = sum(1 for c in self.connections if c.accept_queue is lst.ready and c.state == "SYN_RCVD")
            if half_open + len(lst.ready) >= lst.backlog:
                return  # SYN queue full: drop, the peer retries
            conn = Connection(self, active=False, checksum=lst.checksum, cc=self.cc, scheduler=self.scheduler,
                              pm_limits=self.pm_limits, deny_join_initial=lst.deny_join_initial,
                              obfuscate_dsn=self.obfuscate_dsn, external_keys=self.external_keys)
            conn.accept_queue = lst.ready
            self.connections.add(conn)
            sf = Subflow(conn, port, pkt.dst, seg.dport, pkt.src, seg.sport, join=False, active=False, cc=conn.cc)
        sf.learn_syn(seg)
        if not join:
            conn.on_passive_syn(sf, seg)
            self.emit_event(Event("created", conn.local_token, time.time(), sf.key))
        self.subflows[sf.key] = sf
        conn.subflows.append(sf)
        sf.send_synack()

    def _after_batch(self) -> None:
        now = time.monotonic()
        for sf in list(self.subflows.values()):
            if sf.rto_deadline is not None and now >= sf.rto_deadline:
                sf.on_timer(now)
        for conn in list(self.connections):
            d = conn.deadline()
            if d is not None and now >= d:
                conn.on_timer(now)
            conn.push()
        for sf in list(self.subflows.values()):
            if sf.ack_pending:
                sf.send_ack()

    def _next_deadline(self) -> int:
        with self.lock:
            times = [sf.rto_deadline for sf in self.subflows.values() if sf.rto_deadline is not None]
            times += [d for d in (c.deadline() for c in self.connections) if d is not None]
        if not times:
            return 200
        return max(0, int((min(times) - time.monotonic()) * 1000) + 1)
