"""MPTCP path-manager generic netlink ("mptcp_pm"): event listener and the
userspace-PM commands (announce, remove, subflow create/destroy, set flags).

pyroute2 0.9 ships only the endpoint/limits commands, so we declare the message
layouts here as genlmsg subclasses. pyroute2 0.9 keeps per-thread state (event
loop, even a per-thread socket), and a netlink socket belongs to the namespace
of the thread that created it; so every socket here is created, used and closed
in one thread that has joined the target namespace first (run_in_netns for
commands; the listener's own reader thread for events).

Attribute numbering, checked against Documentation/netlink/specs/mptcp_pm.yaml
and the generated include/uapi/linux/mptcp_pm.h of Linux 6.18 (self-check in
`_check_numbering` below runs at import):
  commands  add-addr 1, del-addr 2, get-addr 3, flush-addrs 4, set-limits 5,
            get-limits 6, set-flags 7, announce 8, remove 9, subflow-create 10,
            subflow-destroy 11
  attr      addr 1 (nest), rcv-add-addrs 2, subflows 3, token 4 (u32),
            loc-id 5 (u8), addr-remote 6 (nest)
  address   family 1 (u16), id 2 (u8), addr4 3, addr6 4, port 5 (u16, host
            order), flags 6 (u32), if-idx 7 (s32)
  events    created 1, established 2, closed 3, announced 6, removed 7,
            sub-established 10, sub-closed 11, sub-priority 13,
            listener-created 15, listener-closed 16
  event attr token 1, family 2, loc-id 3, rem-id 4, saddr4 5, saddr6 6,
            daddr4 7, daddr6 8, sport 9 (be16), dport 10 (be16), backup 11,
            error 12, flags 13 (u16), timeout 14, if-idx 15, reset-reason 16,
            reset-flags 17, server-side 18
"""
from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar

from pyroute2.netlink import NLA_F_NESTED, NLM_F_ACK, NLM_F_REQUEST, genlmsg, nla
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import GenericNetlinkSocket

from testbed.base.errors import TestbedError
from testbed.base.netns import ns_path, run_in_netns, run_in_netns_file, setns_current_thread
from testbed.base.sockbuf import force_buffers

FAMILY = "mptcp_pm"
EVENTS_GROUP = "mptcp_pm_events"
NETLINK_GENERIC, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NETLINK_EXT_ACK = 16, 270, 1, 11
VERSION = 1

CMD = {"add_addr": 1, "del_addr": 2, "get_addr": 3, "flush_addrs": 4, "set_limits": 5,
       "get_limits": 6, "set_flags": 7, "announce": 8, "remove": 9,
       "subflow_create": 10, "subflow_destroy": 11}
EVENTS = {1: "created", 2: "established", 3: "closed", 6: "announced", 7: "removed",
          10: "sub_established", 11: "sub_closed", 13: "sub_priority",
          15: "listener_created", 16: "listener_closed"}
ADDR_FLAGS = {"signal": 1, "subflow": 2, "backup": 4, "fullmesh": 8, "implicit": 16}
T = TypeVar("T")
# Where a command runs: a process's namespace (pid), one named by a file, or
# None for the calling thread's own.
Namespace = int | str | None


class pm_cmd_msg(genlmsg):
    """Command messages (MPTCP_PM_ATTR_* space)."""

    prefix = "MPTCP_PM_ATTR_"
    nla_map = (
        ("MPTCP_PM_ATTR_UNSPEC", "none"),
        ("MPTCP_PM_ATTR_ADDR", "pm_addr"),
        ("MPTCP_PM_ATTR_RCV_ADD_ADDRS", "uint32"),
        ("MPTCP_PM_ATTR_SUBFLOWS", "uint32"),
        ("MPTCP_PM_ATTR_TOKEN", "uint32"),
        ("MPTCP_PM_ATTR_LOC_ID", "uint8"),
        ("MPTCP_PM_ATTR_ADDR_REMOTE", "pm_addr"),
    )

    class pm_addr(nla):
        # Nested attributes must carry NLA_F_NESTED: kernels that validate the
        # userspace-PM commands strictly (6.1 does) refuse them otherwise with
        # EINVAL "NLA_F_NESTED is missing"; newer ones accept either.
        nla_flags = NLA_F_NESTED
        prefix = "MPTCP_PM_ADDR_ATTR_"
        nla_map = (
            ("MPTCP_PM_ADDR_ATTR_UNSPEC", "none"),
            ("MPTCP_PM_ADDR_ATTR_FAMILY", "uint16"),
            ("MPTCP_PM_ADDR_ATTR_ID", "uint8"),
            ("MPTCP_PM_ADDR_ATTR_ADDR4", "ip4addr"),
            ("MPTCP_PM_ADDR_ATTR_ADDR6", "ip6addr"),
            ("MPTCP_PM_ADDR_ATTR_PORT", "uint16"),
            ("MPTCP_PM_ADDR_ATTR_FLAGS", "uint32"),
            ("MPTCP_PM_ADDR_ATTR_IF_IDX", "int32"),
        )


