"""User-space MPTCP stack: codec and crypto, checked against published vectors and tshark."""
from __future__ import annotations

import shutil
import struct

import pytest

from testbed.stack import crypto
from testbed.stack.options import (CAP_A_CHECKSUM, CAP_H_SHA256, AddAddr, Dss, MpCapable, MpFail,
                                   MpFastclose, MpJoinAck, MpJoinSyn, MpJoinSynAck, MpPrio, MpTcpRst,
                                   RemoveAddr, UnknownMptcp, decode_mptcp, encode_mptcp)
from testbed.stack.packet import (ACK, PSH, SYN, DecodeError, IpPacket, Mss, RawOption, Sack,
                                  SackPermitted, TcpSegment, Timestamps, WindowScale, decode_ipv4,
                                  decode_tcp_options, encode_ipv4, encode_tcp_options)
from testbed.stack.trace import dissect, write_pcap

# net/mptcp/crypto_test.c: key and message are the ASCII bytes of the strings
# (the kernel reads them as two be64 keys and two be32 nonces).
KERNEL_HMAC_VECTORS = [
    ("0b0b0b0b0b0b0b0b", "48692054", "8385e24fb4235ac37556b6b886db106284a1da671699f46db1f235ec622dcafa"),
    ("aaaaaaaaaaaaaaaa", "dddddddd", "2c5e219164ff1dca1c4a92318d847bb6b9d44492984e1eb71aff9022f71046e9"),
    ("0102030405060708", "cdcdcdcd", "e73b9ba9969969cefb04aa0d6df18ec2fcc075b6f23b4d8c4da736a5dbbc6e7d"),
]


@pytest.mark.parametrize("key,msg,expected", KERNEL_HMAC_VECTORS)
def test_hmac_matches_kernel_crypto_test_vectors(key, msg, expected):
    k1, k2 = struct.unpack("!QQ", key.encode())
    assert crypto.hmac_sha256(k1, k2, msg.encode()).hex() == expected


@pytest.mark.parametrize("key,msg,expected", KERNEL_HMAC_VECTORS)
def test_join_hmac_truncations_are_the_leftmost_bits(key, msg, expected):
    k1, k2 = struct.unpack("!QQ", key.encode())
    n1, n2 = struct.unpack("!II", msg.encode())
    assert crypto.join_synack_hmac(k1, k2, n1, n2) == int(expected[:16], 16)
    assert crypto.join_ack_hmac(k1, k2, n1, n2).hex() == expected[:40]


def test_token_and_idsn_are_the_two_ends_of_sha256():
    key = 0x0102030405060708
    import hashlib
    digest = hashlib.sha256(bytes.fromhex("0102030405060708")).digest()
    assert crypto.token_of(key) == int.from_bytes(digest[:4], "big")
    assert crypto.idsn_of(key) == int.from_bytes(digest[24:], "big")
    assert crypto.token_of(key) == 0x66840DDA  # also what tshark derives (below)


def test_checksum_matches_a_word_loop():
    import random
    rng = random.Random(7)
    for n in (0, 1, 2, 3, 20, 1499, 1500):
        data = bytes(rng.randrange(256) for _ in range(n))
        padded = data + b"\0" * (n & 1)
        s = 0
        for i in range(0, len(padded), 2):
            s += (padded[i] << 8) | padded[i + 1]
            s = (s & 0xFFFF) + (s >> 16)
        assert crypto.internet_checksum(data) == (~s) & 0xFFFF
    # a buffer that already holds its checksum sums to zero
    assert crypto.internet_checksum(b"\x12\x34" + struct.pack("!H", crypto.internet_checksum(b"\x12\x34"))) == 0


def test_dss_checksum_covers_pseudo_header_and_payload():
    a = crypto.dss_checksum(1, 1, 5, b"hello")
    assert a != crypto.dss_checksum(2, 1, 5, b"hello")
    assert a != crypto.dss_checksum(1, 2, 5, b"hello")
    assert a != crypto.dss_checksum(1, 1, 5, b"hellp")
    pseudo = struct.pack("!QIHH", 1, 1, 5, a)
    assert crypto.internet_checksum(pseudo + b"hello") == 0


