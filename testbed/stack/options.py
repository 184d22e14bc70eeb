"""The MPTCP TCP option (kind 30) of RFC 8684: one dataclass per subtype, encode/decode.

Which form of MP_CAPABLE or MP_JOIN a packet carries is read from the option's
length (and for MP_JOIN the SYN/ACK flags of the segment are not needed: the
three forms have distinct lengths). Subtypes the stack does not know decode to
UnknownMptcp and are ignored by the engine, as §3 requires.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Callable

KIND = 30
MP_CAPABLE, MP_JOIN, DSS, ADD_ADDR, REMOVE_ADDR, MP_PRIO, MP_FAIL, MP_FASTCLOSE, MP_TCPRST = range(9)
MP_EXPERIMENTAL = 0xF

# MP_CAPABLE flags (§3.1): A checksum required, B extensibility, C no join to the
# initial address, H HMAC-SHA256 (the only crypto algorithm defined).
CAP_A_CHECKSUM, CAP_B_EXT, CAP_C_NO_INITIAL, CAP_H_SHA256 = 0x80, 0x40, 0x20, 0x01

# DSS flags (§3.3): F DATA_FIN, m DSN is 8 octets, M mapping present,
# a DATA_ACK is 8 octets, A DATA_ACK present.
DSS_F, DSS_m, DSS_M, DSS_a, DSS_A = 0x10, 0x08, 0x04, 0x02, 0x01

# MP_TCPRST reasons (§3.6).
RST_UNSPECIFIED, RST_MPTCP_ERROR, RST_NO_RESOURCES, RST_ADMIN, RST_NOT_ENOUGH_DATA, \
    RST_UNACCEPTABLE_PERF, RST_MIDDLEBOX = range(7)


class OptionError(ValueError):
    """An MPTCP option whose length does not fit its subtype."""


@dataclass(frozen=True)
class MpCapable:
    """MP_CAPABLE (§3.1). Keys and data_len present or None depending on the form.

    Lengths: 4 (SYN), 12 (SYN/ACK: sender_key), 20 (third ACK: both keys),
    22 (both keys + data-level length), 24 (+ DSS checksum).
    """
    flags: int = CAP_H_SHA256
    sender_key: int | None = None
    receiver_key: int | None = None
    data_len: int | None = None
    checksum: int | None = None
    version: int = 1


@dataclass(frozen=True)
class MpJoinSyn:
    """MP_JOIN on a SYN (§3.2): receiver's token and sender's nonce."""
    token: int
    nonce: int
    addr_id: int = 0
    backup: bool = False


@dataclass(frozen=True)
class MpJoinSynAck:
    """MP_JOIN on a SYN/ACK (§3.2): truncated 64-bit HMAC and the sender's nonce."""
    hmac64: int
    nonce: int
    addr_id: int = 0
    backup: bool = False


@dataclass(frozen=True)
class MpJoinAck:
    """MP_JOIN on the third ACK (§3.2): 160 bits of HMAC."""
    hmac160: bytes


@dataclass(frozen=True)
class Dss:
    """Data Sequence Signal (§3.3): DATA_ACK and/or a mapping, DATA_FIN, checksum."""
    data_ack: int | None = None
    data_ack64: bool = True
    dsn: int | None = None
    dsn64: bool = True
    subflow_seq: int = 0
    data_len: int = 0
    checksum: int | None = None
    data_fin: bool = False

    @property
    def has_mapping(self) -> bool:
        """True when the option carries a DSN mapping."""
        return self.dsn is not None

    @property
    def infinite(self) -> bool:
        """True for the infinite mapping of §3.7 (a mapping with data-level length 0)."""
        return self.dsn is not None and self.data_len == 0 and not self.data_fin


@dataclass(frozen=True)
class AddAddr:
    """ADD_ADDR (§3.4.1), IPv4 only in this codec; hmac64 absent on the echo."""
    addr_id: int
    addr: str
    port: int | None = None
    hmac64: int | None = None
    echo: bool = False


@dataclass(frozen=True)
class RemoveAddr:
    """REMOVE_ADDR (§3.4.2)."""
    addr_ids: tuple[int, ...]


@dataclass(frozen=True)
class MpPrio:
    """MP_PRIO (§3.3.8): change the backup flag of the subflow it arrives on."""
    backup: bool


@dataclass(frozen=True)
class MpFail:
    """MP_FAIL (§3.7): the DSN where a checksum failure was detected."""
    dsn: int


@dataclass(frozen=True)
class MpFastclose:
    """MP_FASTCLOSE (§3.5): the receiver's key, closing the whole connection at once."""
    receiver_key: int