class pm_event_msg(genlmsg):
    """Multicast events (enum mptcp_event_attr space); cmd = event type."""

    prefix = "MPTCP_ATTR_"
    nla_map = (
        ("MPTCP_ATTR_UNSPEC", "none"),
        ("MPTCP_ATTR_TOKEN", "uint32"),
        ("MPTCP_ATTR_FAMILY", "uint16"),
        ("MPTCP_ATTR_LOC_ID", "uint8"),
        ("MPTCP_ATTR_REM_ID", "uint8"),
        ("MPTCP_ATTR_SADDR4", "ip4addr"),
        ("MPTCP_ATTR_SADDR6", "ip6addr"),
        ("MPTCP_ATTR_DADDR4", "ip4addr"),
        ("MPTCP_ATTR_DADDR6", "ip6addr"),
        ("MPTCP_ATTR_SPORT", "be16"),
        ("MPTCP_ATTR_DPORT", "be16"),
        ("MPTCP_ATTR_BACKUP", "uint8"),
        ("MPTCP_ATTR_ERROR", "uint8"),
        ("MPTCP_ATTR_FLAGS", "uint16"),
        ("MPTCP_ATTR_TIMEOUT", "uint32"),
        ("MPTCP_ATTR_IF_IDX", "int32"),
        ("MPTCP_ATTR_RESET_REASON", "uint32"),
        ("MPTCP_ATTR_RESET_FLAGS", "uint32"),
        ("MPTCP_ATTR_SERVER_SIDE", "uint8"),
    )


def _check_numbering() -> None:
    """Pure-python self-check: our tables against the numbers read in the spec."""
    ev = {n: i for i, (n, _) in enumerate(pm_event_msg.nla_map)}
    assert (ev["MPTCP_ATTR_TOKEN"], ev["MPTCP_ATTR_SADDR4"], ev["MPTCP_ATTR_SPORT"],
            ev["MPTCP_ATTR_IF_IDX"], ev["MPTCP_ATTR_SERVER_SIDE"]) == (1, 5, 9, 15, 18)
    at = {n: i for i, (n, _) in enumerate(pm_cmd_msg.nla_map)}
    assert (at["MPTCP_PM_ATTR_TOKEN"], at["MPTCP_PM_ATTR_LOC_ID"],
            at["MPTCP_PM_ATTR_ADDR_REMOTE"]) == (4, 5, 6)
    ad = {n: i for i, (n, _) in enumerate(pm_cmd_msg.pm_addr.nla_map)}
    assert (ad["MPTCP_PM_ADDR_ATTR_ADDR4"], ad["MPTCP_PM_ADDR_ATTR_PORT"],
            ad["MPTCP_PM_ADDR_ATTR_IF_IDX"]) == (3, 5, 7)
    assert (CMD["set_flags"], CMD["announce"], CMD["subflow_create"]) == (7, 8, 10)
    assert EVENTS[10] == "sub_established" and EVENTS[15] == "listener_created"


_check_numbering()


class PMError(TestbedError):
    """A path-manager command the kernel refused; `errno` is the kernel's code."""

    def __init__(self, command: str, errno_: int, hint: str = ""):
        self.command, self.errno = command, errno_
        name = {107: "ENOTCONN", 22: "EINVAL", 2: "ENOENT", 17: "EEXIST",
                95: "EOPNOTSUPP", 1: "EPERM", 99: "EADDRNOTAVAIL"}.get(errno_, "")
        msg = f"mptcp_pm {command} failed: errno {errno_}{' ' + name if name else ''}"
        super().__init__(msg + (f" ({hint})" if hint else ""))