ROUND_TRIP = [
    (MpCapable(CAP_H_SHA256 | CAP_A_CHECKSUM), 4),
    (MpCapable(CAP_H_SHA256, sender_key=0x1122334455667788), 12),
    (MpCapable(CAP_H_SHA256, sender_key=1, receiver_key=2), 20),
    (MpCapable(CAP_H_SHA256, sender_key=1, receiver_key=2, data_len=100), 22),
    (MpCapable(CAP_H_SHA256 | CAP_A_CHECKSUM, sender_key=1, receiver_key=2, data_len=100, checksum=0xBEEF), 24),
    (MpJoinSyn(token=0xDEADBEEF, nonce=0x12345678, addr_id=3, backup=True), 12),
    (MpJoinSynAck(hmac64=0x0102030405060708, nonce=7, addr_id=2), 16),
    (MpJoinAck(bytes(range(20))), 24),
    (Dss(data_ack=1 << 40), 12),
    (Dss(data_ack=5, data_ack64=False), 8),
    (Dss(dsn=1 << 63, subflow_seq=1, data_len=1400), 18),
    (Dss(dsn=7, dsn64=False, subflow_seq=1, data_len=1400), 14),
    (Dss(data_ack=9, dsn=1 << 50, subflow_seq=77, data_len=3, checksum=0x1234), 28),
    (Dss(data_ack=9, dsn=10, subflow_seq=0, data_len=1, data_fin=True), 26),
    (AddAddr(addr_id=2, addr="10.2.0.1", hmac64=42), 16),
    (AddAddr(addr_id=2, addr="10.2.0.1", port=8080, echo=True), 10),
    (RemoveAddr((1, 2, 3)), 6),
    (MpPrio(backup=True), 3),
    (MpFail(dsn=99), 12),
    (MpFastclose(receiver_key=0xCAFE), 12),
    (MpTcpRst(reason=4, flags=1), 4),
]


@pytest.mark.parametrize("opt,length", ROUND_TRIP, ids=lambda v: type(v).__name__ if not isinstance(v, int) else str(v))
def test_mptcp_option_round_trip(opt, length):
    raw = encode_mptcp(opt)
    assert raw[0] == 30 and raw[1] == length == len(raw)
    assert decode_mptcp(raw) == opt


def test_unknown_subtype_and_bad_lengths_are_kept_not_raised():
    exp = bytes([30, 5, 0xF0, 1, 2])
    assert decode_mptcp(exp) == UnknownMptcp(0xF, exp)
    assert encode_mptcp(decode_mptcp(exp)) == exp
    bad_cap = bytes([30, 7, 0x01, 0x01, 0, 0, 0])
    assert isinstance(decode_mptcp(bad_cap), UnknownMptcp)
    bad_dss = bytes([30, 9, 0x20, 0x01, 0, 0, 0, 0, 0])  # DATA_ACK32 needs length 8
    assert isinstance(decode_mptcp(bad_dss), UnknownMptcp)
    assert isinstance(decode_mptcp(bytes([30, 2])), UnknownMptcp)


def test_tcp_options_round_trip_and_unknown_kinds_preserved():
    opts = [Mss(1460), SackPermitted(), Timestamps(123, 456), WindowScale(7), RawOption(254, b"\x12\x34")]
    assert decode_tcp_options(encode_tcp_options(opts)) == opts
    assert decode_tcp_options(encode_tcp_options([Sack(((1, 2), (3, 4)))])) == [Sack(((1, 2), (3, 4)))]
    with pytest.raises(DecodeError):
        decode_tcp_options(bytes([2, 9, 0, 0]))
    with pytest.raises(ValueError):
        encode_tcp_options([Timestamps(1, 2), Dss(data_ack=1, dsn=2, subflow_seq=3, data_len=4, checksum=5),
                            Mss(1)])


def test_ipv4_round_trip_and_checksum_verified():
    seg = TcpSegment(40000, 80, 1, 2, ACK | PSH, 512, [Timestamps(1, 2), Dss(data_ack=3)], b"payload")
    raw = encode_ipv4(IpPacket("10.0.0.1", "10.0.0.2", seg, ident=9))
    pkt = decode_ipv4(raw)
    assert (pkt.src, pkt.dst, pkt.ident) == ("10.0.0.1", "10.0.0.2", 9)
    assert pkt.tcp == seg
    corrupt = raw[:-1] + bytes([raw[-1] ^ 1])
    with pytest.raises(DecodeError):
        decode_ipv4(corrupt)
    with pytest.raises(DecodeError):
        decode_ipv4(raw[:30])


needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")


