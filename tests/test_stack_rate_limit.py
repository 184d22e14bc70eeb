"""The subflow rate-limit option (SRL) of the user-space stack, without namespaces (no root):
codec round trips and malformed forms, the sender's token bucket and cwnd clamp, the
requester's resend rule, and a request carried through the real codec between two
in-memory connections."""
from __future__ import annotations

import math
import struct

import pytest

from testbed.stack import privacy
from testbed.stack.options import KIND, Dss, UnknownMptcp, decode_mptcp, encode_mptcp
from testbed.stack.packet import decode_tcp_options, encode_tcp_options
from testbed.stack.rate_limit import (LENGTH, MAX_SENDS, NIBBLE, RateRequest, SubflowLimiter, SubflowRateLimit,
                                      rate_limit_in)


@pytest.mark.parametrize("kbps", [0.0, 2000.0, 1.5, 123456.789, math.inf])
def test_round_trip(kbps):
    opt = SubflowRateLimit(kbps)
    raw = encode_mptcp(opt)
    assert len(raw) == LENGTH == raw[1] and raw[0] == KIND and raw[2] == 0xF0 | NIBBLE
    back = decode_mptcp(raw)
    assert back == opt and back.kbps == struct.unpack("!f", struct.pack("!f", kbps))[0]
    # among other options in a TCP header, through the TCP option codec
    opts = decode_tcp_options(encode_tcp_options([Dss(data_ack=5), opt]))
    assert rate_limit_in(opts) == opt


@pytest.mark.parametrize("raw", [
    bytes([KIND, 5, 0xF3, 0, 0]),                                     # the draft figure's length
    bytes([KIND, 8, 0xF3]) + struct.pack("!f", 2000.0) + b"\0",       # one byte too many
    bytes([KIND, 7, 0xF3]) + struct.pack("!f", math.nan),
    bytes([KIND, 7, 0xF3]) + struct.pack("!f", -1.0),
    bytes([KIND, 7, 0xF3]) + b"\0\0",                                 # truncated
])
def test_malformed_stays_unknown(raw):
    assert isinstance(decode_mptcp(raw), UnknownMptcp)


def test_refused_values():
    for bad in (-1, math.nan, 1e39):
        with pytest.raises(ValueError, match="SRL rate"):
            SubflowRateLimit(bad)


def test_srl_is_not_read_as_the_private_flags_option():
    assert privacy.requested([SubflowRateLimit(2000.0)]) == 0


def test_token_bucket_paces_at_the_rate():
    mss = 1000
    lim = SubflowLimiter(800.0, mss, "pacing", now=0.0)      # 100 000 bytes/s
    sent, t = 0, 0.0
    while t < 2.0:
        while lim.allows(mss, 0, 0.05, now=t):
            lim.consume(mss, now=t)
            sent += mss
        t += 0.001
    assert abs(sent / 2.0 - 100_000) / 100_000 < 0.02
    assert lim.deadline() is not None and lim.deadline() > t - 0.001


def test_rate_zero_and_cwnd_clamp():
    assert not SubflowLimiter(0.0, 1000, "pacing").allows(1000, 0, 0.05)
    assert not SubflowLimiter(0.0, 1000, "cwnd").allows(1000, 0, 0.05)
    clamp = SubflowLimiter(800.0, 1000, "cwnd")             # rate x srtt = 100 000 x 0.05 = 5000 bytes
    assert clamp.allows(1000, 4000, 0.05) and not clamp.allows(1000, 4500, 0.05)
    with pytest.raises(ValueError, match="enforcement"):
        SubflowLimiter(1.0, 1000, "police")


def test_request_resends_until_honoured_at_most_three_times():
    ignored = RateRequest(2000.0)
    ignored.sent(0.0, 0)
    verdicts = []
    for k in range(1, 6):
        if ignored.due() is None:
            break
        verdict = ignored.check(float(k), 5_000_000 * k, 1400)     # 40 Mbit/s keeps arriving
        verdicts.append(verdict)
        if verdict == "resend":
            ignored.sent(float(k), 5_000_000 * k)
    assert verdicts == ["resend", "resend", "given_up"] and ignored.sends == MAX_SENDS
    honoured = RateRequest(2000.0)
    honoured.sent(0.0, 0)
    assert honoured.check(1.0, 250_000, 1400) == "honoured" and honoured.due() is None


def test_request_over_the_wire_stops_new_data():
    from tests.test_stack_engine import Wire
    wire = Wire()
    wire.pump(until=lambda: wire.client.state == "ESTABLISHED" and wire.server is not None
              and wire.server.state == "ESTABLISHED")
    wire.pump()
    assert wire.client.request_rate_limit("10.0.0.1", 0) == 1
    wire.pump()
    (sf,) = wire.server.subflows
    assert sf.srl_limiter is not None and sf.srl_limiter.kbps == 0.0
    assert wire.server.info().subflows[0].rate_limit_enforced_kbps == 0.0
    assert wire.client.info().subflows[0].rate_limit_requested_kbps == 0.0
    assert "sf_rate_limit" in wire.b.events and "sf_rate_limit_requested" in wire.a.events
    before = sf.stats.bytes_sent
    wire.server.tx += b"x" * 10_000
    wire.pump()
    assert sf.stats.bytes_sent == before         # nothing new on the only subflow, limited to 0
    wire.client.request_rate_limit("10.0.0.1", math.inf)
    wire.pump(until=lambda: sf.stats.bytes_sent - before >= 10_000)
    assert sf.srl_limiter is None and sf.stats.bytes_sent - before >= 10_000
