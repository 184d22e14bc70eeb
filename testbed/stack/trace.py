"""Packet traces as an independent oracle: write pcaps, dissect them with tshark.

Used by the tests (and later the conformance mode) to check that what the stack
put on the wire is what tshark's MPTCP dissector reads back, with no packet
flagged malformed and no expert error.
"""
from __future__ import annotations

import json
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

LINKTYPE_RAW = 101  # packets start at the IP header

# tshark expert severities (epan/proto.h): PI_ERROR is 0x00800000.
EXPERT_ERROR = 0x00800000


class TraceError(RuntimeError):
    """tshark failed or is missing."""


def write_pcap(path: str | Path, packets: list[bytes], times: list[float] | None = None) -> None:
    """Write raw IPv4 packets to a pcap file, at the given wall-clock times (default:
    now, one microsecond apart)."""
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_RAW))
        t0 = time.time()
        for i, pkt in enumerate(packets):
            ts = times[i] if times is not None else t0 + i * 1e-6
            f.write(struct.pack("<IIII", int(ts), int((ts % 1) * 1e6), len(pkt), len(pkt)))
            f.write(pkt)


@dataclass
class Dissected:
    """One packet as tshark read it: requested fields (lists of strings) and flags."""
    number: int
    fields: dict[str, list[str]]
    malformed: bool
    expert_errors: list[str]

    def get(self, name: str) -> list[str]:
        """Values of one field (empty list when absent)."""
        return self.fields.get(name, [])


def dissect(path: str | Path, fields: list[str], display_filter: str = "",
            check_tcp_checksum: bool = False, data_ports: set[int] | frozenset = frozenset(),
            timeout: float = 60) -> list[Dissected]:
    """Run tshark over a pcap and return the requested fields of every packet.

    check_tcp_checksum only suits packets the stack wrote itself: a live capture
    holds kernel packets whose checksum the NIC (here: veth offload) never filled in.
    """
    extra = ["_ws.malformed", "_ws.expert.severity", "_ws.expert.message", "frame.number"]
    cmd = ["tshark", "-n", "-r", str(path), "-T", "json", "-o", "mptcp.analyze_mappings:TRUE",
           "-o", "mptcp.relative_sequence_numbers:FALSE"]
    if check_tcp_checksum:
        cmd += ["-o", "tcp.check_checksum:TRUE"]
    # Random test payload on a port some dissector claims (5000: GSM over IP)
    # would be parsed as that protocol and flagged malformed: read it as data.
    for port in sorted(data_ports):
        cmd += ["-d", f"tcp.port=={port},data"]
    if display_filter:
        cmd += ["-Y", display_filter]
    for f in dict.fromkeys(fields + extra):
        cmd += ["-e", f]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TraceError(f"tshark failed: {exc}") from exc
    if out.returncode != 0:
        raise TraceError(f"tshark failed: {out.stderr.strip()[:300]}")
    result = []
    for item in json.loads(out.stdout or "[]"):
        layers = item["_source"]["layers"]
        sev = [int(s, 0) for s in layers.get("_ws.expert.severity", [])]
        msgs = layers.get("_ws.expert.message", [])
        errors = [m for s, m in zip(sev, msgs + [""] * len(sev)) if s >= EXPERT_ERROR]
        result.append(Dissected(int(layers["frame.number"][0]), layers,
                                bool(layers.get("_ws.malformed")), errors))
    return result


# --------------------------------------------------------------------------- what the stack meant
MPTCP_FIELDS = ["tcp.options.mptcp.subtype", "tcp.options.mptcp.version", "tcp.options.mptcp.sendkey",
                "tcp.options.mptcp.recvkey", "tcp.options.mptcp.datalvllen", "tcp.options.mptcp.checksum",
                "tcp.options.mptcp.recvtok", "tcp.options.mptcp.sendrand", "tcp.options.mptcp.addrid",
                "tcp.options.mptcp.backup.flag", "tcp.options.mptcp.sendtrunchmac", "tcp.options.mptcp.sendhmac",
                "tcp.options.mptcp.rawdataack", "tcp.options.mptcp.rawdataseqno",
                "tcp.options.mptcp.subflowseqno", "tcp.options.mptcp.datafin.flag",
                "tcp.options.mptcp.rst_reason", "tcp.options.mptcp.checksumreq.flags", "tcp.options.mptcp.echo",
                "tcp.options.mptcp.ipv4", "tcp.options.mptcp.port", "tcp.options.mptcp.addaddrtrunchmac"]
MATCH_FIELDS = ["ip.src", "tcp.srcport", "tcp.seq_raw", "tcp.ack_raw", "tcp.len", "tcp.flags",
                "tcp.options.timestamp.tsval"]


