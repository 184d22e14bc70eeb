"""Inactivity (make-after-break): can a client resume its MPTCP connection after
every path was down for T seconds, and what does the server hold meanwhile?

mode "resume": the client sends p1_bytes, every path goes down (link_down on
each), after outage_s one path comes back (`variant` same_address: the path the
connection used; new_address: another path whose address the connection never
had - the kernel client gets a `subflow` endpoint for it then, as a host does
for an address that appears; the user-space client joins from it), and the
client sends p2_bytes more on the same connection and closes. Metrics: resumed
(the server read everything, sha256 equal), resume_s (path back -> the first
byte of the second part at the server), complete_s (-> the server's end of
stream), the server's view of the connection sampled (held, subflows: the
timeseries table) and when it lost subflows and state (seconds after the paths
went down).

mode "state": `connections` idle connections (p1_bytes each), every path goes
down, and the server's state is sampled for observe_s: connections held,
subflows, memory (kernel: socket memory of the server namespace's subflows;
user-space stack: the server process's RSS).

Sides run kernel MPTCP or the user-space stack (client_stack, server_stack);
ito_client_s / ito_server_s give the user-space stack's side the
inactivity-time option (ITO). Kernel runs record the sysctls that govern a
connection without subflows (metrics kernel_*; all of them in the manifest).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from testbed.base.errors import TestbedError
from testbed.base.netns import ns_path, read_sysctl
from testbed.core.events import EventSpec
from testbed.harness.experiment import Experiment, RunContext, RunOutput, register
from testbed.harness.probes.base import frame, rel_s
from testbed.harness.workload.app_workload import StackChoice
from testbed.mptcp import pm

REPO = Path(__file__).resolve().parents[1]
ITO_MAX_S = 65_535  # the option's 16-bit timer field
# What governs a kernel MPTCP connection whose paths are gone (recorded with kernel runs).
KERNEL_SYSCTLS = ["net.mptcp.close_timeout", "net.ipv4.tcp_retries2",
                  "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_keepalive_probes",
                  "net.ipv4.tcp_keepalive_intvl"]
NEW_ENDPOINT_ID = 90  # the kernel client's endpoint for the returning path's address


class Params(StackChoice):
    """Parameters of the inactivity experiment."""
    mode: Literal["resume", "state"] = "resume"
    outage_s: float = Field(5, gt=0, le=600, description="resume: how long every path is down")
    variant: Literal["same_address", "new_address"] = "same_address"
    ito_client_s: int | None = Field(None, ge=0, le=ITO_MAX_S, description="client's ITO value, s")
    ito_server_s: int | None = Field(None, ge=0, le=ITO_MAX_S, description="server's ITO value, s")
    ito_server_max_s: int | None = Field(None, ge=0, le=ITO_MAX_S,
                                         description="server's local upper bound on an adopted value")
    p1_bytes: int = Field(65_536, ge=1, le=10_000_000)
    p2_bytes: int = Field(65_536, ge=1, le=10_000_000)
    resume_timeout_s: float = Field(10, gt=0, le=600, description="how long the client tries after the path is back")
    connections: int = Field(1, ge=1, le=1000, description="state: idle connections")
    observe_s: float = Field(10, gt=0, le=900, description="state: sampling after the paths went down")
    sample_ms: float = Field(100, ge=10, le=5000)

    @model_validator(mode="after")
    def _consistent(self) -> "Params":
        for side in ("client", "server"):
            if getattr(self, f"ito_{side}_s") is not None and getattr(self, f"{side}_stack") != "user":
                raise ValueError(f"ito_{side}_s needs {side}_stack 'user' (the kernel has no inactivity-time option)")
        if self.ito_server_max_s is not None and self.server_stack != "user":
            raise ValueError("ito_server_max_s needs server_stack 'user'")
        if self.mode == "resume" and self.connections != 1:
            raise ValueError("connections > 1 only in mode 'state' (resume follows one connection)")
        if self.user_scheduler is not None:
            raise ValueError("user_scheduler: the inactivity experiment moves too little data to schedule")
        return self


OUTAGE_SLACK_S, OUTAGE_SLACK_FRAC = 0.1, 0.05  # measured outage vs outage_s: 0.1 s + 5 %


def outage_mismatch(outage_s: float, measured_s: float) -> str | None:
    """Why a run's measured outage (link_down applied -> link_up applied) voids it: off
    outage_s by more than 0.1 s + 5 % (None: within the bound)."""
    bound = OUTAGE_SLACK_S + OUTAGE_SLACK_FRAC * outage_s
    if abs(measured_s - outage_s) <= bound:
        return None
    return (f"outage_measured_s {measured_s:.3f} s differs from outage_s {outage_s:g} s by more than "
            f"{bound:.3f} s (0.1 s + 5 %)")


def ito_protocol(p: Params) -> dict[str, Any]:
    """The manifest's `protocol` entry of a run with ITO: option code, length, values."""
    out: dict[str, Any] = {"client_s": p.ito_client_s, "server_s": p.ito_server_s,
                           "server_max_s": p.ito_server_max_s}
    from testbed.stack import inactivity  # the option's codec (its owner's module)

    out.update({"kind": 30, "subtype": 0xF, "nibble": inactivity.NIBBLE, "length": inactivity.LENGTH,
                "timer_bits": 16, "keepalive_probes": inactivity.PROBES,
                # the draft leaves liveness open: the stack's keep-alive interval per timer value
                "keepalive_s": {str(v): inactivity.probe_s(v) for v in (p.ito_client_s, p.ito_server_s)
                                if v is not None}})
    return {"ito": out}


