"""Older kernels (Debian 12's 6.1 in the VM): what they lack is detected and
recorded as absent, never read as 0 or silently replaced. Pure tests (the
getsockopt/netlink layers replaced), so they run anywhere; checked against a
real 6.1 kernel in the VM (docs/vagrant.md)."""
from __future__ import annotations

import errno
import struct

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from testbed.mptcp import pm as P
from testbed.mptcp import sockopt as so


def _tcp(acked: int) -> so.TcpInfo:
    return so.TcpInfo(state="ESTABLISHED", ca_state=0, retransmits=0, rto_us=0, snd_mss=1448,
                      unacked=0, lost=0, retrans=0, pmtu=1500, rtt_us=0, rttvar_us=0,
                      snd_ssthresh=0, snd_cwnd=10, total_retrans=0, bytes_acked=acked,
                      bytes_received=0)


A = so.SubflowAddrs(("10.0.1.1", 40000), ("10.0.0.2", 5000))
B = so.SubflowAddrs(("10.0.2.1", 40001), ("10.0.0.2", 5000))


def _refuse(*_a, **_k):
    raise OSError(errno.EOPNOTSUPP, "Operation not supported")


@pytest.fixture(autouse=True)
def _fresh_probe(monkeypatch):
    monkeypatch.setattr(so, "_full_info_supported", None)


def test_without_full_info_pairs_addrs_and_tcpinfo_and_ids_are_absent(monkeypatch):
    monkeypatch.setattr(so, "full_info", _refuse)
    monkeypatch.setattr(so, "subflow_addrs", lambda s: [A, B])
    monkeypatch.setattr(so, "subflow_tcpinfo", lambda s: [_tcp(1), _tcp(2)])
    subs = so.subflows(3)
    assert [(s.id, s.addrs, s.tcp.bytes_acked) for s in subs] == [(None, A, 1), (None, B, 2)]
    assert so.full_info_supported() is False
    # Decided once: no further MPTCP_FULL_INFO attempts.
    monkeypatch.setattr(so, "full_info", lambda s: pytest.fail("probed again"))
    assert len(so.subflows(3)) == 2


def test_fallen_back_socket_is_not_taken_for_a_missing_full_info(monkeypatch):
    monkeypatch.setattr(so, "full_info", _refuse)
    monkeypatch.setattr(so, "subflow_tcpinfo", _refuse)
    with pytest.raises(OSError) as err:
        so.subflows(3)
    assert err.value.errno == errno.EOPNOTSUPP
    assert so.full_info_supported() is None  # nothing learned about the kernel


def test_subflow_list_changing_between_reads_is_retried(monkeypatch):
    monkeypatch.setattr(so, "full_info", _refuse)
    reads = iter([[A], [A, B], [A, B], [A, B]])  # B joins during the first attempt
    monkeypatch.setattr(so, "subflow_addrs", lambda s: next(reads))
    monkeypatch.setattr(so, "subflow_tcpinfo", lambda s: [_tcp(1), _tcp(2)])
    assert [s.addrs for s in so.subflows(3)] == [A, B]


def test_never_consistent_is_an_error_not_a_guess(monkeypatch):
    monkeypatch.setattr(so, "full_info", _refuse)
    flip = iter([[A], [A, B]] * 10)
    monkeypatch.setattr(so, "subflow_addrs", lambda s: next(flip))
    monkeypatch.setattr(so, "subflow_tcpinfo", lambda s: [_tcp(1)])
    with pytest.raises(OSError) as err:
        so.subflows(3, attempts=3)
    assert err.value.errno == errno.EAGAIN


def test_full_info_is_used_where_the_kernel_has_it(monkeypatch):
    sub = so.Subflow(id=1, addrs=A, tcp=_tcp(5))
    info = so.FullInfo(mptcp=None, subflows=[sub], num_subflows=1)  # type: ignore[arg-type]
    monkeypatch.setattr(so, "full_info", lambda s: info)
    monkeypatch.setattr(so, "subflow_addrs", lambda s: pytest.fail("not needed"))
    assert so.subflows(3) == [sub] and so.full_info_supported() is True


def _mptcp_info_bytes(n: int) -> bytes:
    raw = bytearray(96)
    raw[0] = 1  # subflows
    struct.pack_into("=II", raw, 8, 2, 0xABCD)  # flags, token
    struct.pack_into("=I", raw, 44, 3)  # retransmits (6.2+)
    struct.pack_into("=Q", raw, 64, 1000)  # bytes_received (6.2+)
    raw[80] = 2  # subflows_total (6.10+)
    struct.pack_into("=I", raw, 84, 7)  # last_data_sent (6.11+)
    return bytes(raw[:n])


def test_mptcp_info_fields_a_kernel_lacks_are_none_not_zero():
    old = so._decode_mptcp_info(_mptcp_info_bytes(48))  # 6.1: ends after csum_enabled + padding
    assert (old.subflows, old.token, old.remote_key_received) == (1, 0xABCD, True)
    assert old.retransmits is None and old.bytes_received is None and old.subflows_total is None
    mid = so._decode_mptcp_info(_mptcp_info_bytes(88))  # 6.10
    assert (mid.retransmits, mid.bytes_received, mid.subflows_total) == (3, 1000, 2)
    assert mid.last_data_sent is None  # would sit in 6.10's tail padding
    new = so._decode_mptcp_info(_mptcp_info_bytes(96))
    assert new.last_data_sent == 7


def _nested_types(msg) -> list[int]:
    msg.encode()
    data, off, types = msg.data, 20, []  # nlmsghdr 16 + genlmsghdr 4
    while off < len(data):
        length, typ = struct.unpack_from("=HH", data, off)
        types.append(typ)
        off += (length + 3) & ~3
    return types


def test_pm_command_nests_carry_nla_f_nested():
    # 6.1 validates the userspace-PM commands strictly: without the flag every
    # subflow-create/announce/set-flags fails with EINVAL "NLA_F_NESTED is missing".
    msg = P.pm_cmd_msg()
    msg["cmd"], msg["version"] = P.CMD["subflow_create"], P.VERSION
    msg["attrs"] = [("MPTCP_PM_ATTR_TOKEN", 5),
                    ("MPTCP_PM_ATTR_ADDR", P._addr("10.2.0.1", id=2)),
                    ("MPTCP_PM_ATTR_ADDR_REMOTE", P._addr("10.100.0.2", port=5600))]
    assert _nested_types(msg) == [4, 0x8000 | 1, 0x8000 | 6]


def test_pm_error_carries_the_kernels_extack_text(monkeypatch):
    def refuse(pid, fn):
        raise NetlinkError(22, "NLA_F_NESTED is missing")

    monkeypatch.setattr(P, "run_in_netns", refuse)
    with pytest.raises(P.PMError, match="kernel: NLA_F_NESTED is missing") as err:
        P.UserspacePM(1).remove(123, 2)
    assert err.value.errno == 22
