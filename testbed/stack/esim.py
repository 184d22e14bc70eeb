"""RobE_eSIM's wire format on this stack (draft-amend-tcpm-mptcp-robe-02, an
experimental extension; docs/robe.md): ROBE_eSIM_EN and MP_JOIN_CAP.

With eSIM a client sends SYN+MP_CAPABLE on several paths at once like SIM, but
the losing attempts are not reset: the final ACK of each carries MP_JOIN_CAP
instead of MP_CAPABLE's keys, naming the winning connection, and the server
turns that half-open connection into a subflow of the winner.

Option codes (experimental: MPTCP's private-use subtype 0xf, the one RFC 8684
leaves to experiments, told apart by the low nibble of the subtype byte):

    ROBE_eSIM_EN   kind 30, length 4, subtype 0xf, nibble 0, flags byte with
                   bit 2 (0x04) set — the private-use flags option that
                   stack/privacy.py already negotiates (bits 0, 1), so one
                   4-byte option in the SYN asks and its echo in the SYN/ACK
                   agrees; a kernel server ignores it and never echoes.
    MP_JOIN_CAP    kind 30, length 20, subtype 0xf, nibble 1,
                   ADDR_ID (8) | Key-A of the winner (64) | tag (64)
                   tag = HMAC(winner's Key-A || Key-B, "robe-esim" || the
                   losing attempt's Key-B') truncated to 64 bits, with its
                   low 10 bits replaced by crc(Key-B) & 0x3ff. (MPTCP v1's
                   SYN carries no client key, so the losing attempt's server
                   key Key-B', from its SYN/ACK, is what both ends know.)

The draft leaves the hash, the HMAC key and the CRC open; the choices here
(EsimCrypto, pluggable, named in every run's manifest by describe()):
- HMAC-SHA256, as RFC 8684 uses for MP_JOIN, so no second primitive;
- keyed with the winner's two keys (what an MP_JOIN of that connection proves)
  over the losing attempt's server key, which binds the tag to this half-open
  connection: a tag seen on one path cannot be replayed on another attempt;
- CRC-16/CCITT-FALSE (poly 0x1021, init 0xffff) over Key-B's 8 bytes: the
  common 16-bit CRC, cheap; its low 10 bits let the server drop a wrong tag
  before computing an HMAC. They cost 10 bits of the 64-bit MAC (54 remain).
"""
from __future__ import annotations

import hashlib
import hmac
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

from testbed.stack.options import KIND, RST_MPTCP_ERROR, MpCapable, MpTcpRst, UnknownMptcp

PRIVATE_SUBTYPE = 0xF
FLAG_ESIM = 0x04            # ROBE_eSIM_EN: bit 2 of the private-use flags option
JOIN_CAP_NIBBLE = 1         # MP_JOIN_CAP: private-use subtype with low nibble 1
JOIN_CAP_LEN = 20
CRC_BITS = 10
LABEL = b"robe-esim"
# Where a server's check of an MP_JOIN_CAP ended (Stack.esim_checks counts them):
NO_CONNECTION = "no-connection"   # Key-A names no established MPTCP connection
HINT = "hint"                     # refused at the 10-bit CRC of Key-B, no HMAC computed
HMAC = "hmac"                     # the hint was right, the 54 MAC bits were not
OK = "accepted"                   # a subflow of the named connection now


def crc16_ccitt_false(data: bytes) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xffff, no reflection, no final xor)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def crc32_low(data: bytes) -> int:
    """zlib's CRC-32 (an alternative choice for the fast filter)."""
    import zlib
    return zlib.crc32(data)


CRCS: dict[str, Callable[[bytes], int]] = {"crc16-ccitt-false": crc16_ccitt_false, "crc32": crc32_low}
HASHES: dict[str, Callable] = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}


