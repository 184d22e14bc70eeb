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


def write_pcap(path: str | Path, packets: list[bytes]) -> None:
    """Write raw IPv4 packets to a pcap file (one microsecond apart)."""
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_RAW))
        t0 = time.time()
        for i, pkt in enumerate(packets):
            ts = t0 + i * 1e-6
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
            check_tcp_checksum: bool = False, timeout: float = 60) -> list[Dissected]:
    """Run tshark over a pcap and return the requested fields of every packet.

    check_tcp_checksum only suits packets the stack wrote itself: a live capture
    holds kernel packets whose checksum the NIC (here: veth offload) never filled in.
    """
    extra = ["_ws.malformed", "_ws.expert.severity", "_ws.expert.message", "frame.number"]
    cmd = ["tshark", "-n", "-r", str(path), "-T", "json", "-o", "mptcp.analyze_mappings:TRUE",
           "-o", "mptcp.relative_sequence_numbers:FALSE"]
    if check_tcp_checksum:
        cmd += ["-o", "tcp.check_checksum:TRUE"]
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
