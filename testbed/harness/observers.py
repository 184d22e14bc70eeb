"""Passive on-path observers: one tcpdump per emulated link, on a router's side of
it, each seeing only that link's packets; what an eavesdropper on one path of a
multipath connection sees (docs/privacy.md).

    obs = PathObservers(tb, ["wifi", "lte"], raw_dir)   # ready when it returns
    ...traffic...
    obs.stop(); obs.problems()    # [] or "wifi: captured 990 packets, ap-wifi moved 1000 (...)"
    obs.packets()                 # every TCP segment with its MPTCP option fields

The capture point is the link's end on a router (never an endpoint), chosen
from the topology's graph: the first router end of the link. Completeness is
checked like the pcap probe does: the capture's packet count (capinfos) against
the interface's own counters over the same window; a single missing packet
is a problem (the run is then invalid). tshark (fields output) dissects the
captures; 64-bit sequence numbers are kept as Python ints (0..2**64-1).
"""
from __future__ import annotations

import csv
import io
import subprocess
import time
from pathlib import Path
from typing import Any

import pandas as pd

from testbed.base.errors import TestbedError
from testbed.harness.probes.ifstats import read_counters
from testbed.harness.probes.pcap import DRAIN_S, READY_TIMEOUT_S, packets_in, stop_tcpdumps, tcpdump_ready

SNAPLEN = 128  # Ethernet + IPv4 + TCP with 40 bytes of options fits in 94
# tshark field per column of packets() (names checked with `tshark -G fields`, 4.0).
FIELDS = {"time": "frame.time_epoch", "src": "ip.src", "dst": "ip.dst",
          "sport": "tcp.srcport", "dport": "tcp.dstport", "syn": "tcp.flags.syn",
          "ack": "tcp.flags.ack", "rst": "tcp.flags.reset", "fin": "tcp.flags.fin",
          "tcp_len": "tcp.len", "subtype": "tcp.options.mptcp.subtype",
          "sendkey": "tcp.options.mptcp.sendkey", "recvkey": "tcp.options.mptcp.recvkey",
          "token": "tcp.options.mptcp.recvtok", "dsn": "tcp.options.mptcp.rawdataseqno",
          "dsn64": "tcp.options.mptcp.dseqn8.flag", "data_len": "tcp.options.mptcp.datalvllen",
          "data_ack": "tcp.options.mptcp.rawdataack", "ack64": "tcp.options.mptcp.dataack8.flag"}
INT_COLUMNS = ("sport", "dport", "tcp_len", "subtype", "sendkey", "recvkey", "token", "dsn",
               "data_len", "data_ack")
FLAG_COLUMNS = ("syn", "ack", "rst", "fin", "dsn64", "ack64")


def _int(v: str) -> int | None:
    v = v.split(",")[0].strip()
    if not v:
        return None
    return int(v, 16) if v.startswith("0x") else int(v)


def _flag(v: str) -> bool:
    v = v.split(",")[0].strip().lower()
    return v in ("1", "true")


