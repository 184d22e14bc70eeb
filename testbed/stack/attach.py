"""Getting packets in and out of a network namespace without the kernel's TCP answering.

The stack reads IPv4 packets with an AF_PACKET socket per path interface and
sends them with a raw IP socket bound to that interface. An nftables table in
the same namespace drops, at the input hook, TCP packets addressed to the
stack's ports, so the kernel's TCP never sees them and never answers with a RST
(AF_PACKET taps the packet before netfilter, so the stack still gets it).

The table is created through libnftables with the `owner` flag: the kernel
deletes it as soon as the netlink socket that created it closes, which is on
close(), on an exception, on a signal and even on SIGKILL of the process.
Everything happens in the namespace given; the caller's own namespace (the host
one, typically) is never touched.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Callable, TypeVar

from testbed.base.netns import run_in_netns_file

T = TypeVar("T")
ETH_P_IP = 0x0800
SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_IGNORE_OUTGOING = 23
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
TP_STATUS_CSUMNOTREADY = 0x8
TP_STATUS_CSUM_VALID = 0x80
SIOCGIFADDR = 0x8915
SIOCGIFFLAGS = 0x8913
IFF_UP, IFF_RUNNING = 0x1, 0x40
SIOCGIFMTU = 0x8921
# The stack's own client ports: above Linux's default ephemeral range
# (32768-60999), so kernel sockets in the same namespace never pick them.
CLIENT_PORTS = (61000, 65535)



class AttachError(RuntimeError):
    """The stack could not attach to the namespace (no such namespace, nft failure, ...)."""


def run_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Call fn() in a thread that joined the namespace at path netns (None: this one),
    through the project's one way in (testbed.base.netns); failing to get there is an AttachError.

    setns() only moves the calling thread, and sockets keep the namespace they
    were created in, so everything created here stays inside it.
    """
    if netns is None:
        return fn()
    try:
        return run_in_netns_file(netns, fn)
    except OSError as exc:
        if isinstance(exc, AttachError):
            raise
        raise AttachError(f"cannot enter namespace {netns}: {exc.strerror or exc}") from exc


def netns_path(netns: str | int | None) -> str | None:
    """A namespace path from a PID (int), a path (str) or None (the caller's namespace)."""
    if netns is None or isinstance(netns, str):
        return netns
    return f"/proc/{int(netns)}/ns/net"


@dataclass(frozen=True)
class Interface:
    """One path interface of the namespace: name, IPv4 address, MTU, whether it is up with a carrier."""
    name: str
    addr: str
    mtu: int
    running: bool = True


def list_interfaces() -> list[Interface]:
    """IPv4-addressed interfaces of the calling thread's namespace, loopback excluded."""
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _idx, name in socket.if_nameindex():
            if name == "lo":
                continue
            req = struct.pack("16s16x", name.encode())
            try:
                addr = socket.inet_ntoa(fcntl.ioctl(s, SIOCGIFADDR, req)[20:24])
                mtu = struct.unpack_from("i", fcntl.ioctl(s, SIOCGIFMTU, req), 16)[0]
                flags = struct.unpack_from("H", fcntl.ioctl(s, SIOCGIFFLAGS, req), 16)[0]
            except OSError:
                continue  # no IPv4 address
            out.append(Interface(name, addr, mtu, flags & (IFF_UP | IFF_RUNNING) == IFF_UP | IFF_RUNNING))
    return out


def _bpf_tcp_to(addrs: list[str]) -> bytes:
    """Classic BPF: accept IPv4/TCP packets to any of addrs (SOCK_DGRAM: offset 0 = IP header).

    Any of the stack's addresses, not only the interface's own: a join to the
    initial address may arrive over another path's interface.
    """
    n = len(addrs)
    insns = [(0x30, 0, 0, 9),                 # ldb [9]: protocol
             (0x15, 0, n + 1, 6),             # jeq TCP ? next : drop
             (0x20, 0, 0, 16)]                # ld [16]: destination address
    for i, addr in enumerate(addrs):
        daddr = struct.unpack("!I", socket.inet_aton(addr))[0]
        insns.append((0x15, n - i, 0, daddr))  # jeq addr ? accept : next
    insns.append((0x06, 0, 0, 0))             # drop
    insns.append((0x06, 0, 0, 0x40000))       # accept (256 KiB: a whole GSO packet)
    return b"".join(struct.pack("HBBI", *i) for i in insns)


