"""RobE_eSIM's options on the wire: tshark knows neither ROBE_eSIM_EN nor
MP_JOIN_CAP, so each TCP segment's raw option bytes (tshark's tcp.options field)
are decoded by the user-space stack's own codec (testbed.stack.draft_options, the
one reader of the drafts' options); no packet parser here."""
from __future__ import annotations

import subprocess

import pandas as pd

from testbed.stack.draft_options import draft_options, tshark_options
from testbed.stack.options import MpCapable, MpTcpRst

FIELDS = ["frame.time_epoch", "ip.src", "tcp.srcport", "ip.dst", "tcp.dstport", "tcp.flags.syn",
          "tcp.flags.ack", "tcp.flags.reset", "tcp.flags.fin", "tcp.options"]


def esim_segments(pcap: str) -> pd.DataFrame:
    """One row per TCP segment of the capture: addresses, flags, MP_CAPABLE keys, whether it
    carries ROBE_eSIM_EN, MP_JOIN_CAP's address ID, Key-A and tag when present, and the
    reason of an MP_TCPRST."""
    cmd = ["tshark", "-r", pcap, "-T", "fields", "-E", "separator=|"]
    for f in FIELDS:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    rows = []
    for line in out.splitlines():
        t, src, sport, dst, dport, syn, ack, rst, fin, raw = line.split("|")
        opts = tshark_options(raw)
        cap = next((o for o in opts if isinstance(o, MpCapable)), None)
        drafts = draft_options(opts)
        jc = drafts.join_cap
        reset = next((o for o in opts if isinstance(o, MpTcpRst)), None)
        rows.append({"t": float(t), "src": src, "sport": int(sport), "dst": dst, "dport": int(dport),
                     "syn": syn == "1", "ack": ack == "1", "rst": rst == "1", "fin": fin == "1",
                     "mpc_sender_key": None if cap is None else cap.sender_key,
                     "mpc_receiver_key": None if cap is None else cap.receiver_key,
                     "esim_en": drafts.esim_en,
                     "join_cap_addr_id": None if jc is None else jc.addr_id,
                     "join_cap_key_a": None if jc is None else jc.key_a,
                     "join_cap_tag": None if jc is None else jc.tag,
                     "mptcp_rst_reason": None if reset is None else reset.reason})
    df = pd.DataFrame(rows)
    # 64-bit keys and tags exactly (a float column would round them: None makes pandas choose float64)
    for col in ("mpc_sender_key", "mpc_receiver_key", "join_cap_key_a", "join_cap_tag"):
        if col in df:
            df[col] = pd.array([None if r[col] is None else r[col] for r in rows], dtype="UInt64")
    return df
