"""AppWorkload: our client/server program (app.py) run in the testbed namespaces.

Metrics (all times in seconds): outcome (mptcp / fallback_tcp / tcp / failed),
errno, connect_s, ttfb_s (connect start -> first byte at the client; down and
rr only), transfer_s, goodput_mbit, bytes, sha256_match, subflows_max,
second_subflow_s (connect start -> a second subflow first seen, polled every
poll_ms), subflow_bytes_error (|sum of per-subflow bytes - stream bytes| /
stream bytes, receiver side), rr_ttfb_median_s, cc, client_stack, server_stack.
Each side runs kernel MPTCP sockets or the user-space stack (`client_stack`,
`server_stack`: "kernel" | "user"); with the user stack the same metrics come
from its connection info instead of MPTCP_INFO / TCP_INFO.
Tables: events (source "app") and timeseries (series delivered_bytes at the
receiver, key "total" and one key per subflow: its path name when known; series
srtt_ms at the sender, one key per subflow: its smoothed RTT). `limit`: the
client applies a receiver's limit mid-transfer (SO_RCVBUF, or an SRL request on
the user-space stack); metrics limit_applied_s (late by) and limit_error.
A transfer that failed after establishment has metrics error (the client's
exception) and idle_timeout (true when the idle timeout, idle_timeout_s, ended it);
a server whose transfer failed, server_error and server_idle_timeout.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from testbed.base.errors import TestbedError
from testbed.base.netns import ns_path
from testbed.base.strict import Strict
from testbed.harness.probes.base import frame, rel_s
from testbed.harness.workload.app import HEADER_LEN
from testbed.harness.workload.base import (Workload, WorkloadParams, WorkloadResult, raw_dir,
                                   register, wait_procs)
from testbed.stack.scheduler import SCHEDULERS

REPO = Path(__file__).resolve().parents[2]
StackName = Literal["kernel", "user"]
USER_STACK_CC = ("cubic", "reno")  # the congestion controls testbed.stack implements


def check_stacks(client_stack: str, server_stack: str, protocol: str = "mptcp",
                 server_protocol: str | None = None, cc: str | None = None) -> None:
    """Refuse (ValueError, one line) a stack choice the user-space stack cannot honour."""
    if client_stack == "user" and server_stack == "user" and protocol == "tcp":
        return  # plain TCP between two user stacks
    if server_stack == "user" and (server_protocol or protocol) == "tcp" and protocol == "mptcp":
        raise ValueError("server_stack 'user' always accepts MPTCP: a TCP-only server needs "
                         "server_stack 'kernel'")
    if "user" in (client_stack, server_stack) and cc is not None and cc not in USER_STACK_CC:
        raise ValueError(f"cc {cc!r} is not available in the user-space stack "
                         f"(one of {', '.join(USER_STACK_CC)})")


class StackChoice(Strict):
    """Which MPTCP implementation each side runs: the kernel's, or the user-space stack
    (testbed.stack) attached to the host's path interfaces."""
    client_stack: StackName = "kernel"
    server_stack: StackName = "kernel"
    user_scheduler: str | None = Field(
        None, description="the user-space stack's packet scheduler on its side(s) (lowrtt, roundrobin, "
                          "redundant; default lowrtt); the kernel's is hosts.<role>.scheduler")

    @model_validator(mode="after")
    def _scheduler(self) -> "StackChoice":
        if self.user_scheduler is None:
            return self
        if self.user_scheduler not in SCHEDULERS:
            raise ValueError(f"user_scheduler {self.user_scheduler!r} is not a scheduler of the user-space "
                             f"stack (one of {', '.join(SCHEDULERS)})")
        if "user" not in (self.client_stack, self.server_stack):
            raise ValueError("user_scheduler needs a side on the user-space stack (client_stack or "
                             "server_stack 'user'); kernel MPTCP's scheduler is hosts.<role>.scheduler")
        return self


