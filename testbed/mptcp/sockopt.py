"""MPTCP socket options (SOL_MPTCP) decoded into dataclasses.

Layouts follow include/uapi/linux/mptcp.h of Linux 6.18 and struct tcp_info of
include/uapi/linux/tcp.h. MPTCP_TCPINFO, MPTCP_SUBFLOW_ADDRS and MPTCP_FULL_INFO
are "in/out" options: the caller fills a header (element sizes, array length)
and the kernel writes counts and its own sizes back. Python's
socket.getsockopt(level, opt, buflen) passes a zeroed buffer, so it cannot send
such a header; we call libc getsockopt through ctypes on the socket's fd.

Versioning: the kernel copies min(user size, kernel size) per element and
reports its own size, so older/newer kernels just give fewer/more fields; we
decode only what the returned length covers (absent fields are None). Older
kernels also lack whole options: MPTCP_FULL_INFO is 6.5+, so subflows() reads
MPTCP_TCPINFO + MPTCP_SUBFLOW_ADDRS (5.16+) where it is missing (Debian 12's 6.1).
"""
from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from testbed.base.errors import TestbedError

SOL_MPTCP = 284
MPTCP_INFO = 1
MPTCP_TCPINFO = 2
MPTCP_SUBFLOW_ADDRS = 3
MPTCP_FULL_INFO = 4
IPPROTO_MPTCP = getattr(socket, "IPPROTO_MPTCP", 262)

MPTCP_INFO_FLAG_FALLBACK = 1 << 0
MPTCP_INFO_FLAG_REMOTE_KEY_RECEIVED = 1 << 1

MAX_SUBFLOWS = 16  # kernel hard maximum is 8 (+ the initial one); room to spare
TCP_INFO_LEN = 256  # >= sizeof(struct tcp_info) on 6.18; the kernel tells its size
SFINFO_LEN = 264  # struct mptcp_subflow_info: u32 id, pad to 8, 2 x sockaddr_storage
ADDRS_LEN = 256  # struct mptcp_subflow_addrs: 2 x sockaddr_storage (128 each)
DATA_HDR = struct.Struct("=IIII")  # struct mptcp_subflow_data (16 bytes, aligned 8)

TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1",
              5: "FIN_WAIT2", 6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT",
              9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV"}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.getsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int,
                             ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]


# struct mptcp_info, 96 bytes on 6.18 (natural alignment -> ctypes matches C).
class _MptcpInfo(ctypes.Structure):
    _fields_ = [
        ("subflows", ctypes.c_uint8), ("add_addr_signal", ctypes.c_uint8),
        ("add_addr_accepted", ctypes.c_uint8), ("subflows_max", ctypes.c_uint8),
        ("add_addr_signal_max", ctypes.c_uint8), ("add_addr_accepted_max", ctypes.c_uint8),
        ("flags", ctypes.c_uint32), ("token", ctypes.c_uint32),
        ("write_seq", ctypes.c_uint64), ("snd_una", ctypes.c_uint64), ("rcv_nxt", ctypes.c_uint64),
        ("local_addr_used", ctypes.c_uint8), ("local_addr_max", ctypes.c_uint8),
        ("csum_enabled", ctypes.c_uint8),
        ("retransmits", ctypes.c_uint32), ("bytes_retrans", ctypes.c_uint64),
        ("bytes_sent", ctypes.c_uint64), ("bytes_received", ctypes.c_uint64),
        ("bytes_acked", ctypes.c_uint64), ("subflows_total", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8 * 3), ("last_data_sent", ctypes.c_uint32),
        ("last_data_recv", ctypes.c_uint32), ("last_ack_recv", ctypes.c_uint32),
    ]


assert ctypes.sizeof(_MptcpInfo) == 96 and _MptcpInfo.token.offset == 12


