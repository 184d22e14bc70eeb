"""Cross traffic: competing flows between a topology's nodes (by default to
the server), each started and stopped while a run goes on.

- `tcp`: one bulk TCP connection with its own congestion control, set per
  socket (a namespace cannot change the kernel default, bbr);
- `udp`: constant-rate datagrams, or on/off (`on_s` sending, `off_s` silent).

Scenario files declare them (`[[cross]]`, checked at load by `check_cross`)
and start/stop them with events through `Testbed.apply_event`. Sockets are
created inside the nodes' namespaces and driven by threads of this process;
`CrossTraffic.stop_all` runs at the testbed's stop. What each flow delivered
is counted at the receiver (`delivered()`), what it sent at the sender
(`sent()`); `problems()` says when a flow did not do its job.
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Any, Literal, Sequence

from pydantic import Field, model_validator

from testbed.base.errors import TestbedError
from testbed.base.netns import run_in_netns
from testbed.base.strict import FrozenStrict
from testbed.core.bulk import filler, receive_stream, send_stream
from testbed.core.addressing import GraphError
from testbed.core.model import MIN_RATE_MBIT, NODE_NAME, TopologySpec
from testbed.mptcp import sockopt

# A udp sender further behind its schedule than this when it stops did not send
# at its rate (the backlog it would have sent at once is the shortfall).
MAX_BEHIND_S = 0.1
DATAGRAM = 1200  # bytes of UDP payload: below every emulated MTU (576 is the floor of IPv4 too)


# What one sender thread paces in time: 1000 Mbit/s of 1200-byte datagrams is
# ~104k sendto() calls a second. A sender that cannot keep its schedule makes
# the run invalid (the cross probe's check), so the bound is a typo guard.
MAX_UDP_RATE_MBIT = 1000
BASE_PORT = 5600  # flow i without a port listens on BASE_PORT + i


class CrossFlow(FrozenStrict):
    """One competing flow from node `src` to node `dst` (default: the server)."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,15}$")
    src: str = Field(pattern=NODE_NAME)
    dst: str | None = Field(None, pattern=NODE_NAME, description="receiving node; None: the server")
    kind: Literal["tcp", "udp"] = "tcp"
    cc: Literal["cubic", "reno", "bbr"] = "cubic"
    rate_mbit: float | None = Field(None, ge=MIN_RATE_MBIT, le=MAX_UDP_RATE_MBIT,
                                    description="udp: the sending rate")
    on_s: float | None = Field(None, gt=0, le=3600, description="udp on/off: seconds sending")
    off_s: float | None = Field(None, gt=0, le=3600, description="udp on/off: seconds silent")
    port: int | None = Field(None, ge=1024, le=65535, description="None: BASE_PORT + the flow's index")

    @model_validator(mode="after")
    def _consistent(self) -> "CrossFlow":
        if self.kind == "udp" and self.rate_mbit is None:
            raise ValueError("udp cross traffic needs rate_mbit")
        if self.kind == "tcp" and (self.rate_mbit or self.on_s or self.off_s):
            raise ValueError("tcp cross traffic is as fast as its congestion control allows: "
                             "rate_mbit, on_s and off_s are for udp")
        if (self.on_s is None) != (self.off_s is None):
            raise ValueError("give both on_s and off_s, or neither")
        return self


def flow_port(flows: Sequence[CrossFlow], name: str) -> int:
    """The port flow `name` receives on (its own, or BASE_PORT + its index)."""
    i, flow = next((i, f) for i, f in enumerate(flows) if f.name == name)
    return flow.port if flow.port is not None else BASE_PORT + i


def check_cross(flows: Sequence[CrossFlow], topology: TopologySpec) -> None:
    """Refuse, as TestbedError naming `cross.<i>.<key>`, flows this topology cannot
    carry: duplicate names, an unknown node, a flow to itself, no route between
    its nodes (either way), two flows receiving on one port of one node."""
    graph = topology.graph()
    names: set[str] = set()
    ports: dict[tuple[str, str, int], str] = {}
    for i, f in enumerate(flows):
        if f.name in names:
            raise TestbedError(f"cross.{i}.name: duplicate cross-traffic flow name {f.name!r}")
        names.add(f.name)
        for side in ("src", "dst"):
            node = getattr(f, side)
            if node is not None and node not in graph.roles:
                raise TestbedError(f"cross.{i}.{side}: no node {node!r} in topology "
                                   f"{topology.name!r} (nodes: {', '.join(graph.roles)})")
        dst = f.dst or graph.server
        if dst == f.src:
            raise TestbedError(f"cross.{i}.dst: flow {f.name!r} goes from {f.src!r} to itself")
        try:
            graph.route(f.src, dst)
            graph.route(dst, f.src)  # the replies (TCP's acknowledgements) need a way back
        except GraphError as exc:
            raise TestbedError(f"cross.{i}: flow {f.name!r}: {exc}") from None
        key = (dst, f.kind, flow_port(flows, f.name))
        if key in ports:
            raise TestbedError(f"cross.{i}.port: {f.kind} port {key[2]} on {dst!r} is also "
                               f"flow {ports[key]!r}'s")
        ports[key] = f.name