class PathObservers:
    """A passive observer per named link, capturing on a router's side of it."""

    def __init__(self, tb: Any, links: list[str], raw_dir: Path):
        self._tb = tb
        self._points: dict[str, tuple[str, str]] = {}  # link -> (router node, its interface)
        for name in links:
            link = tb.graph.link(name)
            routers = [e.node for e in (link.a, link.b) if tb.graph.roles.get(e.node) == "router"]
            if not routers:
                raise TestbedError(f"observer on {name!r}: the link has no router end (ends "
                                   f"{link.a.node}, {link.b.node}); observers never sit on endpoints")
            self._points[name] = (routers[0], link.end(routers[0]).ifname)
        self._files = {name: Path(raw_dir) / f"observer-{name}.pcap" for name in links}
        self._procs: dict[str, subprocess.Popen] = {}
        self._said: dict[str, list[str]] = {name: [] for name in links}
        self._before: dict[str, dict[str, int]] = {}
        self._after: dict[str, dict[str, int]] = {}
        self._stopped = False
        self._start()

    @property
    def points(self) -> dict[str, tuple[str, str]]:
        """Where each observer captures: link -> (router, interface)."""
        return dict(self._points)

    def _start(self) -> None:
        Path(next(iter(self._files.values()))).parent.mkdir(parents=True, exist_ok=True)
        for name, (router, ifname) in self._points.items():
            node = self._tb.node(router)
            # every frame (no filter): the count must equal the interface's counters
            self._procs[name] = self._tb.popen(
                node, ["tcpdump", "-i", ifname, "-s", str(SNAPLEN), "-U", "--immediate-mode", "-n",
                       "-Z", "root", "-w", str(self._files[name])],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + READY_TIMEOUT_S
        for name, proc in self._procs.items():
            if not tcpdump_ready(proc, self._files[name], deadline, self._said[name]):
                self.stop()
                said = " | ".join(self._said[name])[-200:] or "nothing"
                raise TestbedError(f"observer {name}: tcpdump on {self._points[name][1]} was not "
                                   f"capturing {READY_TIMEOUT_S:g} s after its start (said: {said})")
        self._before = self._counters()

    def _counters(self) -> dict[str, int]:
        out = {}
        for name, (router, ifname) in self._points.items():
            c = read_counters(self._tb.node(router).pid).get(ifname)
            if c is not None:
                out[name] = c["rx_packets"] + c["tx_packets"]
        return out

    def stop(self) -> None:
        """Stop capturing (idempotent); the interface counters are read first."""
        if self._stopped:
            return
        self._stopped = True
        if self._before:
            try:
                self._after = self._counters()
            except OSError:
                self._after = {}
            time.sleep(DRAIN_S)
        stop_tcpdumps(list(self._procs.values()))

    def captured(self) -> dict[str, int]:
        """Packets in each observer's capture file (capinfos)."""
        return {name: packets_in(f) for name, f in self._files.items()}

    def problems(self) -> list[str]:
        """Observers that missed packets: captured vs the interface's counters."""
        if not self._after:
            return ["observers: interface counters at the end of the capture could not be read"]
        captured = self.captured()
        out = []
        for name, after in self._after.items():
            moved = after - self._before.get(name, after)
            if captured.get(name, 0) < moved:
                out.append(f"observer {name}: captured {captured.get(name, 0)} packets, interface "
                           f"{self._points[name][1]} moved {moved} (bound: all of them)")
        return out

    def packets(self) -> pd.DataFrame:
        """Every TCP segment each observer saw (see dissect())."""
        frames = [dissect(name, f) for name, f in self._files.items()]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def summary(self) -> dict[str, Any]:
        """Capture points and packet counts, for the manifest."""
        return {"points": {n: f"{r}:{i}" for n, (r, i) in self._points.items()},
                "files": {n: f.name for n, f in self._files.items()},
                "interface_packets": {n: self._after.get(n, 0) - self._before.get(n, 0)
                                      for n in self._points}}


U64 = 1 << 64


def dissect(path: str, pcap: Path) -> pd.DataFrame:
    """Every TCP segment of a capture: path, t (wall clock, s), addresses, ports,
    flags, tcp_len and the first MPTCP option's fields (tshark)."""
    argv = ["tshark", "-r", str(pcap), "-n", "-Y", "tcp", "-T", "fields", "-E", "separator=\t",
            "-E", "occurrence=f"]
    for field in FIELDS.values():
        argv += ["-e", field]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise TestbedError(f"tshark on {Path(pcap).name}: {out.stderr.strip().splitlines()[-1:]}")
    rows = []
    for rec in csv.reader(io.StringIO(out.stdout), delimiter="\t"):
        v = dict(zip(FIELDS, rec))
        row: dict[str, Any] = {"path": path, "t": float(v["time"]), "src": v["src"], "dst": v["dst"]}
        row.update({c: _int(v[c]) for c in INT_COLUMNS})
        row.update({c: _flag(v[c]) for c in FLAG_COLUMNS})
        rows.append(row)
    cols = ["path", "t", "src", "dst", *INT_COLUMNS, *FLAG_COLUMNS]
    # object columns: 64-bit keys and sequence numbers exceed int64, and pandas
    # would turn ints mixed with None into (rounding) floats
    return pd.DataFrame({c: pd.Series([r[c] for r in rows], dtype=object) for c in cols})


def _to_i64(v: int | None) -> int | None:
    """An unsigned 64-bit value as the store's Int64 (two's complement, lossless)."""
    return None if v is None else (v - U64 if v >= 1 << 63 else v)


def from_i64(v: Any) -> int | None:
    """The store's Int64 back to the unsigned 64-bit value."""
    if v is None or v is pd.NA or (isinstance(v, float) and v != v):
        return None
    v = int(v)
    return v + U64 if v < 0 else v


def observed_subflows(packets: pd.DataFrame, server_ports: set[int], t0: float = 0.0) -> pd.DataFrame:
    """What each observer learns per subflow (one row per path and four-tuple):
    when it was first and last seen (s after wall-clock t0), how it began
    (`capable`: SYN with MP_CAPABLE, `join`: SYN with MP_JOIN, `unknown`: no
    SYN seen), the keys an MP_CAPABLE exchange showed, the token a MP_JOIN SYN
    named, and the span of each data-sequence space it saw: `up` = the client's
    data (its 64-bit DSNs, DSN + length, and the server's DATA_ACKs), `down` =
    the server's. 64-bit values are stored as Int64 (two's complement)."""
    rows = []
    if packets.empty:
        return pd.DataFrame(rows)
    pk = packets.sort_values("t", kind="stable")
    flows: dict[tuple, dict[str, Any]] = {}
    for r in pk.itertuples(index=False):
        if r.sport is None or r.dport is None:
            continue
        if r.syn and not r.ack:
            client_is_src = True
        else:
            client_is_src = r.dport in server_ports or (r.sport not in server_ports and r.sport > r.dport)
        c, cp, s, sp = ((r.src, r.sport, r.dst, r.dport) if client_is_src
                        else (r.dst, r.dport, r.src, r.sport))
        f = flows.setdefault((r.path, c, cp, s, sp), {
            "path": r.path, "client": c, "cport": cp, "server": s, "sport": sp, "first_t": r.t,
            "last_t": r.t, "packets": 0, "kind": "unknown", "key_client": None,
            "key_server": None, "join_token": None, "up": [], "down": [], "dss": 0})
        f["last_t"] = r.t
        f["packets"] += 1
        up = r.src == c and r.sport == cp
        if r.subtype == 0:
            if r.syn and not r.ack and f["packets"] == 1:
                f["kind"] = "capable"
            if r.syn and r.ack and r.sendkey is not None:
                f["key_server"] = r.sendkey
            if not r.syn and up and r.sendkey is not None:
                f["key_client"] = r.sendkey
                if r.recvkey is not None:
                    f["key_server"] = r.recvkey
        elif r.subtype == 1:
            if r.syn and not r.ack:
                f["kind"] = "join" if f["packets"] == 1 else f["kind"]
                f["join_token"] = r.token
        elif r.subtype == 2:
            f["dss"] += 1
            if r.dsn is not None and r.dsn64:
                space = f["up"] if up else f["down"]
                space.append(r.dsn)
                space.append((r.dsn + (r.data_len or 0)) % U64)
            if r.data_ack is not None and r.ack64:
                (f["down"] if up else f["up"]).append(r.data_ack)
    for f in flows.values():
        up, down = f.pop("up"), f.pop("down")
        f["up_lo"], f["up_hi"] = (_to_i64(min(up)), _to_i64(max(up))) if up else (None, None)
        f["down_lo"], f["down_hi"] = (_to_i64(min(down)), _to_i64(max(down))) if down else (None, None)
        for k in ("key_client", "key_server"):
            f[k] = _to_i64(f[k])
        f["first_t"] -= t0
        f["last_t"] -= t0
        rows.append(f)
    # object columns: ints mixed with None would otherwise become (rounding) floats
    return pd.DataFrame({c: pd.Series([r[c] for r in rows], dtype=object) for c in rows[0]})
