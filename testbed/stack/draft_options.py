"""What the experimental (draft) options of one TCP segment say, read by the stack's own
codec: the one place that turns a segment's raw option bytes (as tshark's `tcp.options`
field prints them) into ITO's timer, SRL's rate, the private-use flags (ROBE_eSIM_EN,
the privacy extensions) and MP_JOIN_CAP. tshark knows none of these options (they use
MPTCP's private-use subtype 0xf), so captures are decoded here, not by a parser of
the reader's own (the pcap probe's packets table, analysis.esim_wire)."""
from __future__ import annotations

from dataclasses import dataclass

from testbed.stack import esim, inactivity, privacy, rate_limit
from testbed.stack.options import UnknownMptcp
from testbed.stack.packet import DecodeError, decode_tcp_options

FLAGS_NIBBLE = 0            # the private-use flags option (stack/privacy.py, stack/esim.py)
FLAGS_LENGTH = 4


@dataclass(frozen=True)
class DraftOptions:
    """The experimental options of one segment (None / False: not carried)."""
    ito_timer_s: int | None = None               # ITO's inactivity timer (nibble 2)
    srl_kbps: float | None = None                # SRL's requested rate (nibble 3)
    private_flags: int | None = None             # the private-use flags byte (nibble 0)
    join_cap: esim.JoinCap | None = None         # RobE_eSIM's MP_JOIN_CAP (nibble 1)

    @property
    def esim_en(self) -> bool:
        """ROBE_eSIM_EN is set in the segment's private-use flags option."""
        return self.private_flags is not None and esim.esim_enabled(self.private_flags)


def tshark_options(field: str) -> list:
    """A segment's TCP options decoded from tshark's tcp.options value (hex, maybe with
    colons); [] when empty or not a well-formed option list (tshark flags such a packet
    itself)."""
    raw = field.replace(":", "").strip()
    if not raw:
        return []
    try:
        return decode_tcp_options(bytes.fromhex(raw))
    except (ValueError, DecodeError):
        return []


def private_flags(options: list) -> int | None:
    """The flags byte of the private-use flags option (subtype 0xf, nibble 0, 4 bytes), or None."""
    for o in options:
        if isinstance(o, UnknownMptcp) and o.subtype == privacy.PRIVATE_SUBTYPE and \
                len(o.raw) == FLAGS_LENGTH and o.raw[2] & 0xF == FLAGS_NIBBLE:
            return o.raw[3]
    return None


def draft_options(options: list) -> DraftOptions:
    """The experimental options among a segment's decoded options."""
    ito = next((o for o in options if isinstance(o, inactivity.InactivityTime)), None)
    srl = rate_limit.rate_limit_in(options)
    return DraftOptions(ito.timer_s if ito else None, srl.kbps if srl else None,
                        private_flags(options), esim.join_cap_in(options))
