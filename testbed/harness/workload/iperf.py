"""IperfWorkload: iperf3 server + client with --json, over MPTCP or TCP.

MPTCP through `--mptcp` when the installed iperf3 lists it (3.19+), else
`mptcpize run iperf3 ...` (LD_PRELOAD turns its TCP sockets, control and data
connections alike, into MPTCP). Congestion control per socket with -C. Both
JSON outputs are kept in raw/. Interval timestamps are placed on the run clock
from the client's launch time (iperf3 only reports wall-clock seconds), so they
are late by the client's start-up time (a few ms).
"""
from __future__ import annotations

import functools
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from testbed.base.errors import TestbedError
from testbed.harness.probes.base import frame, rel_s
from testbed.harness.workload.base import Workload, WorkloadParams, WorkloadResult, raw_dir, register, wait_procs


@functools.lru_cache(maxsize=1)
def iperf_has_mptcp() -> bool:
    """True when iperf3 has --mptcp itself (else mptcpize is needed)."""
    if shutil.which("iperf3") is None:
        raise TestbedError("iperf3 is not installed (apt-get install iperf3)")
    out = subprocess.run(["iperf3", "--help"], capture_output=True, text=True, timeout=10)
    return "--mptcp" in out.stdout + out.stderr


def mptcp_argv(argv: list[str]) -> list[str]:
    """iperf3 argv made MPTCP: native flag, else the mptcpize wrapper."""
    if iperf_has_mptcp():
        return [argv[0], "--mptcp", *argv[1:]]
    if shutil.which("mptcpize") is None:
        raise TestbedError("iperf3 lacks --mptcp and mptcpize is not installed (apt-get install mptcpize)")
    return ["mptcpize", "run", *argv]


class IperfParams(WorkloadParams):
    """Parameters of the iperf workload."""
    seconds: float = Field(10, gt=0, le=3600)
    reverse: bool = Field(False, description="server sends (download)")
    parallel: int = Field(1, ge=1, le=128)
    protocol: Literal["mptcp", "tcp"] = "mptcp"
    cc: Literal["cubic", "reno", "bbr"] | None = None  # None: the client host's setting
    port: int = Field(5201, ge=1, le=65535)
    interval_s: float = Field(0.1, ge=0.1, le=60, description="iperf3 -i (its minimum is 0.1)")
    omit_s: float = Field(0, ge=0, description="iperf3 -O: skip slow start in the totals")
    bind_path: str | None = None


def _listening(pid: int, port: int) -> bool:
    """Is something in pid's namespace listening on TCP port? (MPTCP listeners
    have a TCP listener underneath, so they show up in /proc/<pid>/net/tcp.)"""
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    for ln in lines:
        fields = ln.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":  # 0A = LISTEN
            return True
    return False


@register
class IperfWorkload(Workload):
    """iperf3 with JSON output; MPTCP via --mptcp or mptcpize."""
    name = "iperf"
    description = "iperf3 (JSON), MPTCP via --mptcp or mptcpize"
    Params = IperfParams

    def run(self, tb: Any, run_dir: Path, t0_ns: int, timeout_s: float) -> WorkloadResult:
        p: IperfParams = self.params  # type: ignore[assignment]
        raw = raw_dir(run_dir)
        files = {k: raw / f"iperf-{k}.json" for k in ("server", "client")}
        errs = {k: raw / f"iperf-{k}.stderr" for k in ("server", "client")}
        cc = p.cc or tb.settings["client"].congestion_control
        wrap = mptcp_argv if p.protocol == "mptcp" else (lambda a: a)
        with files["server"].open("w") as out, errs["server"].open("w") as err:
            srv = tb.popen(tb.server, wrap(["iperf3", "-s", "-1", "-J", "-i", str(p.interval_s),
                                            "-B", tb.server_addr, "-p", str(p.port)]),
                           stdout=out, stderr=err)
        deadline = time.monotonic() + 10
        while not _listening(srv.pid, p.port):
            if srv.poll() is not None or time.monotonic() > deadline:
                srv.kill()
                raise TestbedError(f"iperf3 server did not start: {_tail(errs['server'])}")
            time.sleep(0.01)
        argv = ["iperf3", "-c", tb.server_addr, "-p", str(p.port), "-J", "-t", str(p.seconds),
                "-i", str(p.interval_s), "-C", cc, "-P", str(p.parallel), "-O", str(p.omit_s)]
        argv += ["-R"] if p.reverse else []
        argv += ["-B", tb.path(p.bind_path).addr.client] if p.bind_path else []
        if0 = tb.interface_bytes()
        launch_ns = time.monotonic_ns()
        with files["client"].open("w") as out, errs["client"].open("w") as err:
            cli = tb.popen(tb.client, wrap(argv), stdout=out, stderr=err)
        wait_procs({"client": cli, "server": srv}, min(timeout_s, p.seconds + p.omit_s + 30),
                   "iperf workload")
        if1 = tb.settled_interface_bytes()
        c, s = _load(files["client"], errs["client"]), _load(files["server"], errs["server"])
        if c.get("error"):
            raise TestbedError(f"iperf3 client: {c['error']}")
        metrics = self._metrics(c, cc)
        for name in if0:  # which paths carried the traffic (MPTCP: all of them)
            metrics[f"path_{name}_bytes"] = sum(if1[name][k] - if0[name][k]
                                                for k in ("tx_bytes", "rx_bytes"))
        receiver = ("client", c) if p.reverse else ("server", s)
        rows = [{"t": rel_s(launch_ns, t0_ns) + iv["sum"]["end"], "host": receiver[0],
                 "series": "delivered_bytes", "key": "total", "value": iv["sum"]["bytes"]}
                for iv in receiver[1].get("intervals", [])]
        files_out = [f for f in (*files.values(), *errs.values()) if f.exists()]
        return WorkloadResult(metrics, {"timeseries": frame("timeseries", rows)}, files_out)

    def _metrics(self, c: dict, cc: str) -> dict[str, Any]:
        p: IperfParams = self.params  # type: ignore[assignment]
        end = c.get("end", {})
        recv, sent = end.get("sum_received", {}), end.get("sum_sent", {})
        return {"goodput_mbit": recv.get("bits_per_second", 0) / 1e6,
                "sent_mbit": sent.get("bits_per_second", 0) / 1e6,
                "bytes": recv.get("bytes"), "seconds": recv.get("seconds"),
                "retransmits": sent.get("retransmits"),
                "cc": end.get("sender_tcp_congestion") or cc,
                "protocol": p.protocol, "mptcp_via": ("native" if iperf_has_mptcp() else "mptcpize")
                if p.protocol == "mptcp" else None,
                "iperf_version": c.get("start", {}).get("version")}


def _tail(path: Path) -> str:
    try:
        lines = path.read_text().strip().splitlines()
    except OSError:
        return "no output"
    return lines[-1] if lines else "no output"


def _load(path: Path, err: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise TestbedError(f"iperf3 wrote no JSON to {path.name}: {_tail(err)}") from None
