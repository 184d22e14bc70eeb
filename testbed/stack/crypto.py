"""MPTCP v1 key derivations and checksums (RFC 8684 §3.1, §3.2, §3.3.1, §3.4.1).

Everything here is a pure function of bytes/ints so the codec and the protocol
engine share one definition and the unit tests can pin them with published
vectors (the kernel's net/mptcp/crypto_test.c) and with tshark's own derivation.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import struct


def key_digest(key: int) -> bytes:
    """SHA-256 of a 64-bit key in network byte order."""
    return hashlib.sha256(struct.pack("!Q", key)).digest()


def token_of(key: int) -> int:
    """Connection token: the most significant 32 bits of SHA-256(key)."""
    return struct.unpack_from("!I", key_digest(key), 0)[0]


def idsn_of(key: int) -> int:
    """Initial data sequence number: the least significant 64 bits of SHA-256(key)."""
    return struct.unpack_from("!Q", key_digest(key), 24)[0]


def new_key() -> int:
    """A fresh random 64-bit key (never zero: a zero key reads as 'absent' to some peers)."""
    while True:
        key = int.from_bytes(os.urandom(8), "big")
        if key:
            return key


def new_nonce() -> int:
    """A fresh random 32-bit MP_JOIN nonce."""
    return int.from_bytes(os.urandom(4), "big")


def hmac_sha256(key_a: int, key_b: int, msg: bytes) -> bytes:
    """HMAC-SHA256 with Key = key_a || key_b (64 bits each, network order)."""
    return hmac.new(struct.pack("!QQ", key_a, key_b), msg, hashlib.sha256).digest()


def join_synack_hmac(key_server: int, key_client: int, nonce_server: int, nonce_client: int) -> int:
    """Truncated (leftmost 64 bits) HMAC the MP_JOIN SYN/ACK carries (§3.2).

    Key = Key-B || Key-A, Msg = R-B || R-A, where B is the side answering the join.
    """
    mac = hmac_sha256(key_server, key_client, struct.pack("!II", nonce_server, nonce_client))
    return struct.unpack_from("!Q", mac, 0)[0]


def join_ack_hmac(key_client: int, key_server: int, nonce_client: int, nonce_server: int) -> bytes:
    """The 160 leftmost bits of HMAC the MP_JOIN third ACK carries (§3.2).

    Key = Key-A || Key-B, Msg = R-A || R-B, where A is the side that sent the join SYN.
    """
    return hmac_sha256(key_client, key_server, struct.pack("!II", nonce_client, nonce_server))[:20]


def add_addr_hmac(key_sender: int, key_receiver: int, addr_id: int, addr: bytes, port: int | None) -> int:
    """Truncated (rightmost 64 bits) HMAC an ADD_ADDR carries (§3.4.1).

    Key = Key-sender || Key-receiver (the announcing side first); Msg = Address ID
    || address || port, where an absent port still counts as two zero octets.
    Rightmost, unlike the MP_JOIN SYN/ACK's leftmost 64 bits: Linux 6.18 echoes an
    ADD_ADDR with the rightmost bits and silently drops one with the leftmost
    (conformance cases add-addr-echo / add-addr-bad-hmac).
    """
    mac = hmac_sha256(key_sender, key_receiver, bytes([addr_id]) + addr + struct.pack("!H", port or 0))
    return struct.unpack_from("!Q", mac, 24)[0]


def ones_complement_sum(data: bytes, start: int = 0) -> int:
    """16-bit one's complement sum of data (padded to even length), plus start.

    Uses the identity 2**16 == 1 (mod 0xFFFF): the folded sum of 16-bit words is
    the big integer modulo 0xFFFF, which CPython computes in C; a word loop in
    Python would cost ~20x more per packet.
    """
    if len(data) & 1:
        data = data + b"\0"
    total = int.from_bytes(data, "big") % 0xFFFF + start % 0xFFFF
    total = total % 0xFFFF
    if total == 0 and (start or any(data)):
        return 0xFFFF
    return total


def internet_checksum(data: bytes, start: int = 0) -> int:
    """RFC 1071 checksum (one's complement of the one's complement sum)."""
    return (~ones_complement_sum(data, start)) & 0xFFFF


def dss_checksum(dsn: int, subflow_seq: int, data_len: int, payload: bytes) -> int:
    """DSS checksum (§3.3.1): pseudo-header DSN(64) | SSN(32) | length(16) | zero(16), then data."""
    pseudo = struct.pack("!QIHH", dsn & 0xFFFFFFFFFFFFFFFF, subflow_seq & 0xFFFFFFFF, data_len, 0)
    return internet_checksum(pseudo + payload)
