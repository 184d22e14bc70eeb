"""pcap (optional): tcpdump on each client path interface (snaplen-limited),
then tshark extracts the MPTCP options into the `packets` table.

tshark 4.0 names the option fields tcp.options.mptcp.* (checked with
`tshark -G fields`): subtype, recvtok, rawdataseqno, rawdataack, addrid, flags.
A packet with several MPTCP options gives the first of each field. The
experimental (draft) options, which tshark does not know (ITO's timer, SRL's
rate, ROBE_eSIM_EN, MP_JOIN_CAP), are decoded from tshark's raw option bytes
(tcp.options) by the user-space stack's codec (testbed.stack.draft_options). DSN and
data-ack are u64 on the wire but the table's dtype is Int64: values >= 2**63
are stored in two's complement (lossless; add 2**64 to negatives). Capture
timestamps are wall-clock; they are moved onto the run's monotonic clock with a
(monotonic, realtime) pair taken at start.

Never a silent gap: start() returns only once every tcpdump reported on stderr
that it is listening and its file has the pcap header (within
READY_TIMEOUT_S, else the probe fails to start and the run fails). Every
frame is captured (no filter), so the file's packet count (capinfos) can be
held against the interface's own packet counters over the same window: a
capture with fewer packets than the interface moved is a problem() and makes
the run invalid (bound: not a single packet missing).
"""
from __future__ import annotations

import csv
import io
import os
import select
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import Field

from testbed.base.errors import TestbedError
from testbed.harness.probes.base import Probe, ProbeParams, concat, frame, register
from testbed.harness.probes.ifstats import read_counters
from testbed.stack.draft_options import draft_options, tshark_options

READY_TIMEOUT_S = 5.0
PCAP_HEADER_BYTES = 24
# After the last packet was counted by the interface, tcpdump gets this long
# to write it before it is told to stop.
DRAIN_S = 0.2

FIELDS = {"time": "frame.time_epoch", "src": "ip.src", "dst": "ip.dst",
          "sport": "tcp.srcport", "dport": "tcp.dstport", "flags": "tcp.flags",
          "subtype": "tcp.options.mptcp.subtype", "token": "tcp.options.mptcp.recvtok",
          "dsn": "tcp.options.mptcp.rawdataseqno", "data_ack": "tcp.options.mptcp.rawdataack",
          "addr_id": "tcp.options.mptcp.addrid", "mp_flags": "tcp.options.mptcp.flags",
          "options": "tcp.options"}


class PcapParams(ProbeParams):
    """Parameters of the pcap probe."""
    interval_ms: float | None = None  # accepted for uniformity
    snaplen: int = Field(128, ge=64, le=65535, description="headers + options only")
    max_packets: int | None = Field(None, ge=1, description="tshark -c limit per path")


def _int(v: str) -> int | None:
    v = v.split(",")[0].strip()
    if not v:
        return None
    n = int(v, 16) if v.startswith("0x") else int(v)
    return n - (1 << 64) if n >= 1 << 63 else n


def tcpdump_ready(proc: subprocess.Popen, pcap: Path, deadline: float, said: list[str]) -> bool:
    """Whether tcpdump (started with stderr=PIPE) said "listening on" and its file
    has the pcap header before `deadline` (monotonic); its lines go to `said`."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    buf = b""
    listening = False
    while time.monotonic() < deadline:
        if listening and pcap.exists() and pcap.stat().st_size >= PCAP_HEADER_BYTES:
            return True
        if proc.poll() is not None and not listening:
            break
        if not listening and poller.poll(20):
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace").strip()
                said.append(text)
                listening = listening or "listening on" in text
        elif listening:
            time.sleep(0.005)
    return False


def stop_tcpdumps(procs: list[subprocess.Popen]) -> None:
    """SIGINT each tcpdump (it flushes and exits cleanly), killed after 5 s."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def packets_in(pcap: Path) -> int:
    """Packets in a capture file (capinfos; 0 for a missing or header-less file)."""
    if not pcap.exists() or pcap.stat().st_size < PCAP_HEADER_BYTES:
        return 0
    res = subprocess.run(["capinfos", "-T", "-r", "-M", "-c", str(pcap)],
                         capture_output=True, text=True, timeout=60)
    fields = res.stdout.strip().split("\t")
    if res.returncode != 0 or len(fields) < 2:
        raise TestbedError(f"capinfos on {pcap.name}: {res.stderr.strip()[-200:]}")
    return int(fields[-1])