@needs_tshark
def test_tshark_reads_what_the_codec_meant(tmp_path):
    key_c, key_s = 0x0102030405060708, 0x1111222233334444
    payload = b"hello world"
    dsn = crypto.idsn_of(key_c) + 1
    segs = [
        TcpSegment(40000, 80, 1000, 0, SYN, 64240,
                   [Mss(1460), SackPermitted(), Timestamps(1, 0), WindowScale(7),
                    MpCapable(CAP_H_SHA256 | CAP_A_CHECKSUM)]),
        TcpSegment(80, 40000, 5000, 1001, SYN | ACK, 64240,
                   [Mss(1460), Timestamps(2, 1), MpCapable(CAP_H_SHA256 | CAP_A_CHECKSUM, sender_key=key_s)]),
        TcpSegment(40000, 80, 1001, 5001, ACK | PSH, 502,
                   [Timestamps(3, 2), MpCapable(CAP_H_SHA256 | CAP_A_CHECKSUM, key_c, key_s, len(payload),
                                                crypto.dss_checksum(dsn, 1, len(payload), payload))], payload),
        TcpSegment(80, 40000, 5001, 1012, ACK | PSH, 502,
                   [Timestamps(4, 3), Dss(data_ack=dsn + len(payload), dsn=crypto.idsn_of(key_s) + 1,
                                          subflow_seq=1, data_len=2,
                                          checksum=crypto.dss_checksum(crypto.idsn_of(key_s) + 1, 1, 2, b"ok"))],
                   b"ok"),
        TcpSegment(40000, 80, 1012, 5003, ACK, 502,
                   [MpJoinSyn(token=crypto.token_of(key_s), nonce=5, addr_id=1, backup=True)]),
        TcpSegment(40000, 80, 1012, 5003, ACK, 502, [MpTcpRst(reason=2, flags=1)]),
        TcpSegment(40000, 80, 1012, 5003, ACK, 502, [MpFastclose(key_s)]),
    ]
    path = tmp_path / "codec.pcap"
    write_pcap(path, [encode_ipv4(IpPacket("10.0.0.1", "10.0.0.2", s)) for s in segs])
    rows = dissect(path, ["tcp.options.mptcp.subtype", "tcp.options.mptcp.sendkey", "tcp.options.mptcp.recvkey",
                          "mptcp.expected_token", "mptcp.expected_idsn", "tcp.options.mptcp.datalvllen",
                          "tcp.options.mptcp.checksum", "tcp.options.mptcp.rawdataseqno",
                          "tcp.options.mptcp.rawdataack", "tcp.options.mptcp.recvtok",
                          "tcp.options.mptcp.backup.flag", "tcp.options.mptcp.rst_reason",
                          "tcp.options.mptcp.checksumreq.flags", "tcp.checksum.status"],
                   check_tcp_checksum=True)
    assert len(rows) == len(segs)
    for r in rows:
        assert not r.malformed and not r.expert_errors, r
        assert r.get("tcp.checksum.status") == ["1"], r  # 1 = good
    assert rows[0].get("tcp.options.mptcp.checksumreq.flags") == ["1"]
    assert rows[1].get("tcp.options.mptcp.sendkey") == [str(key_s)]
    assert rows[1].get("mptcp.expected_token") == [str(crypto.token_of(key_s))]
    assert rows[1].get("mptcp.expected_idsn") == [str(crypto.idsn_of(key_s))]
    assert rows[2].get("tcp.options.mptcp.recvkey") == [str(key_s)]
    assert rows[2].get("tcp.options.mptcp.datalvllen") == [str(len(payload))]
    assert rows[3].get("tcp.options.mptcp.rawdataseqno") == [str(crypto.idsn_of(key_s) + 1)]
    assert rows[3].get("tcp.options.mptcp.rawdataack") == [str(dsn + len(payload))]
    assert rows[4].get("tcp.options.mptcp.recvtok") == [str(crypto.token_of(key_s))]
    assert rows[4].get("tcp.options.mptcp.backup.flag") == ["1"]
    assert rows[5].get("tcp.options.mptcp.rst_reason") == ["0x02"]
    assert rows[6].get("tcp.options.mptcp.recvkey") == [str(key_s)]


@needs_tshark
def test_capture_check_reports_a_field_the_wire_does_not_carry(tmp_path):
    from testbed.stack.stack import SentSegment
    from testbed.stack.trace import check_capture
    seg = TcpSegment(61000, 80, 1000, 5, ACK, 100, [Timestamps(7, 1), Dss(data_ack=42, dsn=9, subflow_seq=1,
                                                                          data_len=3)], b"abc")
    path = tmp_path / "one.pcap"
    write_pcap(path, [encode_ipv4(IpPacket("10.0.0.1", "10.0.0.2", seg))])
    assert check_capture(path, [SentSegment(0, "10.0.0.1", "10.0.0.2", seg)]) == []
    lie = TcpSegment(61000, 80, 1000, 5, ACK, 100, [Timestamps(7, 1), Dss(data_ack=43, dsn=9, subflow_seq=1,
                                                                          data_len=3)], b"abc")
    problems = check_capture(path, [SentSegment(0, "10.0.0.1", "10.0.0.2", lie)])
    assert len(problems) == 1 and "rawdataack dissected [42], stack sent [43]" in problems[0]