class ReceiverLimit(Strict):
    """A limit the client (as receiver) applies to its own connection at one instant:
    SO_RCVBUF on its kernel MPTCP socket (kind 'rcvbuf'), or the user-space stack's
    subflow rate limit request (SRL) for the subflow on one path (kind 'srl')."""
    kind: Literal["rcvbuf", "srl"]
    at_ns: int = Field(ge=0, description="time.monotonic_ns() at which the client applies it")
    rcvbuf_bytes: int | None = Field(None, ge=1024, le=64 << 20)
    path: str | None = Field(None, description="srl: the path whose subflow is limited")
    rate_kbit: float | None = Field(None, ge=0, le=10_000_000)

    @model_validator(mode="after")
    def _complete(self) -> "ReceiverLimit":
        if self.kind == "rcvbuf" and self.rcvbuf_bytes is None:
            raise ValueError("limit kind 'rcvbuf' needs rcvbuf_bytes")
        if self.kind == "srl" and (self.path is None or self.rate_kbit is None):
            raise ValueError("limit kind 'srl' needs path and rate_kbit")
        return self


class AppParams(StackChoice, WorkloadParams):
    """Parameters of the app workload."""
    mode: Literal["bulk", "rr"] = "bulk"
    direction: Literal["up", "down"] = "down"
    bytes: int | None = Field(None, gt=0)
    seconds: float | None = Field(None, gt=0)
    request_bytes: int = Field(1000, ge=1)
    response_bytes: int = Field(100_000, ge=1)
    count: int = Field(1, ge=1)
    protocol: Literal["mptcp", "tcp"] = "mptcp"
    server_protocol: Literal["mptcp", "tcp"] | None = None  # None: same as protocol
    cc: Literal["cubic", "reno", "bbr"] | None = None  # None: the client host's setting
    port: int = Field(5000, ge=1, le=65535)
    seed: int = 1
    poll_ms: float = Field(10, gt=0, le=1000)
    bind_path: str | None = Field(None, description="client source address = this path's")
    bind_dev: bool = Field(False, description="also SO_BINDTODEVICE to bind_path's interface")
    connect_timeout_s: float = Field(30, gt=0)
    limit: ReceiverLimit | None = Field(None, description="client: a receiver's limit applied mid-transfer")
    idle_timeout_s: float | None = Field(
        None, gt=0, le=3600, description="each side gives up after this long without progress "
                                         "(None: the workload's timeout); the run then reports what it got")

    @model_validator(mode="after")
    def _sizes(self) -> "AppParams":
        if self.bytes is not None and self.seconds is not None:
            raise ValueError("give bytes or seconds, not both")
        if self.mode == "bulk" and self.bytes is None and self.seconds is None:
            self.bytes = 10_000_000
        if self.bind_dev and self.bind_path is None:
            raise ValueError("bind_dev needs bind_path")
        if self.bind_dev and self.client_stack == "user":
            raise ValueError("bind_dev is for kernel sockets: the user stack sends each subflow "
                             "on its path's interface anyway (bind_path picks the initial one)")
        check_stacks(self.client_stack, self.server_stack, self.protocol, self.server_protocol, self.cc)
        if self.limit is not None and (self.limit.kind == "srl") != (self.client_stack == "user"):
            raise ValueError(f"limit kind {self.limit.kind!r} needs client_stack "
                             f"{'user' if self.limit.kind == 'srl' else 'kernel'}")
        return self


def path_of(tb: Any, addr: str) -> str | None:
    """The name of the path that has this address, if any."""
    for p in tb.paths:
        if addr in (p.addr.client, p.addr.far):
            return p.name
    return None


