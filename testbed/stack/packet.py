"""IPv4 and TCP headers with TCP options: decode from bytes, encode to bytes.

Options the stack does not understand are kept as RawOption so a decoded
segment re-encodes byte for byte; the MPTCP option (kind 30) is delegated to
testbed.stack.options.
"""
from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

from testbed.stack.crypto import internet_checksum, ones_complement_sum
from testbed.stack.options import MptcpOption, decode_mptcp, encode_mptcp

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
TCP_KIND_EOL, TCP_KIND_NOP, TCP_KIND_MSS, TCP_KIND_WSCALE = 0, 1, 2, 3
TCP_KIND_SACK_PERM, TCP_KIND_SACK, TCP_KIND_TS, TCP_KIND_MPTCP = 4, 5, 8, 30
IPPROTO_TCP = 6


class DecodeError(ValueError):
    """A packet or option that cannot be parsed (truncated, bad length)."""


@dataclass(frozen=True)
class Mss:
    """Maximum segment size option (kind 2)."""
    value: int


@dataclass(frozen=True)
class WindowScale:
    """Window scale option (kind 3)."""
    shift: int


@dataclass(frozen=True)
class SackPermitted:
    """SACK-permitted option (kind 4)."""


@dataclass(frozen=True)
class Sack:
    """SACK blocks (kind 5) as (left, right) sequence pairs."""
    blocks: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Timestamps:
    """Timestamps option (kind 8, RFC 7323)."""
    value: int
    echo: int


@dataclass(frozen=True)
class RawOption:
    """A TCP option kept verbatim because the stack does not interpret it."""
    kind: int
    data: bytes


TcpOption = Mss | WindowScale | SackPermitted | Sack | Timestamps | RawOption | MptcpOption


def decode_tcp_options(buf: bytes) -> list:
    """Parse the option bytes of a TCP header; raises DecodeError on a bad length."""
    out: list = []
    i, n = 0, len(buf)
    while i < n:
        kind = buf[i]
        if kind == TCP_KIND_EOL:
            break
        if kind == TCP_KIND_NOP:
            i += 1
            continue
        if i + 1 >= n:
            raise DecodeError(f"TCP option {kind} truncated")
        length = buf[i + 1]
        if length < 2 or i + length > n:
            raise DecodeError(f"TCP option {kind} has bad length {length}")
        body = bytes(buf[i + 2:i + length])
        if kind == TCP_KIND_MSS and length == 4:
            out.append(Mss(struct.unpack("!H", body)[0]))
        elif kind == TCP_KIND_WSCALE and length == 3:
            out.append(WindowScale(body[0]))
        elif kind == TCP_KIND_SACK_PERM and length == 2:
            out.append(SackPermitted())
        elif kind == TCP_KIND_SACK and (length - 2) % 8 == 0:
            vals = struct.unpack(f"!{(length - 2) // 4}I", body)
            out.append(Sack(tuple(zip(vals[0::2], vals[1::2]))))
        elif kind == TCP_KIND_TS and length == 10:
            out.append(Timestamps(*struct.unpack("!II", body)))
        elif kind == TCP_KIND_MPTCP:
            out.append(decode_mptcp(bytes(buf[i:i + length])))
        else:
            out.append(RawOption(kind, body))
        i += length
    return out


def encode_tcp_option(opt) -> bytes:
    """Bytes of one option; timestamps get two leading NOPs so they stay 4-byte aligned."""
    if isinstance(opt, Mss):
        return struct.pack("!BBH", TCP_KIND_MSS, 4, opt.value)
    if isinstance(opt, WindowScale):
        return struct.pack("!BBBB", TCP_KIND_NOP, TCP_KIND_WSCALE, 3, opt.shift)
    if isinstance(opt, SackPermitted):
        return struct.pack("!BBBB", TCP_KIND_NOP, TCP_KIND_NOP, TCP_KIND_SACK_PERM, 2)
    if isinstance(opt, Sack):
        body = b"".join(struct.pack("!II", a, b) for a, b in opt.blocks)
        return struct.pack("!BBBB", TCP_KIND_NOP, TCP_KIND_NOP, TCP_KIND_SACK, 2 + len(body)) + body
    if isinstance(opt, Timestamps):
        return struct.pack("!BBBBII", TCP_KIND_NOP, TCP_KIND_NOP, TCP_KIND_TS, 10, opt.value, opt.echo)
    if isinstance(opt, RawOption):
        return struct.pack("!BB", opt.kind, 2 + len(opt.data)) + opt.data
    return encode_mptcp(opt)


