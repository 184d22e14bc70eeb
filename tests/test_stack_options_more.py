"""User-space stack, RFC 8684 part 2 without namespaces: the codec forms of ADD_ADDR, REMOVE_ADDR,
MP_PRIO, MP_FAIL and the infinite mapping, the ADD_ADDR HMAC, the path manager's limits and
bookkeeping, and MP_FAIL in a RST (the discarded data is sent again)."""
from __future__ import annotations

import os
import socket

import pytest

from test_stack_engine import Wire, transfer
from testbed.stack import crypto
from testbed.stack.options import (CAP_C_NO_INITIAL, CAP_H_SHA256, RST_MIDDLEBOX, AddAddr, Dss, MpCapable, MpFail,
                                   MpPrio, MpTcpRst, RemoveAddr, decode_mptcp, encode_mptcp)
from testbed.stack.packet import ACK, RST, TcpSegment
from testbed.stack.pm import PeerAddress, PmLimits


@pytest.mark.parametrize("opt,length", [
    (AddAddr(addr_id=9, addr="192.0.2.7", port=10100, hmac64=(1 << 64) - 1), 18),
    (AddAddr(addr_id=0, addr="192.0.2.7"), 8),                      # echo form without port...
    (AddAddr(addr_id=1, addr="192.0.2.7", echo=True), 8),           # ...and with the E flag
    (RemoveAddr((7,)), 4),
    (MpPrio(backup=False), 3),
    (MpFail(dsn=(1 << 64) - 1), 12),
    (Dss(data_ack=1, dsn=2, subflow_seq=3, data_len=0, checksum=0), 28),   # infinite mapping
    (MpCapable(CAP_H_SHA256 | CAP_C_NO_INITIAL, sender_key=5), 12),
], ids=["add-addr-port-hmac", "add-addr-bare", "add-addr-echo", "remove-one", "prio-off", "fail", "infinite",
        "capable-c-flag"])
def test_part2_forms_round_trip(opt, length):
    raw = encode_mptcp(opt)
    assert raw[1] == length == len(raw)
    assert decode_mptcp(raw) == opt


def test_the_echo_carries_no_hmac_and_the_infinite_mapping_is_recognised():
    echo = encode_mptcp(AddAddr(1, "10.0.1.2", 5000, hmac64=42, echo=True))
    assert len(echo) == 10 and decode_mptcp(echo).hmac64 is None
    assert Dss(dsn=5, subflow_seq=1, data_len=0).infinite
    assert not Dss(dsn=5, subflow_seq=1, data_len=10).infinite
    assert not Dss(dsn=5, subflow_seq=0, data_len=1, data_fin=True).infinite
    assert not Dss(data_ack=5).infinite


def test_add_addr_hmac_covers_id_address_and_port():
    a, b, addr = 0x0102030405060708, 0x1111222233334444, socket.inet_aton("10.0.1.2")
    mac = crypto.add_addr_hmac(a, b, 1, addr, None)
    # an absent port is two zero octets of the message; the keys' order matters
    assert mac == crypto.add_addr_hmac(a, b, 1, addr, 0)
    assert len({mac, crypto.add_addr_hmac(b, a, 1, addr, None), crypto.add_addr_hmac(a, b, 2, addr, None),
                crypto.add_addr_hmac(a, b, 1, addr, 80)}) == 4
    full = crypto.hmac_sha256(a, b, bytes([1]) + addr + b"\0\0")
    assert mac == int.from_bytes(full[-8:], "big")


@pytest.mark.parametrize("kwargs", [{"subflows": 9}, {"add_addr_accepted": -1}, {"subflows": True},
                                    {"subflows": 1.5}])
def test_pm_limits_out_of_bounds_are_refused_naming_the_key(kwargs):
    with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be an integer in 0..8"):
        PmLimits(**kwargs)