class PathPort:
    """Packet I/O on one interface: AF_PACKET in, raw IPv4 socket out."""

    def __init__(self, iface: Interface, stack_addrs: list[str], rcvbuf: int = 8 << 20):
        self.iface = iface
        self.rx = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
        try:
            self.rx.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            self.rx.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            self.rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            self._filter = ctypes.create_string_buffer(_bpf_tcp_to(stack_addrs))
            prog = struct.pack("HL", len(self._filter.raw) // 8, ctypes.addressof(self._filter))
            self.rx.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)
            self.rx.bind((iface.name, ETH_P_IP))
            self.rx.setblocking(False)
            self.tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self.tx.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.name.encode())
            # The route lookup sees this source address, so a policy rule "from <addr>"
            # (the testbed's per-path tables) picks the path's own next hop.
            self.tx.bind((iface.addr, 0))
            self.tx.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 4 << 20)
        except BaseException:
            self.rx.close()
            raise

    def fileno(self) -> int:
        """The receive socket's descriptor, for poll()."""
        return self.rx.fileno()

    def receive(self) -> tuple[bytes, bool] | None:
        """One packet and whether its TCP checksum still needs checking; None when drained."""
        try:
            data, anc, _flags, _addr = self.rx.recvmsg(262144, 64)
        except BlockingIOError:
            return None
        except OSError:
            return None   # the interface went down (a failed link): nothing to read
        verify = True
        for level, kind, cdata in anc:
            if level == SOL_PACKET and kind == PACKET_AUXDATA and len(cdata) >= 4:
                status = struct.unpack_from("I", cdata)[0]
                # veth hands locally generated packets over with a partial checksum
                # (offload), which is fine: they never crossed a wire.
                if status & (TP_STATUS_CSUMNOTREADY | TP_STATUS_CSUM_VALID):
                    verify = False
        return data, verify

    def send(self, packet: bytes, dst: str) -> None:
        """Send one IPv4 packet (header included) out of this interface."""
        try:
            self.tx.sendto(packet, (dst, 0))
        except (BlockingIOError, OSError):
            pass  # a full queue or an unreachable route is a lost packet, TCP recovers

    def close(self) -> None:
        """Close both sockets."""
        self.rx.close()
        self.tx.close()


class NftGuard:
    """An nftables table, owned by this process, that hides the stack's ports from kernel TCP."""

    def __init__(self, name: str):
        try:
            self._lib = ctypes.CDLL("libnftables.so.1")
        except OSError as exc:
            raise AttachError("libnftables.so.1 not found (install the nftables package)") from exc
        lib = self._lib
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.name = name
        self._lock = threading.Lock()
        self._ctx = lib.nft_ctx_new(0)
        if not self._ctx:
            raise AttachError("nft_ctx_new failed")
        lib.nft_ctx_buffer_error(self._ctx)
        lib.nft_ctx_buffer_output(self._ctx)
        lo, hi = CLIENT_PORTS
        # priority -300 (raw): before conntrack and any filter chain of the testbed.
        self.run(f"add table ip {name} {{ flags owner; }}\n"
                 f"add set ip {name} addrs {{ type ipv4_addr; }}\n"
                 f"add set ip {name} ports {{ type inet_service; flags interval; }}\n"
                 f"add element ip {name} ports {{ {lo}-{hi} }}\n"
                 f"add chain ip {name} prerouting {{ type filter hook prerouting priority -300; }}\n"
                 f"add rule ip {name} prerouting ip daddr @addrs tcp dport @ports drop\n")

    def run(self, commands: str) -> None:
        """Run nft commands through the owning context; AttachError with nft's message on failure."""
        with self._lock:
            if not self._ctx:
                raise AttachError("nft table already removed")
            if self._lib.nft_run_cmd_from_buffer(self._ctx, commands.encode()) != 0:
                err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode().strip()
                raise AttachError(f"nft failed: {err.splitlines()[0] if err else 'unknown error'}")

    def add_addresses(self, addrs: list[str]) -> None:
        """Hide these local addresses' stack ports from the kernel."""
        if addrs:
            self.run(f"add element ip {self.name} addrs {{ {', '.join(addrs)} }}\n")

    def add_port(self, port: int) -> None:
        """Hide a listening port of the stack."""
        self.run(f"add element ip {self.name} ports {{ {port} }}\n")

    def add_ports(self, lo: int, hi: int) -> None:
        """Hide a range of ports (lo to hi, both included) from the kernel."""
        self.run(f"add element ip {self.name} ports {{ {lo}-{hi} }}\n")

    def remove_port(self, port: int) -> None:
        """Give a listening port back to the kernel."""
        self.run(f"delete element ip {self.name} ports {{ {port} }}\n")

    def close(self) -> None:
        """Free the context: the kernel drops the owner table with its socket."""
        with self._lock:
            if self._ctx:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None