@dataclass(frozen=True)
class MptcpInfo:
    """struct mptcp_info. `subflows` counts *additional* subflows (joins), not the
    initial one; `subflows_total` (6.10+) counts all of them. A field the
    kernel's struct does not have yet is None, not 0: retransmits and the
    bytes_* counters appeared in 6.2 (Debian 12's 6.1 returns 48 bytes),
    subflows_total in 6.10, last_* in 6.11."""

    subflows: int
    add_addr_signal: int
    add_addr_accepted: int
    subflows_max: int
    add_addr_signal_max: int
    add_addr_accepted_max: int
    flags: int
    token: int
    write_seq: int
    snd_una: int
    rcv_nxt: int
    local_addr_used: int
    local_addr_max: int
    csum_enabled: int
    retransmits: int | None
    bytes_retrans: int | None
    bytes_sent: int | None
    bytes_received: int | None
    bytes_acked: int | None
    subflows_total: int | None
    last_data_sent: int | None
    last_data_recv: int | None
    last_ack_recv: int | None

    @property
    def fallback(self) -> bool:
        """True when the connection fell back to TCP."""
        return bool(self.flags & MPTCP_INFO_FLAG_FALLBACK)

    @property
    def remote_key_received(self) -> bool:
        """True once the peer's key arrived."""
        return bool(self.flags & MPTCP_INFO_FLAG_REMOTE_KEY_RECEIVED)


@dataclass(frozen=True)
class TcpInfo:
    """The struct tcp_info fields the testbed uses (one subflow)."""

    state: str
    ca_state: int
    retransmits: int
    rto_us: int
    snd_mss: int
    unacked: int
    lost: int
    retrans: int
    pmtu: int
    rtt_us: int
    rttvar_us: int
    snd_ssthresh: int
    snd_cwnd: int
    total_retrans: int
    pacing_rate: int | None = None
    bytes_acked: int | None = None
    bytes_received: int | None = None
    segs_out: int | None = None
    segs_in: int | None = None
    min_rtt_us: int | None = None
    delivery_rate: int | None = None
    bytes_sent: int | None = None
    bytes_retrans: int | None = None


@dataclass(frozen=True)
class SubflowAddrs:
    """A subflow's local and remote (address, port)."""
    local: tuple[str, int]
    remote: tuple[str, int]

    @property
    def label(self) -> str:
        """`saddr:sport-daddr:dport`, the `subflow` key of the subflows table."""
        return f"{self.local[0]}:{self.local[1]}-{self.remote[0]}:{self.remote[1]}"


@dataclass(frozen=True)
class Subflow:
    """One subflow: kernel subflow id, addresses, TCP_INFO. `id` is None when the
    kernel does not report it (no MPTCP_FULL_INFO before Linux 6.5)."""

    id: int | None
    addrs: SubflowAddrs
    tcp: TcpInfo


@dataclass(frozen=True)
class FullInfo:
    """MPTCP_FULL_INFO: the connection's mptcp_info and every subflow."""
    mptcp: MptcpInfo
    subflows: list[Subflow]
    num_subflows: int  # real count (may exceed len(subflows) if the array was short)


# ---- low level -----------------------------------------------------------
def _getsockopt(sock: socket.socket | int, level: int, opt: int, buf: ctypes.Array) -> int:
    fd = sock if isinstance(sock, int) else sock.fileno()
    optlen = ctypes.c_uint32(len(buf))
    if _libc.getsockopt(fd, level, opt, buf, ctypes.byref(optlen)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"getsockopt(SOL_MPTCP, {opt}): {os.strerror(err)}")
    return optlen.value


# Fields added to struct mptcp_info after 5.16 -> the struct length that proves
# the kernel has them. By group, not by offset: a new field may sit in what was
# the tail padding of the older struct (6.1's 48 bytes end in 5 padding bytes
# where 6.2 put `retransmits`; 6.10's 88 bytes where 6.11 put last_data_sent).
_MPTCP_INFO_SINCE = {
    **dict.fromkeys(("retransmits", "bytes_retrans", "bytes_sent", "bytes_received",
                     "bytes_acked"), 80),  # 6.2
    "subflows_total": 88,  # 6.10
    **dict.fromkeys(("last_data_sent", "last_data_recv", "last_ack_recv"), 96),  # 6.11
}


