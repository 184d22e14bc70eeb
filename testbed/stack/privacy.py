"""Per-subflow obfuscation of the data sequence space (an experimental
extension of this stack; docs/privacy.md).

RFC 8684's DSNs and DATA_ACKs are connection-level: every subflow of a
connection carries numbers from the same two 64-bit spaces, so observers on
different paths link the subflows by their ranges alone. Here each subflow
shifts both spaces by offsets only the two endpoints can compute:

    offset(space, subflow) = first 64 bits of HMAC-SHA256(
        key = Key(owner of the space) || Key(the other host),
        msg = "mptcp-dsn-offset" || R_client || R_server)

where R_client, R_server are the subflow's MP_JOIN nonces (both 0 for the
initial subflow). On the wire a subflow carries DSN + offset(sender's space)
and DATA_ACK + offset(receiver's space) (mod 2**64; MP_FAIL's DSN like a
DATA_ACK), and the receiver subtracts them. The DSS checksum covers the real
DSN (both ends compute it after undoing the offset).

Negotiation: the client's SYN carries the private-use MPTCP subtype 0xf with
one flags byte (bit 0: DSN offsets); a server that wants them too echoes it in
its SYN/ACK. Both use the offsets from the moment the keys are known. Linux
ignores an MPTCP subtype it does not know (RFC 8684 §3), so a kernel server
never echoes and the connection runs plain RFC 8684; a kernel client never asks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import struct

from testbed.stack.options import KIND, Dss, MpFail, UnknownMptcp

PRIVATE_SUBTYPE = 0xF
FLAG_DSN_OFFSET = 0x01
FLAG_EXTERNAL_KEYS = 0x02  # keys replaced after the handshake (Connection.rekey)
LABEL = b"mptcp-dsn-offset"
MASK64 = (1 << 64) - 1


def flags(dsn_offsets: bool, external_keys: bool) -> int:
    """The flags byte asking for these extensions."""
    return (FLAG_DSN_OFFSET if dsn_offsets else 0) | (FLAG_EXTERNAL_KEYS if external_keys else 0)


def request_option(flags: int = FLAG_DSN_OFFSET) -> UnknownMptcp:
    """The option a SYN (request) or SYN/ACK (echo) carries."""
    return UnknownMptcp(PRIVATE_SUBTYPE, bytes([KIND, 4, PRIVATE_SUBTYPE << 4, flags]))


def requested(options: list) -> int:
    """The flags of the private-use option among a segment's options (0: absent)."""
    for o in options:
        # nibble 0, 4 bytes: the flags option, not another private-use option (MP_JOIN_CAP's
        # address ID sits in the same byte)
        if isinstance(o, UnknownMptcp) and o.subtype == PRIVATE_SUBTYPE and len(o.raw) == 4 and not o.raw[2] & 0xF:
            return o.raw[3]
    return 0


def offset(owner_key: int, other_key: int, nonce_client: int, nonce_server: int) -> int:
    """The offset of the data space of the host whose key is owner_key on one subflow."""
    mac = hmac.new(struct.pack("!QQ", owner_key, other_key),
                   LABEL + struct.pack("!II", nonce_client, nonce_server), hashlib.sha256).digest()
    return int.from_bytes(mac[:8], "big")


class DsnOffsets:
    """Both ends' offsets per subflow of one connection, applied to options out and in."""

    def __init__(self, local_key: int, remote_key: int, active: bool):
        self.local_key, self.remote_key, self.active = local_key, remote_key, active
        self._cache: dict[tuple[int, int], tuple[int, int]] = {}

    def rekey(self, local_key: int, remote_key: int) -> None:
        """New keys for subflows from now on; the subflows already keyed keep theirs."""
        self.local_key, self.remote_key = local_key, remote_key

    def offsets(self, join: bool, local_nonce: int, remote_nonce: int) -> tuple[int, int]:
        """(offset of our data space, of the peer's) on a subflow."""
        nonces = (0, 0) if not join else ((local_nonce, remote_nonce) if self.active
                                          else (remote_nonce, local_nonce))
        if nonces not in self._cache:
            self._cache[nonces] = (offset(self.local_key, self.remote_key, *nonces),
                                   offset(self.remote_key, self.local_key, *nonces))
        return self._cache[nonces]

    def _shift(self, options: list, mine: int, peers: int, sign: int) -> list:
        out = []
        for o in options:
            if isinstance(o, Dss):
                # outgoing: DSN is ours, DATA_ACK the peer's; incoming: the reverse
                d_off, a_off = (mine, peers) if sign > 0 else (peers, mine)
                dsn = None if o.dsn is None else _add(o.dsn, sign * d_off, o.dsn64)
                ack = None if o.data_ack is None else _add(o.data_ack, sign * a_off, o.data_ack64)
                o = dataclasses.replace(o, dsn=dsn, data_ack=ack)
            elif isinstance(o, MpFail):
                o = MpFail(_add(o.dsn, sign * (peers if sign > 0 else mine), True))
            out.append(o)
        return out

    def outgoing(self, sf, options: list) -> list:
        """A subflow's MPTCP options as they go on the wire."""
        mine, peers = self.offsets(sf.join, sf.local_nonce, sf.remote_nonce)
        return self._shift(options, mine, peers, +1)

    def incoming(self, sf, options: list) -> list:
        """A subflow's received options with the offsets undone."""
        mine, peers = self.offsets(sf.join, sf.local_nonce, sf.remote_nonce)
        return self._shift(options, mine, peers, -1)


def _add(value: int, delta: int, wide: bool) -> int:
    return (value + delta) & (MASK64 if wide else 0xFFFFFFFF)


def join_with_keys(stack, dest: tuple[str, int], key_client: int, key_server: int, from_addr: str,
                   timeout: float = 5.0):
    """The join hijack (docs/privacy.md): what an on-path observer of an
    MP_CAPABLE exchange can do with the keys it saw, open an MP_JOIN subflow
    from its own address into the victim's connection. Returns the subflow
    once the peer completed the join (its SYN/ACK HMAC checked against the
    keys, our third ACK accepted); StackError when the peer refused it."""
    from testbed.stack.connection import Connection, StackError  # (connection imports this module)
    from testbed.stack.crypto import token_of
    with stack.lock:
        conn = Connection(stack, active=True, checksum=False)
        conn.local_key, conn.remote_key = key_client, key_server
        conn.local_token, conn.remote_token = token_of(key_client), token_of(key_server)
        stack.connections.add(conn)
        sf = stack.open_subflow(conn, from_addr, dest[0], dest[1], join=True)
    with conn.cond:
        ok = conn.cond.wait_for(lambda: sf.fully_established or sf not in conn.subflows, timeout)
    if not ok or sf not in conn.subflows:
        raise StackError(f"MP_JOIN with the observed keys from {from_addr} was refused")
    return sf
