"""Socket-level building blocks shared by every strategy.

Everything here works on ordinary kernel sockets: MPTCP (IPPROTO_MPTCP) or
plain TCP, bound to one path's source address (and device), connected
non-blockingly so that a strategy can run several attempts at once and decide
from userspace which one survives.
"""
from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

from testbed.mptcp import sockopt


@dataclass(frozen=True)
class LocalPath:
    """A local path a connection attempt can start from: a name, the source
    address that selects it (policy routing: one table per source address) and
    optionally its interface."""

    name: str
    local_addr: str
    ifname: str | None = None
    default: bool = False  # holds the default route


def new_socket(path: LocalPath | None, mptcp: bool = True, cc: str | None = None,
               bind_device: bool = True) -> socket.socket:
    """A non-blocking stream socket bound to `path` (any address when None)."""
    proto = sockopt.IPPROTO_MPTCP if mptcp else socket.IPPROTO_TCP
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
    try:
        if cc:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
        if path is not None:
            # The source address alone picks the path through policy routing;
            # the device binding also holds when routing is not set up per
            # source (a user's laptop), at the price of needing privileges.
            if bind_device and path.ifname:
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, path.ifname.encode())
                except PermissionError:
                    pass
            s.bind((path.local_addr, 0))
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def start_connect(s: socket.socket, dest: tuple[str, int]) -> None:
    """Send the SYN now; completion is signalled by writability."""
    err = s.connect_ex(dest)
    if err not in (0, errno.EINPROGRESS):
        raise OSError(err, f"connect {dest[0]}:{dest[1]}: {errno.errorcode.get(err, err)}")


def connect_result(s: socket.socket) -> int:
    """0 when the handshake completed, else the errno it failed with."""
    return s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


def is_established(s: socket.socket) -> bool:
    """True when the SYN/ACK arrived (TCP state ESTABLISHED) — also for
    attempts that we are about to abort, so we know a RST goes on the wire."""
    try:
        s.getpeername()
        return True
    except OSError:
        return False


def abort(s: socket.socket) -> bool:
    """Close with SO_LINGER {1, 0}: an established attempt is reset (MPTCP:
    MP_FASTCLOSE + RST), never closed with a FIN. Returns True when a RST was
    sent by this close.

    A socket still in SYN_SENT sends nothing when closed (Linux resets only
    synchronized states); the server has at most a half-open request then,
    and its SYN/ACK — should one still come — finds no socket here and is
    answered with a RST by the kernel. Either way every attempt the server
    knows about ends with a RST."""
    established = is_established(s)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    s.close()
    return established


def mptcp_token(s: socket.socket) -> int | None:
    """The local MPTCP connection token; None for a plain TCP socket or a
    connection that fell back to TCP."""
    try:
        info = sockopt.mptcp_info(s)
    except OSError:
        return None
    return None if info.fallback or not info.token else info.token
