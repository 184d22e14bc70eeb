"""pcap (optional): tcpdump on each client path interface (snaplen-limited),
then tshark extracts the MPTCP options into the `packets` table.

tshark 4.0 names the option fields tcp.options.mptcp.* (checked with
`tshark -G fields`): subtype, recvtok, rawdataseqno, rawdataack, addrid, flags.
A packet with several MPTCP options gives the first of each field. DSN and
data-ack are u64 on the wire but the table's dtype is Int64: values >= 2**63
are stored in two's complement (lossless; add 2**64 to negatives). Capture
timestamps are wall-clock; they are moved onto the run's monotonic clock with a
(monotonic, realtime) pair taken at start.
"""
from __future__ import annotations

import csv
import io
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import Field

from testbed.base.errors import TestbedError
from testbed.harness.probes.base import Probe, ProbeParams, concat, frame, register

FIELDS = {"time": "frame.time_epoch", "src": "ip.src", "dst": "ip.dst",
          "sport": "tcp.srcport", "dport": "tcp.dstport", "flags": "tcp.flags",
          "subtype": "tcp.options.mptcp.subtype", "token": "tcp.options.mptcp.recvtok",
          "dsn": "tcp.options.mptcp.rawdataseqno", "data_ack": "tcp.options.mptcp.rawdataack",
          "addr_id": "tcp.options.mptcp.addrid", "mp_flags": "tcp.options.mptcp.flags"}


class PcapParams(ProbeParams):
    interval_ms: float | None = None  # accepted for uniformity
    snaplen: int = Field(128, ge=64, le=65535, description="headers + options only")
    max_packets: int | None = Field(None, ge=1, description="tshark -c limit per path")


def _int(v: str) -> int | None:
    v = v.split(",")[0].strip()
    if not v:
        return None
    n = int(v, 16) if v.startswith("0x") else int(v)
    return n - (1 << 64) if n >= 1 << 63 else n


@register
class PcapProbe(Probe):
    name = "pcap"
    description = "tcpdump per client path + tshark MPTCP option extraction (packets table)"
    Params = PcapParams

    def __init__(self, **params: Any):
        super().__init__(**params)
        for tool in ("tcpdump", "tshark"):
            if shutil.which(tool) is None:
                raise TestbedError(f"probe 'pcap' needs {tool} (apt-get install {tool})")
        self._procs: dict[str, subprocess.Popen] = {}
        self._files: dict[str, Path] = {}
        self._clock = (0, 0)
        self._t0_ns = 0
        self._stopped = False

    def start(self, tb: Any, run_dir: Path, t0_ns: int) -> None:
        raw = Path(run_dir) / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        self._t0_ns = t0_ns
        self._clock = (time.monotonic_ns(), time.time_ns())
        snap = str(self.params.snaplen)  # type: ignore[attr-defined]
        for p in tb.paths:
            f = raw / f"pcap-{p.name}.pcap"
            self._files[p.name] = f
            # -U: write each packet at once, so a stop loses nothing buffered
            self._procs[p.name] = tb.popen(tb.client, ["tcpdump", "-i", p.client_if, "-s", snap,
                                                       "-U", "-n", "-w", str(f), "tcp"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 5  # tcpdump needs a moment before it captures
        while time.monotonic() < deadline and not all(f.exists() for f in self._files.values()):
            time.sleep(0.02)
        time.sleep(0.1)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        time.sleep(0.1)  # let the last packets reach tcpdump
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # flushes and exits cleanly
        for proc in self._procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()

    def _extract(self, path: str, f: Path) -> pd.DataFrame:
        argv = ["tshark", "-r", str(f), "-n", "-Y", "mptcp", "-T", "fields", "-E", "separator=\t",
                "-E", "occurrence=f"]
        if self.params.max_packets:  # type: ignore[attr-defined]
            argv += ["-c", str(self.params.max_packets)]  # type: ignore[attr-defined]
        for field in FIELDS.values():
            argv += ["-e", field]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise TestbedError(f"tshark on {f.name}: {out.stderr.strip().splitlines()[-1:]}")
        mono0, real0 = self._clock
        rows = []
        for rec in csv.reader(io.StringIO(out.stdout), delimiter="\t"):
            v = dict(zip(FIELDS, rec))
            t_ns = int(float(v["time"]) * 1e9) - real0 + mono0
            rows.append({"t": (t_ns - self._t0_ns) / 1e9, "path": path, "src": v["src"],
                         "dst": v["dst"], "sport": _int(v["sport"]), "dport": _int(v["dport"]),
                         "flags": v["flags"], "subtype": _int(v["subtype"]),
                         "token": _int(v["token"]), "dsn": _int(v["dsn"]),
                         "data_ack": _int(v["data_ack"]), "addr_id": _int(v["addr_id"]),
                         "mp_flags": v["mp_flags"] or None})
        return frame("packets", rows)

    def tables(self) -> dict[str, pd.DataFrame]:
        frames = [self._extract(path, f) for path, f in self._files.items()
                  if f.exists() and f.stat().st_size > 24]
        return {"packets": concat(frames, "packets")}

    def summary(self) -> dict[str, Any]:
        return {"files": {p: f.name for p, f in self._files.items()},
                "bytes": {p: f.stat().st_size for p, f in self._files.items() if f.exists()}}