@dataclass(frozen=True)
class MpTcpRst:
    """MP_TCPRST (§3.6): reason code and the U/V/W/T flags (T = transient)."""
    reason: int = RST_UNSPECIFIED
    flags: int = 0


@dataclass(frozen=True)
class UnknownMptcp:
    """An MPTCP subtype or form this codec does not interpret, kept verbatim."""
    subtype: int
    raw: bytes


# Private-use (subtype 0xf) options of the stack's experimental extensions, told apart
# by the low nibble of the subtype byte. Each extension's module registers its decoder
# here (raw option bytes -> its option, or None for a malformed one, which stays
# UnknownMptcp); its option dataclass encodes itself with to_bytes(). The package's
# __init__ imports those modules, so every decode sees them.
PRIVATE_USE_DECODERS: dict[int, Callable[[bytes], object | None]] = {}

MptcpOption = (MpCapable | MpJoinSyn | MpJoinSynAck | MpJoinAck | Dss | AddAddr | RemoveAddr
               | MpPrio | MpFail | MpFastclose | MpTcpRst | UnknownMptcp)


def _head(subtype: int, length: int, low4: int, byte3: int | None = None) -> bytes:
    head = struct.pack("!BBB", KIND, length, (subtype << 4) | (low4 & 0xF))
    return head if byte3 is None else head + bytes([byte3])


def encode_mptcp(opt) -> bytes:
    """Bytes of one MPTCP option (kind, length, subtype, body)."""
    if isinstance(opt, MpCapable):
        body = b""
        if opt.sender_key is not None:
            body += struct.pack("!Q", opt.sender_key)
        if opt.receiver_key is not None:
            body += struct.pack("!Q", opt.receiver_key)
        if opt.data_len is not None:
            body += struct.pack("!H", opt.data_len)
            if opt.checksum is not None:
                body += struct.pack("!H", opt.checksum)
        return _head(MP_CAPABLE, 4 + len(body), opt.version, opt.flags) + body
    if isinstance(opt, MpJoinSyn):
        return _head(MP_JOIN, 12, int(opt.backup), opt.addr_id) + struct.pack("!II", opt.token, opt.nonce)
    if isinstance(opt, MpJoinSynAck):
        return _head(MP_JOIN, 16, int(opt.backup), opt.addr_id) + struct.pack("!QI", opt.hmac64, opt.nonce)
    if isinstance(opt, MpJoinAck):
        if len(opt.hmac160) != 20:
            raise ValueError("MP_JOIN ACK carries exactly 160 bits of HMAC")
        return _head(MP_JOIN, 24, 0, 0) + opt.hmac160
    if isinstance(opt, Dss):
        return _encode_dss(opt)
    if isinstance(opt, AddAddr):
        body = ipaddress.IPv4Address(opt.addr).packed
        if opt.port is not None:
            body += struct.pack("!H", opt.port)
        if not opt.echo and opt.hmac64 is not None:
            body += struct.pack("!Q", opt.hmac64)
        # low nibble: E flag (bit 0); IPv4 needs no IPVer field in v1.
        return _head(ADD_ADDR, 4 + len(body), int(opt.echo), opt.addr_id) + body
    if isinstance(opt, RemoveAddr):
        return _head(REMOVE_ADDR, 3 + len(opt.addr_ids), 0) + bytes(opt.addr_ids)
    if isinstance(opt, MpPrio):
        return _head(MP_PRIO, 3, int(opt.backup))
    if isinstance(opt, MpFail):
        return _head(MP_FAIL, 12, 0, 0) + struct.pack("!Q", opt.dsn)
    if isinstance(opt, MpFastclose):
        return _head(MP_FASTCLOSE, 12, 0, 0) + struct.pack("!Q", opt.receiver_key)
    if isinstance(opt, MpTcpRst):
        return _head(MP_TCPRST, 4, opt.flags, opt.reason)
    if isinstance(opt, UnknownMptcp):
        return opt.raw
    if hasattr(opt, "to_bytes"):       # a registered private-use option (PRIVATE_USE_DECODERS)
        return opt.to_bytes()
    raise TypeError(f"not an MPTCP option: {opt!r}")


def _encode_dss(opt: Dss) -> bytes:
    flags = 0
    body = b""
    if opt.data_ack is not None:
        flags |= DSS_A
        if opt.data_ack64:
            flags |= DSS_a
            body += struct.pack("!Q", opt.data_ack & 0xFFFFFFFFFFFFFFFF)
        else:
            body += struct.pack("!I", opt.data_ack & 0xFFFFFFFF)
    if opt.dsn is not None:
        flags |= DSS_M
        if opt.dsn64:
            flags |= DSS_m
            body += struct.pack("!Q", opt.dsn & 0xFFFFFFFFFFFFFFFF)
        else:
            body += struct.pack("!I", opt.dsn & 0xFFFFFFFF)
        body += struct.pack("!IH", opt.subflow_seq & 0xFFFFFFFF, opt.data_len)
        if opt.checksum is not None:
            body += struct.pack("!H", opt.checksum)
    if opt.data_fin:
        flags |= DSS_F
    return _head(DSS, 4 + len(body), 0, flags) + body


