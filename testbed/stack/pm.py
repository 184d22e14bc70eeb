"""The user-space stack's path manager: address IDs, ADD_ADDR and REMOVE_ADDR both ways (RFC 8684 §3.4).

One PathManager per connection. It numbers the connection's local addresses
(the initial subflow's is ID 0), announces them (ADD_ADDR with the truncated
HMAC, repeated until the peer echoes it) and withdraws them (REMOVE_ADDR, then
a RST on their subflows); it checks the HMAC of the peer's announcements,
echoes them, joins them under two limits modelled on the kernel's in-kernel
path manager (`subflows`: additional subflows; `add_addr_accepted`: peer
announcements acted upon), and resets the subflows of an address the peer
removed. All methods run under the stack's lock.
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from testbed.stack import crypto
from testbed.stack.options import RST_UNSPECIFIED, AddAddr, RemoveAddr
from testbed.stack.subflow import State

if TYPE_CHECKING:  # pragma: no cover
    from testbed.stack.connection import Connection

# Unechoed ADD_ADDRs are repeated: first after ANNOUNCE_RTO, then doubling.
ANNOUNCE_RTO = 0.5
ANNOUNCE_TRIES = 4
PM_LIMIT_MAX = 8            # the kernel's MPTCP_PM_ADDR_MAX, the bound of both limits


@dataclass(frozen=True)
class PmLimits:
    """How far the stack acts on the peer's announcements (the kernel's `ip mptcp limits`).

    subflows: additional subflows (joins) a connection may have; add_addr_accepted:
    peer ADD_ADDRs that may lead to a join. The defaults are the kernel's (2, 0):
    announcements are echoed but not joined unless add_addr_accepted is raised.
    """
    subflows: int = 2
    add_addr_accepted: int = 0

    def __post_init__(self) -> None:
        for name in ("subflows", "add_addr_accepted"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= PM_LIMIT_MAX:
                raise ValueError(f"pm limit {name} must be an integer in 0..{PM_LIMIT_MAX}, got {value!r}")


@dataclass(frozen=True)
class PeerAddress:
    """An address the peer announced with ADD_ADDR (port None: the connection's port)."""
    addr_id: int
    addr: str
    port: int | None


@dataclass
class Announcement:
    """One of our ADD_ADDRs and its echo state."""
    option: AddAddr
    tries: int
    deadline: float | None
    echoed: bool = False


class PathManager:
    """Address bookkeeping and ADD_ADDR/REMOVE_ADDR handling of one connection."""

    def __init__(self, conn: "Connection", limits: PmLimits):
        self.conn = conn
        self.limits = limits
        self.initial_addr: str | None = None        # local address of the initial subflow (ID 0)
        self.initial_local: tuple[str, int] | None = None
        self.initial_remote: tuple[str, int] | None = None
        self.local_ids: dict[str, int] = {}
        self._next_id = 1
        self.announced: dict[int, Announcement] = {}
        self.peer_addrs: dict[int, PeerAddress] = {}
        self.accepted = 0                           # peer announcements that led to a join
        self.bad_hmac = 0                           # peer announcements dropped for their HMAC

    # ------------------------------------------------------------------ local addresses
    def set_initial(self, sf) -> None:
        """Remember the initial subflow's addresses: ID 0 on both sides."""
        self.initial_addr = sf.laddr
        self.initial_local = (sf.laddr, sf.lport)
        self.initial_remote = (sf.raddr, sf.rport)
        sf.remote_addr_id = 0

    def local_id(self, addr: str) -> int:
        """The address ID of a local address: 0 for the initial subflow's, others numbered on first use."""
        if addr == self.initial_addr:
            return 0
        if addr not in self.local_ids:
            self.local_ids[addr] = self._next_id
            self._next_id += 1
        return self.local_ids[addr]

    def announce(self, addr: str, port: int | None = None) -> int:
        """Send ADD_ADDR for a local address (and optional port); returns its address ID."""
        conn = self.conn
        if addr == self.initial_addr:
            raise ValueError(f"{addr} is the initial subflow's address (ID 0): the peer knows it")
        packed = socket.inet_aton(addr)
        addr_id = self.local_id(addr)
        mac = crypto.add_addr_hmac(conn.local_key, conn.remote_key, addr_id, packed, port)
        ann = Announcement(AddAddr(addr_id, addr, port, mac), 1, time.monotonic() + ANNOUNCE_RTO)
        self.announced[addr_id] = ann
        self._signal(ann.option)
        return addr_id

    def withdraw(self, addr_id: int) -> None:
        """Send REMOVE_ADDR for one of our address IDs and reset the subflows using it (§3.4.2)."""
        self.announced.pop(addr_id, None)
        self._signal(RemoveAddr((addr_id,)))
        for sf in [s for s in self.conn.subflows if s.addr_id == addr_id]:
            self.conn.close_subflow(sf, RST_UNSPECIFIED, f"address ID {addr_id} withdrawn")

    def _signal(self, opt) -> None:
        # A pure ACK that carries only the signal (as the kernel does: the DATA_ACK
        # rides on the next ordinary ACK), on the first subflow able to carry it.
        for sf in self.conn.subflows:
            if sf.fully_established and sf.state in (State.ESTABLISHED, State.CLOSE_WAIT):
                sf.send_ack([opt])
                return

    # ------------------------------------------------------------------ the peer's signals
    def on_add_addr(self, sf, opt: AddAddr) -> None:
        """A received ADD_ADDR: an echo of ours, or the peer's announcement (checked, echoed, maybe joined)."""
        conn = self.conn
        if opt.echo:
            ann = self.announced.get(opt.addr_id)
            if ann is not None and ann.option.addr == opt.addr:
                ann.echoed, ann.deadline = True, None
            return
        expected = crypto.add_addr_hmac(conn.remote_key, conn.local_key, opt.addr_id,
                                        socket.inet_aton(opt.addr), opt.port)
        if opt.hmac64 != expected:
            # §3.4.1: an ADD_ADDR that fails authentication is silently ignored.
            self.bad_hmac += 1
            conn.stack.log(f"ADD_ADDR {opt.addr} id {opt.addr_id} with a bad HMAC ignored")
            return
        sf.send_ack([AddAddr(opt.addr_id, opt.addr, opt.port, echo=True)])
        peer = PeerAddress(opt.addr_id, opt.addr, opt.port)
        known = self.peer_addrs.get(opt.addr_id) == peer
        self.peer_addrs[opt.addr_id] = peer
        if not known:
            conn.emit("announced", reason=f"{opt.addr_id} {opt.addr}" + (f":{opt.port}" if opt.port else ""))
            self._maybe_join(peer)

    def _maybe_join(self, peer: PeerAddress) -> None:
        conn = self.conn
        joins = sum(1 for s in conn.subflows if s.join)
        if self.accepted >= self.limits.add_addr_accepted or joins >= self.limits.subflows:
            conn.stack.log(f"ADD_ADDR {peer.addr} not joined: limits {self.limits}")
            return
        port = peer.port or conn.remote_port()
        if any(s.raddr == peer.addr and s.rport == port for s in conn.subflows):
            return
        self.accepted += 1
        conn.open_join_to(peer.addr, port, peer.addr_id)

    def on_remove_addr(self, opt: RemoveAddr) -> None:
        """A received REMOVE_ADDR: forget the addresses and reset the subflows using them."""
        for addr_id in opt.addr_ids:
            self.peer_addrs.pop(addr_id, None)
            self.conn.emit("removed", reason=str(addr_id))
            for sf in [s for s in self.conn.subflows if s.remote_addr_id == addr_id]:
                self.conn.close_subflow(sf, RST_UNSPECIFIED, f"address ID {addr_id} removed by the peer")

    # ------------------------------------------------------------------ timers
    def deadline(self) -> float | None:
        """When the next unechoed ADD_ADDR is due again."""
        due = [a.deadline for a in self.announced.values() if a.deadline is not None]
        return min(due) if due else None

    def on_timer(self, now: float) -> None:
        """Repeat ADD_ADDRs the peer has not echoed (up to ANNOUNCE_TRIES sends)."""
        for ann in self.announced.values():
            if ann.deadline is None or now < ann.deadline:
                continue
            if ann.tries >= ANNOUNCE_TRIES:
                ann.deadline = None
                self.conn.stack.log(f"ADD_ADDR {ann.option.addr} never echoed after {ann.tries} sends")
                continue
            ann.tries += 1
            ann.deadline = now + ANNOUNCE_RTO * (2 ** (ann.tries - 1))
            self._signal(ann.option)