@dataclass(frozen=True)
class EsimCrypto:
    """The open choices of the draft: MAC hash, what keys it, the CRC of Key-B."""
    hash: str = "sha256"
    crc: str = "crc16-ccitt-false"
    hmac_key: str = "winner-keys"   # Key-A || Key-B of the winning connection (the only one built)

    def __post_init__(self) -> None:
        if self.hash not in HASHES:
            raise ValueError(f"esim hash: {self.hash!r} is not one of {', '.join(HASHES)}")
        if self.crc not in CRCS:
            raise ValueError(f"esim crc: {self.crc!r} is not one of {', '.join(CRCS)}")
        if self.hmac_key != "winner-keys":
            raise ValueError(f"esim hmac_key: {self.hmac_key!r} is not one of winner-keys")

    def describe(self) -> dict:
        """The choices for a run's manifest."""
        return {"hash": f"hmac-{self.hash}/64", "hmac_key": self.hmac_key, "crc": self.crc,
                "crc_bits": CRC_BITS, "label": LABEL.decode(),
                # experimental codes: MPTCP (kind 30) private-use subtype 0xf, told apart by the nibble
                "options": {"ROBE_eSIM_EN": {"kind": KIND, "subtype": PRIVATE_SUBTYPE, "nibble": 0,
                                             "flag": FLAG_ESIM, "length": 4},
                            "MP_JOIN_CAP": {"kind": KIND, "subtype": PRIVATE_SUBTYPE,
                                            "nibble": JOIN_CAP_NIBBLE, "length": JOIN_CAP_LEN}}}

    def key_b_hint(self, key_b: int) -> int:
        """The 10-bit fast hash of the winner's Key-B."""
        return CRCS[self.crc](struct.pack("!Q", key_b)) & ((1 << CRC_BITS) - 1)

    def tag(self, key_a: int, key_b: int, loser_key_b: int) -> int:
        """MP_JOIN_CAP's 64-bit tag: truncated HMAC with its low bits replaced by the Key-B hint."""
        mac = hmac.new(struct.pack("!QQ", key_a, key_b),
                       LABEL + struct.pack("!Q", loser_key_b), HASHES[self.hash]).digest()
        top = int.from_bytes(mac[:8], "big")
        return (top & ~((1 << CRC_BITS) - 1) & 0xFFFFFFFFFFFFFFFF) | self.key_b_hint(key_b)

    def check_stage(self, tag: int, key_a: int, key_b: int, loser_key_b: int) -> str:
        """Where the check of a tag ends: HINT (its low bits are not Key-B's CRC: refused
        before any HMAC), HMAC (right hint, wrong MAC) or OK."""
        if tag & ((1 << CRC_BITS) - 1) != self.key_b_hint(key_b):
            return HINT
        right = hmac.compare_digest(struct.pack("!Q", tag), struct.pack("!Q", self.tag(key_a, key_b, loser_key_b)))
        return OK if right else HMAC

    def check(self, tag: int, key_a: int, key_b: int, loser_key_b: int) -> bool:
        """True when tag is the one the holder of the winner's keys computes (hint first: cheap)."""
        return self.check_stage(tag, key_a, key_b, loser_key_b) == OK


@dataclass(frozen=True)
class JoinCap:
    """A decoded MP_JOIN_CAP: the address ID, the winner's Key-A and the tag."""
    addr_id: int
    key_a: int
    tag: int
    crypto: EsimCrypto = field(default_factory=EsimCrypto, compare=False)


def join_cap_option(addr_id: int, key_a: int, tag: int) -> UnknownMptcp:
    """MP_JOIN_CAP as an option the codec puts on the wire verbatim."""
    raw = struct.pack("!BBBBQQ", KIND, JOIN_CAP_LEN, (PRIVATE_SUBTYPE << 4) | JOIN_CAP_NIBBLE,
                      addr_id & 0xFF, key_a, tag)
    return UnknownMptcp(PRIVATE_SUBTYPE, raw)


def parse_join_cap(raw: bytes) -> JoinCap | None:
    """MP_JOIN_CAP from one option's bytes (kind and length included); None when it is another option."""
    if len(raw) != JOIN_CAP_LEN or raw[0] != KIND or raw[1] != JOIN_CAP_LEN or \
            raw[2] != (PRIVATE_SUBTYPE << 4) | JOIN_CAP_NIBBLE:
        return None
    _, _, _, addr_id, key_a, tag = struct.unpack("!BBBBQQ", raw)
    return JoinCap(addr_id, key_a, tag)