def encode_tcp_options(opts) -> bytes:
    """All options, NOP-padded to a multiple of 4 bytes; at most 40 bytes."""
    buf = b"".join(encode_tcp_option(o) for o in opts)
    if len(buf) % 4:
        buf += b"\x01" * (4 - len(buf) % 4)
    if len(buf) > 40:
        raise ValueError(f"TCP options need {len(buf)} bytes, the header allows 40")
    return buf


@dataclass
class TcpSegment:
    """A TCP segment: header fields, decoded options and payload."""
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    options: list = field(default_factory=list)
    payload: bytes = b""
    urgent: int = 0

    def option(self, cls):
        """The first option of the given class, or None."""
        for o in self.options:
            if isinstance(o, cls):
                return o
        return None

    def seg_len(self) -> int:
        """Sequence space the segment occupies (payload plus SYN and FIN)."""
        return len(self.payload) + (1 if self.flags & SYN else 0) + (1 if self.flags & FIN else 0)


@dataclass
class IpPacket:
    """An IPv4 packet carrying one TCP segment (the only kind the stack handles)."""
    src: str
    dst: str
    tcp: TcpSegment
    ttl: int = 64
    ident: int = 0


def _pseudo_sum(src: bytes, dst: bytes, tcp_len: int) -> int:
    return ones_complement_sum(src + dst + struct.pack("!BBH", 0, IPPROTO_TCP, tcp_len))


def encode_tcp(seg: TcpSegment, src: str, dst: str) -> bytes:
    """TCP header + options + payload with a correct checksum."""
    opts = encode_tcp_options(seg.options)
    offset = (20 + len(opts)) // 4
    hdr = struct.pack("!HHIIBBHHH", seg.sport, seg.dport, seg.seq & 0xFFFFFFFF, seg.ack & 0xFFFFFFFF,
                      offset << 4, seg.flags, seg.window, 0, seg.urgent)
    body = hdr + opts + seg.payload
    csum = internet_checksum(body, _pseudo_sum(socket.inet_aton(src), socket.inet_aton(dst), len(body)))
    return body[:16] + struct.pack("!H", csum) + body[18:]


def encode_ipv4(pkt: IpPacket) -> bytes:
    """IPv4 header (DF set, no options) followed by the encoded TCP segment."""
    tcp = encode_tcp(pkt.tcp, pkt.src, pkt.dst)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), pkt.ident & 0xFFFF, 0x4000, pkt.ttl,
                      IPPROTO_TCP, 0, socket.inet_aton(pkt.src), socket.inet_aton(pkt.dst))
    csum = internet_checksum(hdr)
    return hdr[:10] + struct.pack("!H", csum) + hdr[12:] + tcp


def decode_ipv4(buf: bytes, verify_tcp_checksum: bool = True) -> IpPacket:
    """Parse an IPv4/TCP packet; DecodeError for anything else or a bad checksum."""
    if len(buf) < 20 or buf[0] >> 4 != 4:
        raise DecodeError("not IPv4")
    ihl = (buf[0] & 0x0F) * 4
    total = struct.unpack_from("!H", buf, 2)[0]
    if ihl < 20 or total < ihl + 20 or total > len(buf):
        raise DecodeError("bad IPv4 lengths")
    if buf[9] != IPPROTO_TCP:
        raise DecodeError("not TCP")
    ident = struct.unpack_from("!H", buf, 4)[0]
    src, dst = socket.inet_ntoa(buf[12:16]), socket.inet_ntoa(buf[16:20])
    tcp = bytes(buf[ihl:total])
    if verify_tcp_checksum:
        if internet_checksum(tcp, _pseudo_sum(buf[12:16], buf[16:20], len(tcp))) not in (0, 0xFFFF):
            raise DecodeError("bad TCP checksum")
    return IpPacket(src, dst, decode_tcp(tcp), ttl=buf[8], ident=ident)


def decode_tcp(buf: bytes) -> TcpSegment:
    """Parse a TCP header, its options and payload."""
    if len(buf) < 20:
        raise DecodeError("TCP header truncated")
    sport, dport, seq, ack, off, flags, window, _csum, urg = struct.unpack_from("!HHIIBBHHH", buf, 0)
    hlen = (off >> 4) * 4
    if hlen < 20 or hlen > len(buf):
        raise DecodeError("bad TCP data offset")
    return TcpSegment(sport, dport, seq, ack, flags, window, decode_tcp_options(buf[20:hlen]),
                      buf[hlen:], urg)