_HINTS = {107: "connection not fully established yet: wait for the 'established' event",
          22: "bad arguments, or the namespace does not use path_manager=userspace",
          2: "unknown token or subflow"}


# ---- events --------------------------------------------------------------------
@dataclass
class PMEvent:
    """One path-manager event: when it arrived, its type, token and attributes."""
    t_ns: int  # time.monotonic_ns() when the reader thread received it
    type: str
    token: int | None
    attrs: dict[str, Any] = field(default_factory=dict)  # remaining attributes, lower case


def decode_event(msg: pm_event_msg, t_ns: int) -> PMEvent:
    """A PMEvent from a decoded netlink message."""
    attrs: dict[str, Any] = {}
    for name, value in msg["attrs"]:
        attrs[name[len("MPTCP_ATTR_"):].lower()] = value
    token = attrs.pop("token", None)
    return PMEvent(t_ns, EVENTS.get(msg["cmd"], f"event{msg['cmd']}"), token, attrs)


def _parse(data: bytes, family_id: int, t_ns: int) -> list[PMEvent]:
    """Split a netlink datagram into messages and decode the mptcp_pm ones."""
    out, off = [], 0
    while off + 16 <= len(data):
        length, mtype = struct.unpack_from("=IH", data, off)
        if length < 16:
            break
        if mtype == family_id:
            msg = pm_event_msg(data[off:off + length])
            msg.decode()
            out.append(decode_event(msg, t_ns))
        off += (length + 3) & ~3
    return out