@register
class PcapProbe(Probe):
    """tcpdump on every client path; tshark extracts the MPTCP options."""
    name = "pcap"
    description = "tcpdump per client path + tshark MPTCP option extraction (packets table)"
    Params = PcapParams

    def __init__(self, **params: Any):
        super().__init__(**params)
        for tool in ("tcpdump", "tshark", "capinfos"):
            if shutil.which(tool) is None:
                raise TestbedError(f"probe 'pcap' needs {tool} (apt-get install "
                                   f"{'wireshark-common' if tool == 'capinfos' else tool})")
        self._procs: dict[str, subprocess.Popen] = {}
        self._files: dict[str, Path] = {}
        self._ifnames: dict[str, str] = {}
        self._stderr: dict[str, list[str]] = {}
        self._readers: list[threading.Thread] = []
        self._counters: tuple[dict, dict] | None = None  # interface counters at start, at stop
        self._pid = 0
        self._clock = (0, 0)
        self._t0_ns = 0
        self._stopped = False

    def start(self, tb: Any, run_dir: Path, t0_ns: int) -> None:
        raw = Path(run_dir) / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        self._t0_ns = t0_ns
        self._pid = tb.client.pid
        self._clock = (time.monotonic_ns(), time.time_ns())
        snap = str(self.params.snaplen)  # type: ignore[attr-defined]
        for p in tb.paths:
            f = raw / f"pcap-{p.name}.pcap"
            self._files[p.name] = f
            self._ifnames[p.name] = p.client_if
            # Every frame (no filter): the count must match the interface counters.
            # -U and --immediate-mode: each packet is written at once, so a stop
            # loses nothing buffered; -Z root: write the file as root.
            self._procs[p.name] = tb.popen(tb.client, ["tcpdump", "-i", p.client_if, "-s", snap,
                                                       "-U", "--immediate-mode", "-n", "-Z", "root",
                                                       "-w", str(f)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + READY_TIMEOUT_S
        for name, proc in self._procs.items():
            self._stderr[name] = []
            if not self._wait_listening(name, proc, deadline):
                self.stop()
                said = " | ".join(self._stderr[name])[-200:] or "nothing"
                raise TestbedError(f"probe pcap: tcpdump on {self._ifnames[name]} was not capturing "
                                   f"{READY_TIMEOUT_S:g} s after its start (exit status "
                                   f"{proc.poll()}, file {self._size(name)} bytes, said: {said})")
            t = threading.Thread(target=self._drain_stderr, args=(name, proc), daemon=True,
                                 name=f"pcap-stderr-{name}")
            t.start()
            self._readers.append(t)
        self._counters = (read_counters(self._pid), {})

    def _size(self, name: str) -> int:
        f = self._files[name]
        return f.stat().st_size if f.exists() else 0

    def _wait_listening(self, name: str, proc: subprocess.Popen, deadline: float) -> bool:
        """tcpdump said "listening on" and its file has the pcap header."""
        return tcpdump_ready(proc, self._files[name], deadline, self._stderr[name])

    def _drain_stderr(self, name: str, proc: subprocess.Popen) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:  # tcpdump's summary at exit ("N packets captured", ...)
            self._stderr[name].append(line.decode(errors="replace").strip())

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._counters is not None and self._procs:
            try:
                self._counters = (self._counters[0], read_counters(self._pid))
            except OSError:
                pass  # namespace gone: no verdict possible, problems() says so
            time.sleep(DRAIN_S)
        stop_tcpdumps(list(self._procs.values()))
        for t in self._readers:
            t.join(2)

    def captured(self) -> dict[str, int]:
        """Packets in each path's capture file (capinfos)."""
        return {name: packets_in(f) for name, f in self._files.items()}

    def counted(self) -> dict[str, int]:
        """Packets each path's client interface received + sent while capturing."""
        if self._counters is None or not self._counters[1]:
            return {}
        first, last = self._counters
        out = {}
        for name, ifname in self._ifnames.items():
            if ifname in first and ifname in last:
                out[name] = sum(last[ifname][k] - first[ifname][k] for k in ("rx_packets", "tx_packets"))
        return out

    def problems(self) -> list[str]:
        if not self._procs:
            return []
        counted = self.counted()
        if not counted:
            return ["interface counters at the end of the capture could not be read"]
        captured = self.captured()
        return [f"{name}: captured {captured.get(name, 0)} packets, interface "
                f"{self._ifnames[name]} moved {n} (bound: all of them)"
                for name, n in counted.items() if captured.get(name, 0) < n]

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
            draft = draft_options(tshark_options(v.get("options", "")))
            rows.append({"t": (t_ns - self._t0_ns) / 1e9, "path": path, "src": v["src"],
                         "dst": v["dst"], "sport": _int(v["sport"]), "dport": _int(v["dport"]),
                         "flags": v["flags"], "subtype": _int(v["subtype"]),
                         "token": _int(v["token"]), "dsn": _int(v["dsn"]),
                         "data_ack": _int(v["data_ack"]), "addr_id": _int(v["addr_id"]),
                         "mp_flags": v["mp_flags"] or None, "ito_timer_s": draft.ito_timer_s,
                         "srl_kbps": draft.srl_kbps, "esim_en": draft.esim_en,
                         "join_cap": draft.join_cap is not None})
        return frame("packets", rows)

    def tables(self) -> dict[str, pd.DataFrame]:
        """The packets table dissected from every capture."""
        frames = [self._extract(path, f) for path, f in self._files.items()
                  if f.exists() and f.stat().st_size > 24]
        return {"packets": concat(frames, "packets")}

    def summary(self) -> dict[str, Any]:
        """Capture files, their sizes and the packets the interfaces counted."""
        return {"files": {p: f.name for p, f in self._files.items()},
                "bytes": {p: f.stat().st_size for p, f in self._files.items() if f.exists()},
                "interface_packets": self.counted(),
                "tcpdump": {p: lines[-3:] for p, lines in self._stderr.items()}}