def established_wire() -> Wire:
    w = Wire()
    w.pump(until=lambda: w.server is not None and w.client.state == w.server.state == "ESTABLISHED")
    w.pump()
    return w


def test_a_forged_add_addr_is_ignored_and_a_genuine_one_echoed_but_not_joined_under_default_limits():
    w = established_wire()
    sf = w.server.subflows[0]
    sent = []
    w.filter = lambda direction, seg: sent.append((direction, seg)) or seg
    forged = AddAddr(3, "10.9.9.9", None, hmac64=12345)
    sf.send_ack([forged])
    w.pump()
    assert w.client.pm.peer_addrs == {} and w.client.pm.bad_hmac == 1
    assert not any(isinstance(o, AddAddr) for d, s in sent if d == "a->b" for o in s.options)
    mac = crypto.add_addr_hmac(w.server.local_key, w.server.remote_key, 3, socket.inet_aton("10.9.9.9"), None)
    sf.send_ack([AddAddr(3, "10.9.9.9", None, mac)])
    w.pump()
    assert w.client.pm.peer_addrs == {3: PeerAddress(3, "10.9.9.9", None)}
    echoes = [o for d, s in sent if d == "a->b" for o in s.options if isinstance(o, AddAddr)]
    assert echoes == [AddAddr(3, "10.9.9.9", None, None, echo=True)]
    assert len(w.client.subflows) == 1          # PmLimits() accepts no announcement, like the kernel
    assert "announced" in w.a.events


def test_our_add_addr_is_repeated_until_echoed_and_remove_addr_is_sent():
    w = established_wire()
    dropped = []

    def drop_echo(direction, seg):
        if direction == "b->a" and any(isinstance(o, AddAddr) and o.echo for o in seg.options) and not dropped:
            dropped.append(seg)
            return None
        return seg

    w.filter = drop_echo
    addr_id = w.client.pm.announce("10.0.7.1")
    assert addr_id == 1 and w.client.pm.local_id("10.0.0.1") == 0
    w.pump()
    assert dropped and not w.client.pm.announced[1].echoed
    w.client.on_timer(w.client.pm.deadline())   # the echo was lost: the ADD_ADDR goes again
    w.pump()
    assert w.client.pm.announced[1].echoed and w.client.pm.announced[1].tries == 2
    assert w.client.pm.deadline() is None
    assert w.server.pm.peer_addrs[1].addr == "10.0.7.1"
    w.client.pm.withdraw(1)
    w.pump()
    assert w.server.pm.peer_addrs == {} and "removed" in w.b.events


def test_mp_fail_in_a_reset_sends_the_discarded_data_again_on_another_subflow():
    w = established_wire()
    data = os.urandom(50_000)
    with w.lock:
        w.client.tx += data
        w.client.push()
    w.pump()
    assert bytes(w.server.rx) == data
    # Pretend a second subflow exists and the peer discarded from DSN d on: the
    # data must be queued again from there (it was subflow-acknowledged already).
    d = w.client.snd_una - 20_000
    w.client.snd_una = d
    w.client.tx_off -= 20_000
    w.client.joined = True
    sf = w.client.subflows[0]
    w.client._reinject_from(d, sf)
    assert sum(len(p) for _, p in w.client.reinject) == 20_000
    assert w.client.reinject[0][0] == d and b"".join(p for _, p in w.client.reinject) == data[-20_000:]
    seg = TcpSegment(sf.rport, sf.lport, sf.rcv_nxt, sf.snd_nxt, RST | ACK, 0,
                     [MpFail(d), MpTcpRst(RST_MIDDLEBOX)])
    w.client.on_subflow_reset(sf, seg)
    assert sf not in w.client.subflows and w.client.closed_subflows[-1].reset_reason == RST_MIDDLEBOX


def test_transfer_still_intact_with_checksums_and_no_failure():
    w = Wire(checksum=True)
    data = os.urandom(100_000)
    assert transfer(w, data) == data and not w.client.fallback and w.client.fallback_reason is None