class PMEventListener:
    """Collect MPTCP PM events of one namespace (by pid, or a file naming it),
    timestamped on arrival.

        with PMEventListener(tb.client.pid) as lst: ...; lst.events()
    """

    def __init__(self, pid: int | str, poll_s: float = 0.05):
        self.pid, self.poll_s = pid, poll_s
        self._events: list[PMEvent] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "PMEventListener":
        """Start listening; TestbedError if the listener cannot join the namespace."""
        self._thread = threading.Thread(target=self._run, name=f"pm-events-{self.pid}", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise TestbedError(f"PM event listener in pid {self.pid}: {self._error}")
        return self

    def _run(self) -> None:
        try:
            setns_current_thread(ns_path(self.pid) if isinstance(self.pid, int) else self.pid)
            # pyroute2 resolves the family and group ids; the events are then read
            # from a plain netlink socket: pyroute2's get() may keep already-read
            # messages in its own queue, where poll() cannot see them, so events
            # would surface late (measured: seconds, or never for the last one).
            with GenericNetlinkSocket() as gs:
                gs.bind(FAMILY, pm_event_msg)
                family_id, group = gs.prid, gs.mcast_groups[EVENTS_GROUP]
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
            force_buffers(sock, rcvbuf=4 << 20)  # a burst of events must not overflow it
            sock.bind((0, 0))
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            # poll(), not select(): a long sweep in one process may hold
            # descriptors above select()'s limit of 1024.
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            while not self._stop.is_set():
                # Wait with a timeout so stop() is noticed within poll_s.
                if not poller.poll(self.poll_s * 1000):
                    continue
                data = sock.recv(1 << 16)
                t = time.monotonic_ns()
                for ev in _parse(data, family_id, t):
                    with self._lock:
                        self._events.append(ev)
        except BaseException as exc:
            self._error = exc
        finally:
            sock.close()

    def stop(self) -> None:
        """Stop listening (within poll_s)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def alive(self) -> bool:
        """Still receiving events (started, not stopped, no socket error)."""
        return self._thread is not None and self._thread.is_alive()

    def events(self) -> list[PMEvent]:
        """The events received so far."""
        with self._lock:
            return list(self._events)

    def wait_for(self, type_: str, timeout: float, token: int | None = None) -> PMEvent | None:
        """First event of that type (and token) seen so far, waiting up to timeout."""
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events():
                if ev.type == type_ and (token is None or ev.token == token):
                    return ev
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.005)

    def __enter__(self) -> "PMEventListener":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- userspace PM commands -----------------------------------------------------
def _addr(addr: str, id: int | None = None, port: int | None = None, flags: int | None = None,
          if_idx: int | None = None) -> dict:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    attrs: list[tuple[str, Any]] = [("MPTCP_PM_ADDR_ATTR_FAMILY", family),
                                    ("MPTCP_PM_ADDR_ATTR_ADDR6" if family == socket.AF_INET6
                                     else "MPTCP_PM_ADDR_ATTR_ADDR4", addr)]
    if id is not None:
        attrs.append(("MPTCP_PM_ADDR_ATTR_ID", id))
    if port is not None:
        attrs.append(("MPTCP_PM_ADDR_ATTR_PORT", port))
    if flags is not None:
        attrs.append(("MPTCP_PM_ADDR_ATTR_FLAGS", flags))
    if if_idx is not None:
        attrs.append(("MPTCP_PM_ADDR_ATTR_IF_IDX", if_idx))
    return {"attrs": attrs}


def _in_ns(ns: Namespace, fn: Callable[[], T]) -> T:
    if ns is None:
        return fn()
    return run_in_netns(ns, fn) if isinstance(ns, int) else run_in_netns_file(ns, fn)


def _request(ns: Namespace, command: str, attrs: list[tuple[str, Any]]) -> None:
    msg = pm_cmd_msg()
    msg["cmd"] = CMD[command]
    msg["version"] = VERSION
    msg["attrs"] = attrs

    def send() -> None:
        with GenericNetlinkSocket() as sock:
            try:  # ask for the kernel's reason with an error (extended ack)
                sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
            except OSError:
                pass
            sock.bind(FAMILY, pm_cmd_msg)
            tuple(sock.nlm_request(msg, msg_type=sock.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK))

    try:
        _in_ns(ns, send)
    except NetlinkError as exc:
        # The kernel's extended-ack text, when it sent one, names the problem.
        said = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], str) else ""
        hint = "; ".join(h for h in (f"kernel: {said}" if said and said != os.strerror(exc.code) else "",
                                     _HINTS.get(exc.code, "")) if h)
        raise PMError(command, exc.code, hint) from None


# ---- in-kernel PM endpoints ----------------------------------------------------
@dataclass(frozen=True)
class Endpoint:
    """An in-kernel path-manager endpoint: a local address (and optionally its
    interface) the kernel PM may use, with its id and flags (ADDR_FLAGS names)."""

    addr: str
    ifname: str | None
    flags: tuple[str, ...]
    id: int


def flag_bits(flags: Iterable[str]) -> int:
    """ADDR_FLAGS names -> the kernel's flag bits."""
    bits = 0
    for f in flags:
        bits |= ADDR_FLAGS[f]
    return bits


def flag_names(bits: int) -> tuple[str, ...]:
    """The kernel's flag bits -> ADDR_FLAGS names."""
    return tuple(n for n, b in ADDR_FLAGS.items() if bits & b)


def add_endpoints(ns: Namespace, endpoints: Iterable[Endpoint]) -> None:
    """Add in-kernel PM endpoints in the namespace `ns` (pyroute2's MPTCP API)."""
    from pyroute2 import MPTCP, IPRoute

    def apply() -> None:
        with IPRoute() as ipr, MPTCP() as m:
            for ep in endpoints:
                kw = {}
                idx = ipr.link_lookup(ifname=ep.ifname) if ep.ifname else []
                if idx:  # pyroute2 encodes IF_IDX as raw bytes ("hex"), hence the packing
                    kw["if_idx"] = idx[0].to_bytes(4, "little", signed=True)
                m.endpoint("add", addr=ep.addr, id=ep.id, flags=flag_bits(ep.flags), **kw)

    _in_ns(ns, apply)


def delete_endpoint(ns: Namespace, id: int) -> None:
    """Delete the in-kernel PM endpoint with this id in the namespace `ns`."""
    from pyroute2 import MPTCP

    def apply() -> None:
        with MPTCP() as m:
            m.endpoint("del", id=id)

    _in_ns(ns, apply)


def endpoints(ns: Namespace) -> list[Endpoint]:
    """The in-kernel PM endpoints of the namespace `ns` (ifname is not reported: None)."""
    from pyroute2 import MPTCP

    def show() -> list[Endpoint]:
        with MPTCP() as m:
            out = []
            for e in m.endpoint("show"):
                a = dict(e.get_attr("MPTCP_PM_ATTR_ADDR")["attrs"])
                out.append(Endpoint(a.get("MPTCP_PM_ADDR_ATTR_ADDR4") or a.get("MPTCP_PM_ADDR_ATTR_ADDR6"),
                                    None, flag_names(a.get("MPTCP_PM_ADDR_ATTR_FLAGS", 0)),
                                    a.get("MPTCP_PM_ADDR_ATTR_ID")))
            return out

    return _in_ns(ns, show)


def set_endpoint_flags(ns: Namespace, addr: str, id: int, flags: int) -> None:
    """In-kernel PM: give endpoint `id` (address `addr`) of the namespace `ns`
    these flags (ADDR_FLAGS bits). The kernel changes only backup and fullmesh,
    so pass the endpoint's other flags unchanged; a backup change sends MP_PRIO
    on every subflow from the endpoint. (pyroute2 has no set-flags command: our
    own message layout, sent the same way.)"""
    _request(ns, "set_flags", [("MPTCP_PM_ATTR_ADDR", _addr(addr, id=id, flags=flags))])


class UserspacePM:
    """Userspace path-manager commands for the namespace of `pid` (a host whose
    net.mptcp.path_manager is "userspace"). Each call is one netlink request;
    a refusal raises PMError with the kernel's errno."""

    def __init__(self, pid: int):
        self.pid = pid

    def subflow_create(self, token: int, local_addr: str, local_id: int, remote_addr: str,
                       remote_port: int, if_idx: int | None = None) -> None:
        """Open a subflow of the connection from a local address to a remote one."""
        self._check_token(token)
        _request(self.pid, "subflow_create", [
            ("MPTCP_PM_ATTR_TOKEN", token),
            ("MPTCP_PM_ATTR_ADDR", _addr(local_addr, id=local_id, if_idx=if_idx)),
            ("MPTCP_PM_ATTR_ADDR_REMOTE", _addr(remote_addr, port=remote_port)),
        ])

    def subflow_destroy(self, token: int, local_addr: str, local_port: int,
                        remote_addr: str, remote_port: int) -> None:
        """Close the subflow with exactly these four tuple values (RST + MP_RST-less close)."""
        self._check_token(token)
        _request(self.pid, "subflow_destroy", [
            ("MPTCP_PM_ATTR_TOKEN", token),
            ("MPTCP_PM_ATTR_ADDR", _addr(local_addr, port=local_port)),
            ("MPTCP_PM_ATTR_ADDR_REMOTE", _addr(remote_addr, port=remote_port)),
        ])

    def announce(self, token: int, addr: str, id: int, port: int | None = None,
                 if_idx: int | None = None) -> None:
        """Send ADD_ADDR for a local address with this id on the connection."""
        self._check_token(token)
        _request(self.pid, "announce", [
            ("MPTCP_PM_ATTR_TOKEN", token),
            ("MPTCP_PM_ATTR_ADDR", _addr(addr, id=id, port=port, flags=ADDR_FLAGS["signal"],
                                         if_idx=if_idx)),
        ])

    def remove(self, token: int, local_id: int) -> None:
        """Send RM_ADDR for a previously announced local id."""
        self._check_token(token)
        _request(self.pid, "remove", [("MPTCP_PM_ATTR_TOKEN", token),
                                      ("MPTCP_PM_ATTR_LOC_ID", local_id)])

    def set_flags(self, token: int, local_addr: str, local_port: int, remote_addr: str,
                  remote_port: int, backup: bool) -> None:
        """Mark one subflow backup / not backup: the kernel sends MP_PRIO."""
        self._check_token(token)
        _request(self.pid, "set_flags", [
            ("MPTCP_PM_ATTR_TOKEN", token),
            ("MPTCP_PM_ATTR_ADDR", _addr(local_addr, port=local_port,
                                         flags=ADDR_FLAGS["backup"] if backup else 0)),
            ("MPTCP_PM_ATTR_ADDR_REMOTE", _addr(remote_addr, port=remote_port)),
        ])

    @staticmethod
    def _check_token(token: int) -> None:
        if not isinstance(token, int) or not 0 < token < 2 ** 32:
            raise TestbedError(f"mptcp_pm: token must be a non-zero u32, got {token!r}")


__all__ = ["PMEvent", "PMEventListener", "UserspacePM", "PMError", "decode_event", "Endpoint",
           "add_endpoints", "delete_endpoint", "endpoints", "set_endpoint_flags", "flag_bits", "flag_names",
           "pm_cmd_msg", "pm_event_msg", "EVENTS", "CMD"]