def decode_mptcp(raw: bytes):
    """Parse one MPTCP option (raw includes kind and length); unknown forms -> UnknownMptcp."""
    if len(raw) < 3:
        return UnknownMptcp(-1, raw)
    length, subtype, low4 = raw[1], raw[2] >> 4, raw[2] & 0xF
    try:
        if subtype == MP_CAPABLE:
            return _decode_capable(raw, length, low4)
        if subtype == MP_JOIN:
            if length == 12:
                token, nonce = struct.unpack_from("!II", raw, 4)
                return MpJoinSyn(token, nonce, raw[3], bool(low4 & 1))
            if length == 16:
                mac, nonce = struct.unpack_from("!QI", raw, 4)
                return MpJoinSynAck(mac, nonce, raw[3], bool(low4 & 1))
            if length == 24:
                return MpJoinAck(bytes(raw[4:24]))
        elif subtype == DSS:
            return _decode_dss(raw, length)
        elif subtype == ADD_ADDR and length in (8, 10, 16, 18):
            port = struct.unpack_from("!H", raw, 8)[0] if length in (10, 18) else None
            mac = struct.unpack_from("!Q", raw, length - 8)[0] if length >= 16 else None
            return AddAddr(raw[3], str(ipaddress.IPv4Address(raw[4:8])), port, mac, bool(low4 & 1))
        elif subtype == REMOVE_ADDR and length >= 4:
            return RemoveAddr(tuple(raw[3:length]))
        elif subtype == MP_PRIO and length in (3, 4):
            return MpPrio(bool(low4 & 1))
        elif subtype == MP_FAIL and length == 12:
            return MpFail(struct.unpack_from("!Q", raw, 4)[0])
        elif subtype == MP_FASTCLOSE and length == 12:
            return MpFastclose(struct.unpack_from("!Q", raw, 4)[0])
        elif subtype == MP_TCPRST and length == 4:
            return MpTcpRst(raw[3], low4)
        elif subtype == MP_EXPERIMENTAL and low4 in PRIVATE_USE_DECODERS:
            decoded = PRIVATE_USE_DECODERS[low4](bytes(raw))
            if decoded is not None:
                return decoded
    except struct.error:
        pass
    return UnknownMptcp(subtype, bytes(raw))


def _decode_capable(raw: bytes, length: int, version: int):
    if len(raw) < 4 or length not in (4, 12, 20, 22, 24):
        return UnknownMptcp(MP_CAPABLE, bytes(raw))
    flags = raw[3]
    keys = [struct.unpack_from("!Q", raw, off)[0] for off in (4, 12) if off + 8 <= length]
    data_len = struct.unpack_from("!H", raw, 20)[0] if length >= 22 else None
    csum = struct.unpack_from("!H", raw, 22)[0] if length == 24 else None
    return MpCapable(flags, keys[0] if keys else None, keys[1] if len(keys) > 1 else None,
                     data_len, csum, version)


def _decode_dss(raw: bytes, length: int):
    flags = raw[3]
    need = 4
    if flags & DSS_A:
        need += 8 if flags & DSS_a else 4
    if flags & DSS_M:
        need += (8 if flags & DSS_m else 4) + 6
    if length not in (need, need + 2 if flags & DSS_M else need):
        return UnknownMptcp(DSS, bytes(raw))
    off = 4
    data_ack = dsn = csum = None
    if flags & DSS_A:
        if flags & DSS_a:
            data_ack = struct.unpack_from("!Q", raw, off)[0]
            off += 8
        else:
            data_ack = struct.unpack_from("!I", raw, off)[0]
            off += 4
    ssn = dlen = 0
    if flags & DSS_M:
        if flags & DSS_m:
            dsn = struct.unpack_from("!Q", raw, off)[0]
            off += 8
        else:
            dsn = struct.unpack_from("!I", raw, off)[0]
            off += 4
        ssn, dlen = struct.unpack_from("!IH", raw, off)
        off += 6
        if length == off + 2:
            csum = struct.unpack_from("!H", raw, off)[0]
    # An absent field keeps the default width so equal options compare equal.
    return Dss(data_ack, bool(flags & DSS_a) or data_ack is None, dsn, bool(flags & DSS_m) or dsn is None,
               ssn, dlen, csum, bool(flags & DSS_F))
