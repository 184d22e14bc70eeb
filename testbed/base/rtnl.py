"""Hand-packed rtnetlink requests for the hot path of timed link changes.

Carrier down/up, restoring a default route (here) and HTB rate changes (the
user-space backend's RawTc, built on RawRtnl) must land within a millisecond
of their schedule; through pyroute2 each takes ~0.5-1 ms of Python work, as
raw messages on a plain netlink socket ~0.03-0.1 ms plus the kernel's own
work. Everything else goes through pyroute2. The socket is created inside the
target namespace (a plain socket stays there, whichever thread uses it).
"""
from __future__ import annotations

import os
import socket
import struct
import threading

from testbed.base.netns import run_in_netns

RTM_NEWLINK, RTM_NEWROUTE, NLMSG_ERROR = 16, 24, 2
F_REQUEST, F_ACK, F_REPLACE, F_CREATE = 0x1, 0x4, 0x100, 0x400
IFF_UP = 0x1
RTA_OIF, RTA_GATEWAY, RTA_TABLE = 4, 5, 15
RT_TABLE_MAIN, RTPROT_STATIC, RTN_UNICAST = 254, 4, 1


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    n = 4 + len(payload)
    return struct.pack("HH", n, kind) + payload + b"\0" * ((4 - n % 4) % 4)


class RawRtnl:
    """A raw NETLINK_ROUTE socket opened in one namespace: hand-packed requests, one ack each."""
    def __init__(self, pid: int):
        def make() -> socket.socket:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
            s.bind((0, 0))
            s.settimeout(2)
            return s

        self.sock = run_in_netns(pid, make)
        self.seq = 0
        self.lock = threading.Lock()  # timed events and direct calls share the socket

    def request(self, msg_type: int, flags: int, body: bytes) -> None:
        """Send one request and wait for the kernel's acknowledgement; OSError on a refusal."""
        with self.lock:
            self.seq += 1
            header = struct.pack("IHHII", 16 + len(body), msg_type, flags | F_REQUEST | F_ACK,
                                 self.seq, 0)
            self.sock.send(header + body)
            while True:
                data = self.sock.recv(65536)
                _n, typ, _f, seq, _pid = struct.unpack_from("IHHII", data)
                if typ == NLMSG_ERROR and seq == self.seq:
                    (err,) = struct.unpack_from("i", data, 16)
                    if err:
                        raise OSError(-err, os.strerror(-err))
                    return

    def set_link(self, ifindex: int, up: bool) -> None:
        """Set an interface's carrier state (IFF_UP) up or down."""
        # ifinfomsg: family, pad, type, index, flags, change mask
        body = struct.pack("BxHiII", 0, 0, ifindex, IFF_UP if up else 0, IFF_UP)
        self.request(RTM_NEWLINK, 0, body)

    def replace_default(self, gateway: str, oif: int, table: int = RT_TABLE_MAIN) -> None:
        """ip route replace default via GATEWAY dev OIF table TABLE proto static."""
        # rtmsg: family, dst_len, src_len, tos, table (252 = see RTA_TABLE), protocol, scope, type, flags
        rtm = struct.pack("BBBBBBBBI", socket.AF_INET, 0, 0, 0, table if table < 256 else 252,
                          RTPROT_STATIC, 0, RTN_UNICAST, 0)
        body = (rtm + attr(RTA_GATEWAY, socket.inet_aton(gateway))
                + attr(RTA_OIF, struct.pack("i", oif)) + attr(RTA_TABLE, struct.pack("I", table)))
        self.request(RTM_NEWROUTE, F_CREATE | F_REPLACE, body)

    def close(self) -> None:
        """Close the netlink socket."""
        self.sock.close()