def _decode_mptcp_info(raw: bytes) -> MptcpInfo:
    # An older kernel returns a shorter struct: the fields it lacks are None.
    mi = _MptcpInfo.from_buffer_copy(raw[:96].ljust(96, b"\0"))
    values = {}
    for name, _ in _MptcpInfo._fields_:
        f = getattr(_MptcpInfo, name)
        if name != "reserved":
            need = _MPTCP_INFO_SINCE.get(name, f.offset + f.size)
            values[name] = getattr(mi, name) if len(raw) >= need else None
    return MptcpInfo(**values)


def _decode_tcp_info(raw: bytes) -> TcpInfo:
    state, ca_state, retransmits = raw[0], raw[1], raw[2]
    (rto, _ato, snd_mss, _rcv_mss, unacked, _sacked, lost, retrans, _fackets) = \
        struct.unpack_from("=9I", raw, 8)
    (pmtu, _rcv_ssthresh, rtt, rttvar, snd_ssthresh, snd_cwnd) = struct.unpack_from("=6I", raw, 60)
    total_retrans = struct.unpack_from("=I", raw, 100)[0]
    extra: dict[str, int] = {}
    if len(raw) >= 160:
        pacing, _maxp, acked, received = struct.unpack_from("=4Q", raw, 104)
        segs_out, segs_in, _notsent, min_rtt = struct.unpack_from("=4I", raw, 136)
        extra.update(pacing_rate=pacing, bytes_acked=acked, bytes_received=received,
                     segs_out=segs_out, segs_in=segs_in, min_rtt_us=min_rtt)
    if len(raw) >= 168:
        extra["delivery_rate"] = struct.unpack_from("=Q", raw, 160)[0]
    if len(raw) >= 216:
        extra["bytes_sent"], extra["bytes_retrans"] = struct.unpack_from("=2Q", raw, 200)
    return TcpInfo(state=TCP_STATES.get(state, str(state)), ca_state=ca_state,
                   retransmits=retransmits, rto_us=rto, snd_mss=snd_mss, unacked=unacked,
                   lost=lost, retrans=retrans, pmtu=pmtu, rtt_us=rtt, rttvar_us=rttvar,
                   snd_ssthresh=snd_ssthresh, snd_cwnd=snd_cwnd, total_retrans=total_retrans,
                   **extra)


def _decode_sockaddr(raw: bytes) -> tuple[str, int]:
    family = struct.unpack_from("=H", raw, 0)[0]
    port = struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(raw[4:8])), port
    if family == socket.AF_INET6:
        return str(ipaddress.IPv6Address(raw[8:24])), port
    return "", 0


def _decode_addrs(raw: bytes) -> SubflowAddrs:
    return SubflowAddrs(_decode_sockaddr(raw[0:128]), _decode_sockaddr(raw[128:256]))


def _subflow_array(sock: socket.socket | int, opt: int, elem: int) -> list[bytes]:
    """MPTCP_TCPINFO / MPTCP_SUBFLOW_ADDRS: header + array of `elem`-byte entries."""
    buf = ctypes.create_string_buffer(DATA_HDR.size + elem * MAX_SUBFLOWS)
    DATA_HDR.pack_into(buf, 0, DATA_HDR.size, 0, 0, elem)
    _getsockopt(sock, SOL_MPTCP, opt, buf)
    _, num, size_kernel, size_user = DATA_HDR.unpack_from(buf, 0)
    step = size_user  # the kernel rewrites size_user to min(user, kernel)
    return [buf.raw[DATA_HDR.size + i * step: DATA_HDR.size + (i + 1) * step]
            for i in range(min(num, MAX_SUBFLOWS))]


