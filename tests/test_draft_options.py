"""The experimental (draft) options read from a segment's raw option bytes as tshark
prints them (testbed.stack.draft_options; no root): ITO, SRL, the private-use flags
with ROBE_eSIM_EN, MP_JOIN_CAP, and nothing of them in an RFC 8684 segment."""
from __future__ import annotations

from testbed.stack import esim, privacy
from testbed.stack.draft_options import DraftOptions, draft_options, tshark_options
from testbed.stack.inactivity import InactivityTime
from testbed.stack.options import Dss, MpCapable
from testbed.stack.packet import Timestamps, encode_tcp_options
from testbed.stack.rate_limit import SubflowRateLimit


def tshark_field(options: list) -> str:
    """The options' bytes as tshark's tcp.options field prints them (colon-separated hex)."""
    return ":".join(f"{b:02x}" for b in encode_tcp_options(options))


def test_ito_and_srl_with_a_dss_and_timestamps():
    d = draft_options(tshark_options(tshark_field([Timestamps(1, 2), Dss(data_ack=7), InactivityTime(120),
                                                   SubflowRateLimit(2000)])))
    assert d == DraftOptions(ito_timer_s=120, srl_kbps=2000.0) and not d.esim_en


def test_esim_en_in_a_syn_and_join_cap_on_a_final_ack():
    syn = draft_options(tshark_options(tshark_field([MpCapable(), privacy.request_option(esim.FLAG_ESIM)])))
    assert syn.esim_en and syn.private_flags == esim.FLAG_ESIM and syn.join_cap is None
    # MP_JOIN_CAP's address ID (here 4) sits where the flags byte would: it is not ROBE_eSIM_EN
    ack = draft_options(tshark_options(tshark_field([esim.join_cap_option(4, 0x1122334455667788, 99)])))
    assert ack.join_cap is not None and ack.join_cap.addr_id == 4 and ack.join_cap.key_a == 0x1122334455667788
    assert not ack.esim_en and ack.private_flags is None
    assert privacy.requested([esim.join_cap_option(4, 1, 2)]) == 0


def test_plain_segments_and_garbage_carry_no_draft_option():
    assert draft_options(tshark_options(tshark_field([Dss(data_ack=1)]))) == DraftOptions()
    assert tshark_options("") == [] and tshark_options("02:09") == [] and tshark_options("zz") == []