def join_cap_in(options: list) -> JoinCap | None:
    """The MP_JOIN_CAP among a segment's decoded options."""
    for o in options:
        if isinstance(o, UnknownMptcp) and o.subtype == PRIVATE_SUBTYPE:
            cap = parse_join_cap(o.raw)
            if cap is not None:
                return cap
    return None


def esim_enabled(flags: int) -> bool:
    """ROBE_eSIM_EN is set in a private-use flags byte."""
    return bool(flags & FLAG_ESIM)


DEFAULT_CRYPTO = EsimCrypto()


def agreed(conn) -> bool:
    """Both ends of this connection's handshake asked for eSIM."""
    return bool(conn.privacy_agreed & FLAG_ESIM)


def complete_as_join(loser, sf, seg, crypto: EsimCrypto = DEFAULT_CRYPTO) -> bool:
    """Client: the SYN/ACK of a losing attempt whose server echoed ROBE_eSIM_EN
    (caller holds the stack lock). Its final ACK carries MP_JOIN_CAP for the
    winner and the subflow moves into the winning connection, waiting like an
    MP_JOIN for the server's ACK. False (the caller goes on as plain RFC 8684,
    RobE then resets it like SIM) without the echo or a winning MPTCP connection."""
    from testbed.stack import privacy
    winner = loser.esim_winner
    cap = seg.option(MpCapable)
    if (winner is None or cap is None or cap.sender_key is None or winner.remote_key is None
            or winner.fallback or winner.state != "ESTABLISHED"
            or not privacy.requested(seg.options) & FLAG_ESIM):
        return False
    addr_id = winner.pm.local_id(sf.laddr)
    tag = crypto.tag(winner.local_key, winner.remote_key, cap.sender_key)
    loser.subflows.remove(sf)
    loser.stack.connections.discard(loser)
    loser.state = "CLOSED"
    sf.conn, sf.join, sf.addr_id, sf.fully_established = winner, True, addr_id, False
    winner.subflows.append(sf)
    winner.joined = True
    sf.join_third_ack = join_cap_option(addr_id, winner.local_key, tag)
    sf.esim_join_cap_sent = time.monotonic()
    sf.send_ack([sf.join_third_ack])
    sf.arm_rto()   # repeated until the server's ACK, like MP_JOIN's third ACK
    return True


def accept_as_join(half_open, sf, jc: JoinCap, crypto: EsimCrypto = DEFAULT_CRYPTO) -> bool:
    """Server: the final ACK of a half-open connection carried MP_JOIN_CAP (caller
    holds the stack lock). With a right tag for an established connection of the
    same client key the subflow becomes one of that connection's (the server's
    ACK confirms it); otherwise RST + MP_TCPRST, as for an MP_JOIN with a wrong HMAC."""
    stack = half_open.stack
    winner = next((c for c in stack.connections if c is not half_open and c.remote_key == jc.key_a
                   and c.state == "ESTABLISHED" and not c.fallback), None)
    stage = NO_CONNECTION if winner is None else \
        crypto.check_stage(jc.tag, winner.remote_key, winner.local_key, half_open.local_key)
    stack.esim_checks[stage] += 1
    if stage != OK:
        sf.send_rst([MpTcpRst(RST_MPTCP_ERROR)])
        half_open._drop_subflow(sf, f"MP_JOIN_CAP refused ({stage})")
        stack.connections.discard(half_open)
        return False
    half_open.subflows.remove(sf)
    stack.connections.discard(half_open)
    half_open.state = "CLOSED"
    sf.conn, sf.join, sf.fully_established = winner, True, True
    sf.remote_addr_id, sf.addr_id = jc.addr_id, winner.pm.local_id(sf.laddr)
    winner.subflows.append(sf)
    winner.joined = True
    sf.send_ack()   # the server's ACK: the client may send on the subflow
    winner.on_subflow_established(sf)
    return True