# ---- public API ------------------------------------------------------------
def tcp_info(sock: socket.socket) -> TcpInfo:
    """TCP_INFO of a plain TCP socket, or of an MPTCP socket that fell back to TCP."""
    return _decode_tcp_info(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN))


def mptcp_info(sock: socket.socket | int) -> MptcpInfo:
    """MPTCP_INFO. Raises OSError (EOPNOTSUPP on a plain TCP socket)."""
    buf = ctypes.create_string_buffer(96)
    n = _getsockopt(sock, SOL_MPTCP, MPTCP_INFO, buf)
    return _decode_mptcp_info(buf.raw[:n])


def subflow_tcpinfo(sock: socket.socket | int) -> list[TcpInfo]:
    """MPTCP_TCPINFO: TCP_INFO of every subflow."""
    return [_decode_tcp_info(raw) for raw in _subflow_array(sock, MPTCP_TCPINFO, TCP_INFO_LEN)]


def subflow_addrs(sock: socket.socket | int) -> list[SubflowAddrs]:
    """MPTCP_SUBFLOW_ADDRS: the addresses of every subflow."""
    return [_decode_addrs(raw) for raw in _subflow_array(sock, MPTCP_SUBFLOW_ADDRS, ADDRS_LEN)]


def full_info(sock: socket.socket | int) -> FullInfo:
    """MPTCP_FULL_INFO: mptcp_info + per-subflow id/addresses/tcp_info, read
    consistently in one call (separate TCPINFO/ADDRS calls can disagree when a
    subflow comes or goes between them)."""
    sf_buf = ctypes.create_string_buffer(SFINFO_LEN * MAX_SUBFLOWS)
    ti_buf = ctypes.create_string_buffer(TCP_INFO_LEN * MAX_SUBFLOWS)
    hdr = struct.Struct("=6IQQ")  # sizes, num_subflows, size_arrays_user, 2 pointers
    buf = ctypes.create_string_buffer(hdr.size + 96)
    hdr.pack_into(buf, 0, 0, TCP_INFO_LEN, 0, SFINFO_LEN, 0, MAX_SUBFLOWS,
                  ctypes.addressof(sf_buf), ctypes.addressof(ti_buf))
    n = _getsockopt(sock, SOL_MPTCP, MPTCP_FULL_INFO, buf)
    _tk, ti_user, _sk, sf_user, num, _arr, _p1, _p2 = hdr.unpack_from(buf, 0)
    info = _decode_mptcp_info(buf.raw[hdr.size:n])
    subflows = []
    for i in range(min(num, MAX_SUBFLOWS)):
        sf = sf_buf.raw[i * sf_user:(i + 1) * sf_user]
        ti = ti_buf.raw[i * ti_user:(i + 1) * ti_user]
        subflows.append(Subflow(id=struct.unpack_from("=I", sf, 0)[0],
                                addrs=_decode_addrs(sf[8:8 + ADDRS_LEN]), tcp=_decode_tcp_info(ti)))
    return FullInfo(mptcp=info, subflows=subflows, num_subflows=num)


# Whether the kernel has MPTCP_FULL_INFO (6.5+): None until a connected MPTCP
# socket has told us (a fallen-back socket refuses every SOL_MPTCP option, so
# one refusal alone proves nothing).
_full_info_supported: bool | None = None


def full_info_supported() -> bool | None:
    """True/False once subflows() has probed MPTCP_FULL_INFO, None before."""
    return _full_info_supported