class Peer:
    """One inactivity_peer process in a testbed namespace, spoken to by lines."""

    def __init__(self, tb: Any, node: Any, role: str, out: Path, args: list[str]):
        self.out, self.log = out, out.with_suffix(".log")
        out.unlink(missing_ok=True)
        with self.log.open("w") as log:
            self.proc = tb.popen(node, [sys.executable, "-m", "experiments.inactivity_peer", role,
                                        "--out", str(out), *args],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                 text=True, env={**os.environ, "PYTHONPATH": str(REPO)})

    def expect(self, key: str, timeout_s: float) -> int:
        """The time_ns of the next stdout line carrying `key`; TestbedError otherwise."""
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if sel.select(deadline - time.monotonic()):
                line = self.proc.stdout.readline()
                if not line:
                    break
                msg = json.loads(line)
                if key in msg:
                    return int(msg[key])
                if "failed" in msg:
                    raise TestbedError(f"{self.out.stem}: {msg.get('error')}")
        self.proc.kill()
        self.proc.wait(5)
        raise TestbedError(f"{self.out.stem} did not report {key!r} within {timeout_s:g} s: {self.tail()}")

    def tell(self, line: str) -> None:
        """Send one command line (the peer may already be gone)."""
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def result(self, timeout_s: float) -> dict[str, Any]:
        """Wait for the process and read its JSON result ({} if it wrote none)."""
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        try:
            return json.loads(self.out.read_text())
        except (OSError, ValueError):
            return {}

    def tail(self) -> str:
        """The last line of its stderr."""
        try:
            lines = self.log.read_text().strip().splitlines()
        except OSError:
            return "no output"
        return lines[-1] if lines else "no output"


def first_time(samples: list[tuple[int, int]], after_ns: int) -> int | None:
    """The first sample time at or after after_ns whose value is 0 and stays 0 in every later sample."""
    t_zero = None
    for t, v in samples:
        if t < after_ns:
            continue
        if v == 0:
            t_zero = t_zero or t
        else:
            t_zero = None
    return t_zero