class _Running:
    """A started flow: its sockets, threads, counts and when it ran."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.delivered = 0  # bytes the receiver got
        self.sent = 0  # bytes the sender handed to its socket
        self.behind_s = 0.0  # udp: how far the sender was behind its schedule when it stopped
        self.started = time.monotonic()
        self.sockets: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.error: str | None = None


class CrossTraffic:
    """The cross traffic of one testbed: start(name) and stop(name) any time."""

    def __init__(self, tb: Any, flows: list[CrossFlow]):
        names = [f.name for f in flows]
        if len(set(names)) != len(names):
            raise TestbedError(f"cross traffic: flow names must be unique, got {names}")
        self.tb = tb
        self.flows = {f.name: f for f in flows}
        self.ports = {f.name: flow_port(flows, f.name) for f in flows}
        for f in flows:
            tb.node(f.src)  # an unknown node is a TestbedError naming the known ones
            tb.node(self._dst(f))
        self._running: dict[str, _Running] = {}
        self._done: dict[str, int] = {}
        self._sent: dict[str, int] = {}
        self._intervals: dict[str, list[tuple[float, float | None]]] = {f.name: [] for f in flows}
        self._problems: list[str] = []
        tb.on_stop(self.stop_all)

    def start(self, name: str) -> None:
        """Start flow `name` (no-op if it runs)."""
        flow = self._flow(name)
        if name in self._running:
            return
        run = _Running()
        self._running[name] = run
        self._intervals[name].append((run.started, None))
        try:
            (self._start_tcp if flow.kind == "tcp" else self._start_udp)(flow, run)
        except BaseException:
            self.stop(name)
            raise

    def stop(self, name: str) -> None:
        """Stop flow `name` (no-op if it does not run)."""
        run = self._running.pop(self._flow(name).name, None)
        if run is None:
            return
        run.stop.set()
        for s in run.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected (udp) or already closed
        for t in run.threads:
            t.join(5)
        for s in run.sockets:
            s.close()
        self._done[name] = self._done.get(name, 0) + run.delivered
        self._sent[name] = self._sent.get(name, 0) + run.sent
        began, _ = self._intervals[name][-1]
        self._intervals[name][-1] = (began, time.monotonic())
        flow = self.flows[name]
        if run.error:
            self._problems.append(f"cross flow {name}: sender stopped on an error: {run.error}")
        if flow.kind == "udp" and run.behind_s > MAX_BEHIND_S:
            self._problems.append(f"cross flow {name}: the sender was {run.behind_s:.3f} s behind "
                                  f"its {flow.rate_mbit:g} Mbit/s schedule when it stopped "
                                  f"(bound {MAX_BEHIND_S:g} s)")

    def stop_all(self) -> None:
        """Stop every running flow (the testbed's stop calls this)."""
        for name in list(self._running):
            self.stop(name)

    def delivered(self) -> dict[str, int]:
        """Bytes each flow's receiver got so far (all of its starts together)."""
        return self._so_far(self._done, "delivered")

    def sent(self) -> dict[str, int]:
        """Bytes each flow's sender handed to its socket so far (all of its starts)."""
        return self._so_far(self._sent, "sent")

    def _so_far(self, stopped: dict[str, int], counter: str) -> dict[str, int]:
        """Per flow: its stopped starts' count plus the running one's `counter`."""
        out = dict.fromkeys(self.flows, 0)
        out.update(stopped)
        for name, run in self._running.items():
            out[name] += getattr(run, counter)
        return out

    def intervals(self) -> dict[str, list[tuple[float, float | None]]]:
        """Per flow, when each start ran: (started, stopped) in time.monotonic()
        seconds, stopped None while it runs."""
        return {name: list(spans) for name, spans in self._intervals.items()}

    def errors(self) -> dict[str, str]:
        """Flows whose sender stopped on an error, with the error."""
        return {n: r.error for n, r in self._running.items() if r.error}

    def problems(self) -> list[str]:
        """What went wrong in stopped flows: a sender's error, a udp sender behind
        its schedule (it did not send at its rate); each names the value and bound."""
        return list(self._problems)

    def address(self, flow: CrossFlow) -> str:
        """Where flow sends to: its destination node's address."""
        return self.tb.graph.address(self._dst(flow))

    def _dst(self, flow: CrossFlow) -> str:
        return flow.dst or self.tb.graph.server

    # ---- senders and receivers -------------------------------------------
    def _flow(self, name: str) -> CrossFlow:
        if name not in self.flows:
            raise TestbedError(f"no cross-traffic flow {name!r} (flows: {', '.join(self.flows)})")
        return self.flows[name]

    def _thread(self, run: _Running, fn: Any) -> None:
        t = threading.Thread(target=fn, daemon=True)
        run.threads.append(t)
        t.start()

    def _start_tcp(self, flow: CrossFlow, run: _Running) -> None:
        tb, port, addr = self.tb, self.ports[flow.name], self.address(flow)
        lsock = run_in_netns(tb.node(self._dst(flow)).pid,
                             lambda: sockopt.listener(port, "0.0.0.0", "tcp", flow.cc, 1))
        run.sockets.append(lsock)
        sender = run_in_netns(tb.node(flow.src).pid, lambda: sockopt.mptcp_socket(flow.cc, "tcp"))
        run.sockets.append(sender)
        sender.settimeout(10)
        try:
            sender.connect((addr, port))
        except OSError as exc:
            raise TestbedError(f"cross traffic {flow.name}: connect to {addr}:{port} "
                               f"failed: {exc}") from None
        lsock.settimeout(5)
        conn, _ = lsock.accept()
        conn.settimeout(1)
        run.sockets.append(conn)

        def count(data: memoryview) -> None:
            run.delivered += len(data)

        def receive() -> None:
            try:
                receive_stream(conn, count, bufsize=1 << 20)
            except OSError:
                pass  # stopped: what arrived is counted

        def send() -> None:
            def count_sent(data: bytes | memoryview) -> None:
                run.sent += len(data)
            try:
                send_stream(sender, filler, stop=run.stop, on_sent=count_sent)
            except OSError as exc:
                if not run.stop.is_set():
                    run.error = f"send: {exc}"

        self._thread(run, receive)
        self._thread(run, send)

    def _start_udp(self, flow: CrossFlow, run: _Running) -> None:
        tb, port, addr = self.tb, self.ports[flow.name], self.address(flow)

        def receiver() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("0.0.0.0", port))
            return s

        rsock = run_in_netns(tb.node(self._dst(flow)).pid, receiver)
        run.sockets.append(rsock)
        ssock = run_in_netns(tb.node(flow.src).pid, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        run.sockets.append(ssock)
        rsock.settimeout(0.2)
        assert flow.rate_mbit is not None  # validated
        gap = DATAGRAM * 8 / (flow.rate_mbit * 1e6)
        payload = bytes(filler(DATAGRAM))

        def receive() -> None:
            while not run.stop.is_set():
                try:
                    run.delivered += len(rsock.recv(65535))
                except socket.timeout:
                    continue
                except OSError:
                    return

        def send() -> None:
            # Paced by absolute send times: a late wake-up sends the backlog
            # at once, so the mean rate holds even when a sleep overshoots.
            start = nxt = time.monotonic()
            while not run.stop.is_set():
                if flow.on_s is not None and flow.off_s is not None:
                    phase = (nxt - start) % (flow.on_s + flow.off_s)
                    if phase >= flow.on_s:  # silent: skip to the next on period
                        nxt += flow.on_s + flow.off_s - phase
                        run.stop.wait(max(0.0, nxt - time.monotonic()))
                        continue
                try:
                    run.sent += ssock.sendto(payload, (addr, port))
                except OSError as exc:
                    if not run.stop.is_set():
                        run.error = f"send: {exc}"
                    return
                nxt += gap
                delay = nxt - time.monotonic()
                run.behind_s = max(0.0, -delay)
                if delay > 0:
                    run.stop.wait(delay)

        self._thread(run, receive)
        self._thread(run, send)
