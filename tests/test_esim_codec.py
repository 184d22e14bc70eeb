"""RobE_eSIM's options on the user-space stack (no root): MP_JOIN_CAP round
trip through the stack's codec, the tag's Key-B hint and HMAC, pluggable choices."""
from __future__ import annotations

import pytest

from testbed.stack import esim
from testbed.stack.crypto import new_key
from testbed.stack.options import decode_mptcp, encode_mptcp


def keys():
    return new_key(), new_key(), new_key(), new_key()


def test_join_cap_round_trips_through_the_codec_and_is_20_bytes():
    a, b, la, lb = keys()
    crypto = esim.EsimCrypto()
    raw = encode_mptcp(esim.join_cap_option(3, a, crypto.tag(a, b, lb)))
    assert len(raw) == esim.JOIN_CAP_LEN and raw[2] == 0xF1
    cap = esim.join_cap_in([decode_mptcp(raw)])
    assert (cap.addr_id, cap.key_a) == (3, a) and crypto.check(cap.tag, a, b, lb)


def test_tag_carries_the_key_b_hint_and_a_wrong_tag_or_key_is_refused():
    a, b, la, lb = keys()
    crypto = esim.EsimCrypto()
    tag = crypto.tag(a, b, lb)
    assert tag & 0x3FF == esim.crc16_ccitt_false(b.to_bytes(8, "big")) & 0x3FF
    assert not crypto.check(tag ^ (1 << 40), a, b, lb)      # hint right, HMAC wrong
    assert not crypto.check(tag, a, b, lb ^ 1)               # bound to the losing attempt's keys
    assert not crypto.check(tag, a, new_key(), lb)           # another connection's Key-B


def test_crc_is_the_standard_ccitt_false():
    assert esim.crc16_ccitt_false(b"123456789") == 0x29B1     # the catalogue's check value


def test_choices_are_pluggable_named_and_refused_when_unknown():
    a, b, la, lb = keys()
    alt = esim.EsimCrypto(hash="sha512", crc="crc32")
    assert alt.check(alt.tag(a, b, lb), a, b, lb)
    assert alt.tag(a, b, lb) != esim.EsimCrypto().tag(a, b, lb)
    assert esim.EsimCrypto().describe()["crc"] == "crc16-ccitt-false"
    with pytest.raises(ValueError, match="esim hash"):
        esim.EsimCrypto(hash="md5")


def test_other_private_use_options_are_no_join_cap():
    from testbed.stack import privacy
    assert esim.join_cap_in([privacy.request_option(privacy.FLAG_DSN_OFFSET | esim.FLAG_ESIM)]) is None
    assert esim.esim_enabled(privacy.requested([privacy.request_option(esim.FLAG_ESIM)]))


def test_forged_join_caps_pass_the_hint_one_in_1024_and_the_hmac_never():
    # An attacker who saw the winner's Key-A (it travels in clear on the losing path)
    # guesses tags: the 10-bit hint lets ~1/1024 through to the HMAC, which refuses them all.
    import os
    a, b, _, lb = keys()
    crypto = esim.EsimCrypto()
    n = 20_000
    tags = [int.from_bytes(os.urandom(8), "big") for _ in range(n)]
    hint = sum(1 for t in tags if t & 0x3FF == crypto.key_b_hint(b))
    accepted = sum(1 for t in tags if crypto.check(t, a, b, lb))
    assert accepted == 0 and 3 <= hint <= 50, (hint, accepted)   # expected hint passes: 19.5