def subflows(sock: socket.socket | int, attempts: int = 5) -> list[Subflow]:
    """Every subflow of a connected MPTCP socket: id, addresses, TCP_INFO.

    MPTCP_FULL_INFO where the kernel has it (6.5+); otherwise MPTCP_SUBFLOW_ADDRS
    and MPTCP_TCPINFO (5.16+), paired by position (both walk the connection's
    subflow list in order). Those are two calls, so the address list is read
    before and after the TCP_INFO array and the pairing is only used when the
    three agree (a subflow came or went otherwise: retried). Subflow ids are not
    available that way and are None. Raises OSError (EOPNOTSUPP) for a socket
    that fell back to TCP, as full_info() does.
    """
    global _full_info_supported
    if _full_info_supported is not False:
        try:
            subs = full_info(sock).subflows
            _full_info_supported = True
            return subs
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOPROTOOPT) or _full_info_supported:
                raise
            first_error = exc
        try:
            subflow_tcpinfo(sock)
        except OSError:
            raise first_error from None  # fallen back (or no MPTCP at all): not a probe result
        _full_info_supported = False
    for _ in range(attempts):
        before = subflow_addrs(sock)
        tcp = subflow_tcpinfo(sock)
        if subflow_addrs(sock) == before and len(tcp) == len(before):
            return [Subflow(id=None, addrs=a, tcp=t) for a, t in zip(before, tcp)]
    raise OSError(errno.EAGAIN, "subflows changed during every MPTCP_TCPINFO/MPTCP_SUBFLOW_ADDRS read")


def mptcp_socket(cc: str = "cubic", protocol: str = "mptcp",
                 family: int = socket.AF_INET) -> socket.socket:
    """A stream socket (MPTCP, or plain TCP for baselines) with its congestion
    control set per socket: the kernel default here is bbr and a namespace may not
    change it; MPTCP subflows inherit the MPTCP socket's setting."""
    if protocol not in ("mptcp", "tcp"):
        raise TestbedError(f"protocol must be 'mptcp' or 'tcp', got {protocol!r}")
    proto = IPPROTO_MPTCP if protocol == "mptcp" else socket.IPPROTO_TCP
    try:
        s = socket.socket(family, socket.SOCK_STREAM, proto)
    except OSError as exc:
        raise TestbedError(f"cannot create {protocol} socket: {exc.strerror} "
                           "(is net.mptcp.enabled=1 in this namespace?)") from None
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
    except OSError as exc:
        s.close()
        raise TestbedError(f"congestion control {cc!r} not available: {exc.strerror}") from None
    return s


def listener(port: int, addr: str = "0.0.0.0", protocol: str = "mptcp", cc: str = "cubic",
             backlog: int = 64) -> socket.socket:
    """A listening socket (call it inside the server's namespace). Keep it open
    while the connection lives: MP_JOIN SYNs are matched against it."""
    s = mptcp_socket(cc, protocol)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(backlog)
    return s


def congestion_control(sock: socket.socket) -> str:
    """The socket's congestion-control algorithm."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).split(b"\0")[0].decode()


def is_fallback(sock: socket.socket) -> bool:
    """True when a connected MPTCP socket runs as plain TCP (peer without MPTCP,
    or options stripped). Measured on 6.18: every SOL_MPTCP getsockopt on a
    fallen-back socket fails with EOPNOTSUPP (95); MPTCP_INFO_FLAG_FALLBACK is
    checked too in case a kernel answers with the flag set instead."""
    try:
        return mptcp_info(sock).fallback
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOPROTOOPT):
            return True
        raise


def outcome(sock: socket.socket) -> str:
    """'mptcp' or 'fallback_tcp' for a connected socket created as MPTCP; 'tcp'
    for a plain TCP socket."""
    if sock.proto != IPPROTO_MPTCP:
        return "tcp"
    return "fallback_tcp" if is_fallback(sock) else "mptcp"


__all__ = ["SOL_MPTCP", "MptcpInfo", "TcpInfo", "SubflowAddrs", "Subflow", "FullInfo",
           "mptcp_info", "tcp_info", "subflow_tcpinfo", "subflow_addrs", "full_info", "subflows",
           "full_info_supported", "mptcp_socket",
           "congestion_control", "is_fallback", "outcome"]