def expected_mptcp_fields(seg) -> dict[str, list[int | str]]:
    """The tshark MPTCP field values a segment's options must dissect to."""
    from testbed.stack import options as o
    out: dict[str, list[int | str]] = {}

    def put(name: str, value) -> None:
        out.setdefault("tcp.options.mptcp." + name, []).append(value)

    for opt in seg.options:
        if isinstance(opt, o.MpCapable):
            put("subtype", o.MP_CAPABLE)
            put("version", opt.version)
            put("checksumreq.flags", 1 if opt.flags & o.CAP_A_CHECKSUM else 0)
            if opt.sender_key is not None:
                put("sendkey", opt.sender_key)
            if opt.receiver_key is not None:
                put("recvkey", opt.receiver_key)
            if opt.data_len is not None:
                put("datalvllen", opt.data_len)
            if opt.checksum is not None:
                put("checksum", opt.checksum)
        elif isinstance(opt, o.MpJoinSyn):
            put("subtype", o.MP_JOIN)
            put("recvtok", opt.token)
            put("sendrand", opt.nonce)
            put("addrid", opt.addr_id)
            put("backup.flag", int(opt.backup))
        elif isinstance(opt, o.MpJoinSynAck):
            put("subtype", o.MP_JOIN)
            put("sendtrunchmac", opt.hmac64)
            put("sendrand", opt.nonce)
            put("addrid", opt.addr_id)
            put("backup.flag", int(opt.backup))
        elif isinstance(opt, o.MpJoinAck):
            put("subtype", o.MP_JOIN)
            put("sendhmac", opt.hmac160.hex())
        elif isinstance(opt, o.Dss):
            put("subtype", o.DSS)
            put("datafin.flag", int(opt.data_fin))
            if opt.data_ack is not None:
                put("rawdataack", opt.data_ack)
            if opt.dsn is not None:
                put("rawdataseqno", opt.dsn)
                put("subflowseqno", opt.subflow_seq)
                put("datalvllen", opt.data_len)
                # tshark 4.0 does not dissect the DSS checksum field (it accepts the
                # 2 extra bytes silently); the kernel peer verifies it instead
                # (MPTcpExtDataCsumErr stays 0 in the interop tests).
        elif isinstance(opt, o.MpTcpRst):
            put("subtype", o.MP_TCPRST)
            put("rst_reason", opt.reason)
        elif isinstance(opt, o.MpFastclose):
            put("subtype", o.MP_FASTCLOSE)
            put("recvkey", opt.receiver_key)
        elif isinstance(opt, o.AddAddr):
            put("subtype", o.ADD_ADDR)
            put("addrid", opt.addr_id)
            put("echo", int(opt.echo))
            put("ipv4", opt.addr)
            if opt.port is not None:
                put("port", opt.port)
            if opt.hmac64 is not None and not opt.echo:
                put("addaddrtrunchmac", opt.hmac64)
        elif isinstance(opt, o.RemoveAddr):
            put("subtype", o.REMOVE_ADDR)
            for addr_id in opt.addr_ids:
                put("addrid", addr_id)
        elif isinstance(opt, o.MpPrio):
            put("subtype", o.MP_PRIO)
            put("backup.flag", int(opt.backup))
        elif isinstance(opt, o.MpFail):
            put("subtype", o.MP_FAIL)
            put("rawdataseqno", opt.dsn)
        elif hasattr(opt, "to_bytes"):
            # a private-use option (subtype 0xf: ITO, SRL): tshark 4.0 dissects its subtype only
            put("subtype", o.MP_EXPERIMENTAL)
        # MP_CAPABLE's C flag: tshark 4.0 does not dissect it (and warns
        # "Unsupported algorithm" when it is set); the kernel peer reads it.
    return out


def _norm(value) -> int | str:
    if isinstance(value, int):
        return value
    text = str(value).replace(":", "")
    try:
        return int(text, 0)
    except ValueError:
        return text.lower()


def check_capture(path: str | Path, sent: list, src_addrs: set[str] | None = None,
                  data_ports: set[int] | frozenset = frozenset()) -> list[str]:
    """Problems found in a capture: malformed or expert-error packets, and any
    packet of the stack (matched to `sent` by addresses, ports, seq, ack, length,
    flags and TSval) whose dissected MPTCP fields differ from what it meant to send."""
    ports = {p for s in sent for p in (s.segment.sport, s.segment.dport)} | set(data_ports)
    rows = dissect(path, MATCH_FIELDS + MPTCP_FIELDS, display_filter="tcp", data_ports=ports)
    problems = []
    by_key: dict[tuple, list[Dissected]] = {}
    for r in rows:
        if r.malformed or r.expert_errors:
            problems.append(f"frame {r.number}: malformed={r.malformed} errors={r.expert_errors}")
        key = tuple(_norm((r.get(f) or ["-"])[0]) for f in MATCH_FIELDS)
        by_key.setdefault(key, []).append(r)
    matched = 0
    for s in sent:
        seg = s.segment
        if src_addrs is not None and s.src not in src_addrs:
            continue
        ts = next((o.value for o in seg.options if type(o).__name__ == "Timestamps"), "-")
        key = (_norm(s.src), seg.sport, seg.seq, seg.ack, len(seg.payload), seg.flags, ts)
        candidates = by_key.get(key)
        if not candidates:
            continue  # not captured (e.g. dropped by a fault before the capture point)
        matched += 1
        want = {name: [_norm(v) for v in vals] for name, vals in expected_mptcp_fields(seg).items()}
        # Two segments can share every header field within one millisecond (a pure
        # ACK and a DATA_FIN): take the first captured one whose options match.
        diffs = []
        for r in candidates:
            diff = [f"{name} dissected {[_norm(v) for v in r.get(name)]}, stack sent {vals}"
                    for name, vals in want.items() if [_norm(v) for v in r.get(name)] != vals]
            if not diff:
                candidates.remove(r)
                break
            diffs.append(f"frame {r.number}: " + "; ".join(diff))
        else:
            problems.append(diffs[0])
    if sent and not matched:
        problems.append("none of the stack's packets was found in the capture")
    return problems