@register
class Inactivity(Experiment):
    """Make-after-break: resume after an outage of every path; server state of idle connections."""
    name = "inactivity"
    description = "every path down for T s, one comes back: does the connection resume; server state meanwhile"
    Params = Params
    # Two at once: quick scenarios 1.40x and 1.59x, every run complete, none voided
    # (docs/performance.md); outages and ITO values lie seconds from each other.
    max_parallel = 2

    @classmethod
    def max_parallel_for(cls, params: dict[str, Any]) -> int:
        """One at a time for state runs with more idle connections than measured in
        parallel (the quick ones: 20 on the user-space stack, 50 on the kernel): a
        thousand connections keep a user-space server's engine busy for seconds."""
        measured = 20 if params.get("server_stack") == "user" else 50
        if params.get("mode") == "state" and int(params.get("connections", 0)) > measured:
            return 1
        return cls.max_parallel

    @classmethod
    def check_topology(cls, params: Any, topology: Any) -> None:
        """variant new_address needs a second path of the client (its address comes back)."""
        g = topology.graph()
        paths = [gp.name for gp in g.paths_of(g.client)]
        if params.mode == "resume" and params.variant == "new_address" and len(paths) < 2:
            raise TestbedError(f"params.variant 'new_address' needs at least 2 paths, the topology has "
                               f"{len(paths)} ({', '.join(paths)})")

    def run(self, ctx: RunContext) -> RunOutput:
        p: Params = ctx.params
        m: dict[str, Any] = {"mode": p.mode, "client_stack": p.client_stack, "server_stack": p.server_stack,
                             "ito_client_s": p.ito_client_s, "ito_server_s": p.ito_server_s,
                             "ito": p.ito_client_s is not None or p.ito_server_s is not None}
        if "kernel" in (p.client_stack, p.server_stack):
            node = ctx.tb.server if p.server_stack == "kernel" else ctx.tb.client
            values = read_sysctl(node.pid, KERNEL_SYSCTLS)
            m.update({"kernel_" + k.rsplit(".", 1)[1]: int(v) for k, v in values.items()})
        out = self._resume(ctx, p, m) if p.mode == "resume" else self._state(ctx, p, m)
        if m["ito"]:
            out.protocol = ito_protocol(p)
        return out

    # ---- helpers
    def _args(self, ctx: RunContext, p: Params, side: str) -> list[str]:
        tb = ctx.tb
        node = tb.client if side == "client" else tb.server
        args = ["--stack", getattr(p, f"{side}_stack"), "--p1", str(p.p1_bytes), "--p2", str(p.p2_bytes),
                "--sample-ms", str(p.sample_ms), "--seed", str(ctx.spec.seed)]
        if getattr(p, f"{side}_stack") == "user":
            args += ["--netns", ns_path(node.pid)]
        ito = getattr(p, f"ito_{side}_s")
        args += ["--ito-s", str(ito)] if ito is not None else []
        if side == "server" and p.ito_server_max_s is not None:
            args += ["--ito-max-s", str(p.ito_server_max_s)]
        if side == "client":
            args += ["--server", tb.server_addr, "--first", tb.path(tb.topology.default.name).addr.client]
        return args

    def _all_down(self, ctx: RunContext) -> int:
        """Take every path's carrier down; the time (ns) the last one took effect."""
        applied = [ctx.tb.apply_event(EventSpec(at_s=0, action="link_down", path=q.name))
                   for q in ctx.tb.paths]
        bad = [a for a in applied if not a.ok]
        if bad:
            raise TestbedError(f"link_down {bad[0].event.path}: {bad[0].error}")
        return int(max(a.applied for a in applied) * 1e9)

    # ---- mode resume
    def _resume(self, ctx: RunContext, p: Params, m: dict[str, Any]) -> RunOutput:
        tb = ctx.tb
        default = tb.topology.default.name
        others = [q for q in tb.paths if q.name != default]
        if p.variant == "new_address" and not others:
            raise TestbedError("variant new_address needs a second path (its address comes back)")
        back = tb.path(default) if p.variant == "same_address" else others[0]
        if p.variant == "new_address" and p.client_stack == "kernel" and any(
                e.addr == back.addr.client for e in pm.endpoints(tb.client.pid)):
            raise TestbedError(f"variant new_address: the client already has an endpoint for "
                               f"{back.addr.client} (give path {back.name!r} client_endpoint = [])")
        timeout = p.outage_s + p.resume_timeout_s + 15
        server = Peer(tb, tb.server, "server", ctx.raw_dir / "inactivity-server.json",
                      [*self._args(ctx, p, "server"), "--timeout", str(timeout)])
        server.expect("listening", 20)
        client = Peer(tb, tb.client, "client", ctx.raw_dir / "inactivity-client.json",
                      [*self._args(ctx, p, "client"), "--timeout", str(p.resume_timeout_s)])
        client.expect("ready", 20)
        down_ns = self._all_down(ctx)
        ctx.record("experiment", "network", "outage_start", ns=down_ns, outage_s=p.outage_s)
        time.sleep(max(0.0, down_ns / 1e9 + p.outage_s - time.monotonic()))
        up = tb.apply_event(EventSpec(at_s=0, action="link_up", path=back.name))
        if not up.ok:
            raise TestbedError(f"link_up {back.name}: {up.error}")
        up_ns = int(up.applied * 1e9)
        join = p.variant == "new_address"
        if join and p.client_stack == "kernel":  # the address appears: the kernel PM gets an endpoint
            pm.add_endpoints(tb.client.pid, [pm.Endpoint(back.addr.client, None, ("subflow",),
                                                         NEW_ENDPOINT_ID)])
            ctx.record("experiment", "client", "endpoint_added", addr=back.addr.client)
        # join 1: the user-space client joins from the address; a kernel client waits for its
        # path manager's join before it closes (a close during the join discards it)
        client.tell(f"resume {back.addr.client} {int(join)}")
        c = client.result(p.resume_timeout_s + 20)
        try:  # a server still reading once the client is done has what it will get
            server.proc.wait(3)
        except subprocess.TimeoutExpired:
            server.tell("stop")
        s = server.result(15)
        m.update({"outage_s": p.outage_s, "variant": p.variant, "returned_path": back.name,
                  "outage_measured_s": (up_ns - down_ns) / 1e9})
        m.update(self._resume_metrics(p, c, s, down_ns, up_ns))
        for key, val in (("client_error", c.get("error")), ("join_error", c.get("join_error")),
                         ("server_error", s.get("error"))):
            if val:
                ctx.record("app", key.split("_")[0], key, detail=val)
        rows = []
        for t, held, subflows in s.get("samples", []):
            rows.append({"t": rel_s(t, ctx.t0_ns), "host": "server", "series": "server_connections",
                         "key": "total", "value": held})
            rows.append({"t": rel_s(t, ctx.t0_ns), "host": "server", "series": "server_subflows",
                         "key": "total", "value": subflows})
        if not s:
            return RunOutput(metrics=m, status="failed",
                             reason=f"the server wrote no result: {server.tail()}")
        off = outage_mismatch(p.outage_s, m["outage_measured_s"])
        if off:  # the outage the run measured is not the one it claims
            return RunOutput(metrics=m, tables={"timeseries": frame("timeseries", rows)},
                             status="invalid", reason=off)
        return RunOutput(metrics=m, tables={"timeseries": frame("timeseries", rows)})

    @staticmethod
    def _resume_metrics(p: Params, c: dict, s: dict, down_ns: int, up_ns: int) -> dict[str, Any]:
        total = p.p1_bytes + p.p2_bytes
        intact = s.get("sha256_received") == c.get("sha256_sent") and s.get("bytes_received") == total
        resumed = bool(intact and s.get("eof_ns"))
        p2 = s.get("p2_first_ns")
        # Until the second part arrived (or the server's connection ended): a normal
        # close after the transfer is not state lost in the outage.
        cutoff = p2 or s.get("failed_ns") or s.get("eof_ns") or max((t for t, *_ in s.get("samples", [])), default=0)
        samples = [x for x in s.get("samples", []) if x[0] <= cutoff]
        sf_gone = first_time([(t, n) for t, _h, n in samples], down_ns)
        held_gone = first_time([(t, h) for t, h, _n in samples], down_ns)
        if held_gone is None and not p2 and s.get("failed_ns") and not str(s.get("error")).startswith("TimeoutError"):
            held_gone = s["failed_ns"]  # the server's application saw its connection end (not its own timeout)
        return {"resumed": resumed, "sha256_match": intact, "bytes_received": s.get("bytes_received"),
                "resume_s": (p2 - up_ns) / 1e9 if p2 and resumed else None,
                "complete_s": (s["eof_ns"] - up_ns) / 1e9 if resumed else None,
                "server_subflows_gone_s": (sf_gone - down_ns) / 1e9 if sf_gone else None,
                "server_state_gone_s": (held_gone - down_ns) / 1e9 if held_gone else None,
                "client_error": c.get("error"), "join_error": c.get("join_error"),
                "resume_error": c.get("resume_error"), "server_error": s.get("error"),
                "server_stopped": bool(s.get("stopped_ns")),  # still waiting when the client was done
                # the values each side kept (ITO: the peer's within the local bounds)
                "ito_server_effective_s": (s.get("ito") or {}).get("adopted_s"),
                "ito_client_effective_s": (c.get("ito") or {}).get("adopted_s")}

    # ---- mode state
    def _state(self, ctx: RunContext, p: Params, m: dict[str, Any]) -> RunOutput:
        tb = ctx.tb
        setup = 30 + p.connections * (0.2 if "user" in (p.client_stack, p.server_stack) else 0.02)
        server = Peer(tb, tb.server, "state-server", ctx.raw_dir / "inactivity-state-server.json",
                      [*self._args(ctx, p, "server"), "--connections", str(p.connections),
                       "--timeout", str(setup)])
        server.expect("listening", 20)
        client = Peer(tb, tb.client, "state-client", ctx.raw_dir / "inactivity-state-client.json",
                      [*self._args(ctx, p, "client"), "--connections", str(p.connections),
                       "--timeout", str(setup)])
        client.expect("ready", setup)
        server.expect("ready", 10)
        down_ns = self._all_down(ctx)
        ctx.record("experiment", "network", "outage_start", ns=down_ns, connections=p.connections)
        time.sleep(max(0.0, down_ns / 1e9 + p.observe_s - time.monotonic()))
        server.tell("stop")
        s = server.result(15)
        client.tell("stop")
        client.result(15)
        try:
            lines = (ctx.raw_dir / "inactivity-state-server.json.samples").read_text().splitlines()
            samples = [json.loads(x) for x in lines if x.strip()]
        except OSError:
            samples = []
        if not samples:
            return RunOutput(metrics=m, status="failed",
                             reason=f"the state server sampled nothing: {s.get('error') or server.tail()}")
        rows = [{"t": rel_s(x["t_ns"], ctx.t0_ns), "host": "server", "series": f"server_{k}",
                 "key": "total", "value": x[src]}
                for x in samples for k, src in (("connections", "held"), ("subflows", "subflows"),
                                                ("memory_bytes", "memory_bytes"))]
        before = [x for x in samples if x["t_ns"] < down_ns] or samples[:1]
        last = samples[-1]
        sf_gone = first_time([(x["t_ns"], x["subflows"]) for x in samples], down_ns)
        held_gone = first_time([(x["t_ns"], x["held"]) for x in samples], down_ns)
        m.update({"connections": p.connections, "observe_s": p.observe_s,
                  "held_at_down": before[-1]["held"], "held_at_end": last["held"],
                  "memory_at_down_bytes": before[-1]["memory_bytes"], "memory_at_end_bytes": last["memory_bytes"],
                  "subflows_at_end": last["subflows"],
                  "observed_s": (last["t_ns"] - down_ns) / 1e9,
                  "server_subflows_gone_s": (sf_gone - down_ns) / 1e9 if sf_gone else None,
                  "server_state_gone_s": (held_gone - down_ns) / 1e9 if held_gone else None})
        if m["held_at_down"] < p.connections:
            return RunOutput(metrics=m, tables={"timeseries": frame("timeseries", rows)}, status="invalid",
                             reason=f"the server held {m['held_at_down']} of {p.connections} connections "
                                    "before the outage")
        return RunOutput(metrics=m, tables={"timeseries": frame("timeseries", rows)})