@register
class AppWorkload(Workload):
    """Our own MPTCP client/server: bulk or request/response, exact timestamps, sha256."""
    name = "app"
    description = "own MPTCP client/server: bulk or request/response, exact timestamps, sha256"
    Params = AppParams

    def run(self, tb: Any, run_dir: Path, t0_ns: int, timeout_s: float) -> WorkloadResult:
        p: AppParams = self.params  # type: ignore[assignment]
        raw = raw_dir(run_dir)
        files = {k: raw / f"app-{k}.json" for k in ("server", "client")}
        logs = {k: raw / f"app-{k}.log" for k in ("server", "client")}
        ready = raw / ".app-server.ready"
        for f in (*files.values(), ready):
            f.unlink(missing_ok=True)
        cc = p.cc or tb.settings["client"].congestion_control
        if "user" in (p.client_stack, p.server_stack) and cc not in USER_STACK_CC:
            raise TestbedError(f"the client host's congestion control {cc!r} is not available in "
                               f"the user-space stack (one of {', '.join(USER_STACK_CC)}): set cc")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        base = [sys.executable, "-m", "testbed.harness.workload.app"]
        common = ["--port", str(p.port), "--cc", cc, "--poll-ms", str(p.poll_ms), "--seed", str(p.seed),
                  "--timeout", str(p.idle_timeout_s or timeout_s)]
        with logs["server"].open("w") as log:  # the child keeps its own copy of the fd
            srv = tb.popen(tb.server, [*base, "server", "--out", str(files["server"]), *common,
                                       "--protocol", p.server_protocol or p.protocol,
                                       # wildcard: joins to announced addresses need a listener there
                                       "--bind", "0.0.0.0", "--ready-file", str(ready),
                                       *self._stack_args(tb, "server")],
                           stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 15
        while not ready.exists():
            if srv.poll() is not None or time.monotonic() > deadline:
                srv.kill()
                raise TestbedError(f"app server did not start: {_tail(logs['server'])}")
            time.sleep(0.01)
        ready.unlink()
        args = [*base, "client", "--out", str(files["client"]), *common, "--protocol", p.protocol,
                "--server", tb.server_addr, "--mode", p.mode, "--direction", p.direction,
                "--request-bytes", str(p.request_bytes), "--response-bytes", str(p.response_bytes),
                "--count", str(p.count),
                "--connect-timeout", str(p.connect_timeout_s), *self._stack_args(tb, "client")]
        args += ["--bytes", str(p.bytes)] if p.bytes is not None else []
        args += ["--seconds", str(p.seconds)] if p.seconds is not None else []
        if p.limit is not None:
            lim = p.limit
            args += ["--limit", lim.kind, "--limit-at-ns", str(lim.at_ns)]
            args += (["--limit-rcvbuf", str(lim.rcvbuf_bytes)] if lim.kind == "rcvbuf" else
                     ["--limit-addr", tb.path(lim.path).addr.client, "--limit-rate-kbit", str(lim.rate_kbit)])
        if p.bind_path is not None:
            path = tb.path(p.bind_path)
            args += ["--bind-addr", path.addr.client]
            args += ["--bind-dev", path.client_if] if p.bind_dev else []
        with logs["client"].open("w") as log:
            cli = tb.popen(tb.client, args, stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_procs({"client": cli}, timeout_s, "app workload")
        c = _load(files["client"], logs["client"], "client")
        if c.get("outcome") == "failed" and srv.poll() is None:
            srv.kill()  # still waiting in accept(): nothing connected
            srv.wait(5)
            s: dict[str, Any] = {}
        else:
            wait_procs({"server": srv}, 15, "app workload")
            s = _load(files["server"], logs["server"], "server")
        metrics = self._metrics(c, s)
        tables = {"events": self._events(tb, c, s, t0_ns),
                  "timeseries": self._timeseries(tb, c, s, t0_ns)}
        return WorkloadResult(metrics, tables, [f for f in (*files.values(), *logs.values())
                                                if f.exists()])

    def _stack_args(self, tb: Any, role: str) -> list[str]:
        """The app's arguments for the stack of one side: the user stack attaches in
        that host's namespace and, as client, opens a subflow from the default path
        and joins from every path with a subflow (or fullmesh) endpoint, like the kernel PM."""
        p: AppParams = self.params  # type: ignore[assignment]
        if (p.client_stack if role == "client" else p.server_stack) == "kernel":
            return []
        node = tb.client if role == "client" else tb.server
        args = ["--stack", "user", "--netns", ns_path(node.pid)]
        args += ["--scheduler", p.user_scheduler] if p.user_scheduler else []
        if role == "client":
            default = tb.topology.default.name
            ordered = sorted(tb.paths, key=lambda q: q.name != default)
            joins = [q.addr.client for q in ordered
                     if q.name == default or {"subflow", "fullmesh"} & set(q.spec.client_endpoint)]
            args += ["--paths", ",".join(joins)]
            backup = [q.addr.client for q in tb.paths if q.spec.backup]
            args += ["--backup", ",".join(backup)] if backup else []
        return args

    # ---- results -------------------------------------------------------------
    def _receivers(self, c: dict, s: dict) -> list[tuple[str, dict]]:
        p: AppParams = self.params  # type: ignore[assignment]
        if p.mode == "rr":
            return [("client", c), ("server", s)]
        return [("server", s)] if p.direction == "up" else [("client", c)]

    def _senders(self, c: dict, s: dict) -> list[tuple[str, dict]]:
        p: AppParams = self.params  # type: ignore[assignment]
        if p.mode == "rr":
            return [("client", c), ("server", s)]
        return [("client", c)] if p.direction == "up" else [("server", s)]

    def _metrics(self, c: dict, s: dict) -> dict[str, Any]:
        p: AppParams = self.params  # type: ignore[assignment]
        start = c.get("connect_start_ns")
        m: dict[str, Any] = {"outcome": c.get("outcome"), "errno": c.get("errno"),
                             "server_outcome": s.get("outcome"), "cc": c.get("cc"),
                             "protocol": p.protocol, "client_stack": p.client_stack,
                             "server_stack": p.server_stack}
        if c.get("established_ns") is None:
            m["connect_failed_s"] = (c["failed_ns"] - start) / 1e9 if c.get("failed_ns") else None
            return m
        m["connect_s"] = (c["established_ns"] - start) / 1e9
        if c.get("outcome") == "failed":  # after establishment: what ended the transfer
            m["error"], m["idle_timeout"] = c.get("error"), bool(c.get("idle_timeout"))
        if s.get("outcome") == "failed":  # the server's side of it (its own timeout may reset the client)
            m["server_error"], m["server_idle_timeout"] = s.get("error"), bool(s.get("idle_timeout"))
        if p.mode == "rr" or p.direction == "down":
            fb = c.get("first_byte_ns")
            m["ttfb_s"] = (fb - start) / 1e9 if fb else None
        if c.get("last_byte_ns"):
            m["transfer_s"] = (c["last_byte_ns"] - c["established_ns"]) / 1e9
        up, down = s.get("bytes_received", 0), c.get("bytes_received", 0)
        m["bytes_up"], m["bytes_down"] = up, down
        m["bytes"] = up + down if p.mode == "rr" else (up if p.direction == "up" else down)
        if m.get("transfer_s"):
            m["goodput_mbit"] = m["bytes"] * 8 / m["transfer_s"] / 1e6
        match_up = c.get("sha256_sent") == s.get("sha256_received") and c.get("bytes_sent") == up
        match_down = s.get("sha256_sent") == c.get("sha256_received") and s.get("bytes_sent") == down
        m["sha256_match"] = bool(s) and (match_up and match_down if p.mode == "rr"
                                         else match_up if p.direction == "up" else match_down)
        counts: dict[int, int] = {}
        for t, _label, _a, _r in c.get("subflow_samples", []):
            counts[t] = counts.get(t, 0) + 1
        m["subflows_max"] = max(counts.values(), default=0)
        seen = sorted(v["first_seen_ns"] for v in c.get("subflows", {}).values())
        m["second_subflow_s"] = (seen[1] - start) / 1e9 if len(seen) > 1 else None
        errs = []
        for host, r in self._receivers(c, s):
            per_sf = sum(v.get("bytes_received", 0) for v in r.get("subflows", {}).values())
            stream = r.get("bytes_received", 0) + (HEADER_LEN if host == "server" else 0)
            if stream:
                errs.append(abs(per_sf - stream) / stream)
        m["subflow_bytes_error"] = max(errs) if errs else None
        if p.limit is not None:
            m["limit_error"] = c.get("limit_error")
            m["limit_applied_s"] = (c["limit_applied_ns"] - p.limit.at_ns) / 1e9 \
                if c.get("limit_applied_ns") else None
            m["limit_rcvbuf_read"] = c.get("limit_rcvbuf_read")
        reqs = c.get("requests") or []
        if reqs:
            m["rr_ttfb_median_s"] = statistics.median((fb - st) / 1e9 for st, fb, _ in reqs)
            m["rr_completion_median_s"] = statistics.median((d - st) / 1e9 for st, _, d in reqs)
        return m

    def _events(self, tb: Any, c: dict, s: dict, t0_ns: int):
        rows = []

        def add(host: str, event: str, ns: int | None, token: int | None = None, **detail: Any):
            if ns is not None:
                rows.append({"t": rel_s(ns, t0_ns), "source": "app", "host": host, "event": event,
                             "token": token, "detail": json.dumps(detail, sort_keys=True)})

        tok_c, tok_s = c.get("token"), s.get("token")
        add("client", "connect_start", c.get("connect_start_ns"), protocol=c.get("protocol"),
            cc=c.get("cc"))
        add("client", "established", c.get("established_ns"), tok_c, outcome=c.get("outcome"))
        add("client", "connect_failed", c.get("failed_ns"), errno=c.get("errno"),
            error=c.get("error"))
        add("server", "accepted", s.get("accepted_ns"), tok_s, outcome=s.get("outcome"))
        for host, r, tok in (("client", c, tok_c), ("server", s, tok_s)):
            add(host, "first_byte", r.get("first_byte_ns"), tok)
            add(host, "last_byte", r.get("last_byte_ns"), tok)
            for label, sf in r.get("subflows", {}).items():
                addr = sf["local"][0] if host == "client" else sf["remote"][0]
                add(host, "subflow_seen", sf["first_seen_ns"], tok, subflow=label,
                    path=path_of(tb, addr), id=sf.get("id"))
                add(host, "subflow_gone", sf.get("gone_ns"), tok, subflow=label,
                    path=path_of(tb, addr))
            if r.get("outcome") == "failed" and r.get("error"):
                add(host, "error", r.get("end_ns"), tok, errno=r.get("errno"), error=r["error"])
        return frame("events", sorted(rows, key=lambda r: r["t"]))

    def _timeseries(self, tb: Any, c: dict, s: dict, t0_ns: int):
        rows = []
        for host, r in self._receivers(c, s):
            prev = 0  # counters start at 0 when the connection starts
            for t, rx, _tx in r.get("samples", []):
                rows.append({"t": rel_s(t, t0_ns), "host": host, "series": "delivered_bytes",
                             "key": "total", "value": rx - prev})
                prev = rx
            last: dict[str, int] = {}
            for t, label, _acked, received in r.get("subflow_samples", []):
                sf = r["subflows"].get(label, {})
                addr = (sf.get("local") if host == "client" else sf.get("remote")) or [""]
                key = path_of(tb, addr[0]) or label
                rows.append({"t": rel_s(t, t0_ns), "host": host, "series": "delivered_bytes",
                             "key": key, "value": received - last.get(label, 0)})
                last[label] = received
        for host, r in self._senders(c, s):
            for t, label, srtt_ms in r.get("srtt_samples", []):
                sf = r["subflows"].get(label, {})
                addr = (sf.get("local") if host == "client" else sf.get("remote")) or [""]
                rows.append({"t": rel_s(t, t0_ns), "host": host, "series": "srtt_ms",
                             "key": path_of(tb, addr[0]) or label, "value": srtt_ms})
        return frame("timeseries", rows)


def _tail(path: Path) -> str:
    try:
        lines = path.read_text().strip().splitlines()
    except OSError:
        return "no output"
    return lines[-1] if lines else "no output"


def _load(path: Path, log: Path, role: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise TestbedError(f"app {role} wrote no result ({path.name}): {_tail(log)}") from None
