"""User-space MPTCP stack: bad input from the peer and teardown of what the stack creates."""
from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from test_stack_interop import IPPROTO_MPTCP, in_ns, pair  # noqa: F401  (pytest fixture)
from testbed.stack.attach import AttachError
from testbed.stack.options import MpCapable
from testbed.stack.packet import SYN, ACK, RST, IpPacket, Mss, RawOption, TcpSegment, decode_ipv4, encode_ipv4
from testbed.stack.stack import Stack

pytestmark = pytest.mark.root


def raw_exchange(pair, packet: bytes, dst: str, sport: int, wait: float = 1.0) -> list[TcpSegment]:
    """Send a hand-made packet from namespace A and collect the TCP segments coming back to sport."""
    def make():
        tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
        rx.settimeout(0.1)
        return tx, rx

    tx, rx = in_ns(pair.a, make)
    try:
        tx.sendto(packet, (dst, 0))
        got, deadline = [], time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                data = rx.recv(65535)
            except socket.timeout:
                continue
            pkt = decode_ipv4(data, verify_tcp_checksum=False)
            if pkt.tcp.dport == sport:
                got.append(pkt.tcp)
        return got
    finally:
        tx.close()
        rx.close()


def test_malformed_mptcp_option_in_a_syn_gets_plain_tcp_not_a_crash(pair):
    pair.sh_a("nft add table ip t && nft add chain ip t out '{ type filter hook output priority 0; }' && "
              "nft add rule ip t out tcp flags rst drop")   # A's kernel must not reset our probe
    with Stack(pair.b) as st:
        st.listen(5000)
        # MP_CAPABLE with an impossible length (7) and an unknown experimental kind
        bad = RawOption(30, bytes([0x01, 0x81, 0, 0, 0]))
        syn = TcpSegment(40001, 5000, 1000, 0, SYN, 65535, [Mss(1460), bad, RawOption(253, b"\x01\x02")])
        answer = raw_exchange(pair, encode_ipv4(IpPacket("10.0.0.1", "10.0.0.2", syn)), "10.0.0.2", 40001)
        synacks = [s for s in answer if s.flags & SYN and s.flags & ACK]
        assert synacks, answer
        assert synacks[0].option(MpCapable) is None   # the malformed option was ignored: plain TCP
        # a truncated option list is dropped silently and counted
        broken = bytearray(encode_ipv4(IpPacket("10.0.0.1", "10.0.0.2",
                                                TcpSegment(40002, 5000, 1, 0, SYN, 100, [Mss(1460)]))))
        broken[20 + 21] = 40   # MSS option claims 40 bytes
        struct.pack_into("!H", broken, 20 + 16, 0)
        raw_exchange(pair, bytes(broken), "10.0.0.2", 40002, wait=0.3)
        assert st.stats["rx_bad"] >= 1
        assert st.log_lines == [] or all("internal error" not in line for line in st.log_lines)
        # the stack still serves a kernel client afterwards
        c = in_ns(pair.a, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP))
        c.settimeout(5)
        c.connect(("10.0.0.2", 5000))
        c.close()


def test_stray_ack_to_a_stack_port_gets_a_reset(pair):
    pair.sh_a("nft add table ip t && nft add chain ip t out '{ type filter hook output priority 0; }' && "
              "nft add rule ip t out tcp flags rst drop")
    with Stack(pair.b) as st:
        st.listen(5000)
        stray = TcpSegment(40003, 5000, 77, 12345, ACK, 100)
        answer = raw_exchange(pair, encode_ipv4(IpPacket("10.0.0.1", "10.0.0.2", stray)), "10.0.0.2", 40003)
        assert [(s.flags & RST, s.seq) for s in answer] == [(RST, 12345)]


def nft_tables(pair, pid) -> str:
    return pair.sh(pid, "nft list tables")


def test_nft_table_exists_while_attached_and_goes_with_close_and_with_sigkill(pair):
    with Stack(pair.a) as st:
        assert "mptb_stack_" in nft_tables(pair, pair.a)
        assert [i.addr for i in st.interfaces] == ["10.0.0.1", "10.0.1.1"]
    assert "mptb_stack_" not in nft_tables(pair, pair.a)
    # a process killed with SIGKILL cannot clean up: the owner flag makes the kernel do it
    code = ("import sys, time; sys.path.insert(0, %r); from testbed.stack.stack import Stack; "
            "s = Stack(%d); print('ready', flush=True); time.sleep(60)") % (os.getcwd(), pair.a)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert "mptb_stack_" in nft_tables(pair, pair.a)
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        deadline = time.monotonic() + 2
        while "mptb_stack_" in nft_tables(pair, pair.a) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "mptb_stack_" not in nft_tables(pair, pair.a)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_namespace_and_interface_are_one_line_errors(pair):
    with pytest.raises(AttachError, match="cannot enter namespace"):
        Stack("/proc/999999999/ns/net")
    with pytest.raises(AttachError, match="no IPv4 interface nope"):
        Stack(pair.a, interfaces=["nope"])
    assert "mptb_stack_" not in nft_tables(pair, pair.a)
