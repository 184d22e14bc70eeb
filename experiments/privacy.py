"""Privacy: what passive observers on separate paths learn about which subflows
belong together (docs/privacy.md).

K MPTCP connections from the topology's clients (round-robin, several per
client when K exceeds the clients) to the server, each with a subflow per
path, carry bulk or request/response traffic, all starting together or
staggered over a window. One passive observer per named link captures on the
router's side of it (testbed.harness.observers) and never sees another path.
The run stores, per observer and subflow, what that observer learnt (keys,
MP_JOIN token, the span of each data-sequence space, when it was seen: table
`observed_subflows`) plus the ground truth from the client's sockets
(MPTCP_SUBFLOW_ADDRS), so the attacks in analysis/privacy.py link subflows
across paths and are scored against it.

Scoring uses the pairs that existed: a connection that fell back to TCP or
never joined has no partner subflow, and linking it to anything is a false
positive. The run is invalid when an observer missed a packet, or when fewer
than MIN_JOINED of the connections got a subflow on every observed path;
failed when a connection could not be made or broke.
"""
from __future__ import annotations

import contextlib
import math
import random
import socket
import statistics
import threading
import time
from typing import Literal

from pydantic import Field, model_validator

from testbed.base.netns import run_in_netns
from testbed.core.bulk import CHUNK, filler, receive_stream, send_stream
from testbed.harness.experiment import Experiment, ExperimentParams, RunContext, RunOutput, register
from testbed.harness import tls_keys
from testbed.harness.observers import PathObservers, observed_subflows
from testbed.mptcp import sockopt
from testbed.stack import Stack, StackError

PORT = 5500
# Linux falls some connections back to TCP when many start at once into one
# queue (seen as MP_CAPABLE + DSS, then no MPTCP options); such connections stay
# in the data (an observer sees them too) and are counted, but a run where
# fewer than this share of the K connections has a subflow per path does not
# measure K-connection mixing and is invalid.
MIN_JOINED = 0.75


# Bulk goodput: the servers' byte count is sampled every SAMPLE_S; the window
# runs from the last start + RAMP_S to the first stop, and its nearest samples
# must lie WINDOW_S apart, so the window itself needs GOODPUT_MARGIN_S.
SAMPLE_S = 0.1
RAMP_S = 0.5
WINDOW_S = 1.0
GOODPUT_MARGIN_S = WINDOW_S + 2 * SAMPLE_S


class Params(ExperimentParams):
    """Parameters of the privacy experiment."""
    connections: int = Field(8, ge=1, le=128, description="K concurrent MPTCP connections")
    pattern: Literal["bulk", "reqresp"] = "bulk"
    start: Literal["together", "staggered"] = "together"
    stagger_s: float = Field(3.0, gt=0, le=60, description="staggered: starts uniform over this window")
    seconds: float = Field(4.0, gt=0.5, le=120, description="each connection's traffic time")
    request_bytes: int = Field(200, ge=1, le=1 << 20)
    response_bytes: int = Field(20000, ge=1, le=1 << 24)
    think_ms: float = Field(100, ge=0, le=10000, description="mean (exponential) pause between requests")
    observers: list[str] = Field(default_factory=lambda: ["wifi", "lte"], min_length=2,
                                 description="links with a passive observer each")
    stack: Literal["kernel", "user"] = Field("kernel", description="both ends' MPTCP implementation")
    countermeasure: Literal["none", "dsn-offset", "tls-keys", "dsn-offset+tls-keys"] = Field(
        "none", description="user-space stack extensions (docs/privacy.md): per-subflow DSN offsets, "
                            "MPTCP keys from a TLS exporter, or both")

    @model_validator(mode="after")
    def _bulk_needs_a_goodput_window(self) -> "Params":
        # Shorter, the run has no goodput window (_goodput) and is invalid.
        # Starts spread over stagger_s only when staggered and more than one.
        spread = self.stagger_s if self.start == "staggered" and self.connections > 1 else 0.0
        need = spread + RAMP_S + GOODPUT_MARGIN_S
        if self.pattern == "bulk" and self.seconds < need:
            raise ValueError(f"seconds {self.seconds:g} is too short for bulk: at least {need:g} "
                             f"(start spread {spread:g} s + {RAMP_S:g} s after the last start + "
                             f"{GOODPUT_MARGIN_S:g} s of goodput window)")
        return self

    @model_validator(mode="after")
    def _countermeasure_needs_the_user_stack(self) -> "Params":
        if self.countermeasure != "none" and self.stack != "user":
            raise ValueError(f"countermeasure {self.countermeasure!r} needs stack = 'user' "
                             f"(kernel MPTCP has no such extension)")
        return self


class _KernelEnd:
    """One end of a kernel MPTCP connection (a socket)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def send(self, nbytes: int | None = None, until: float | None = None) -> int:
        """Send nbytes, or until the monotonic time `until`; the bytes sent."""
        return send_stream(self.sock, filler, nbytes=nbytes, until=until)

    def recv_exact(self, nbytes: int) -> int:
        """Read nbytes (fewer only at the end of the stream)."""
        return receive_stream(self.sock, limit=nbytes)

    def drain(self, count: list[int] | None = None) -> None:
        """Read to the end of the stream (adding what arrives to count[0])."""
        receive_stream(self.sock, None if count is None else
                       (lambda d: count.__setitem__(0, count[0] + len(d))))

    def subflows(self) -> list[tuple[str, int, str, int]]:
        """(local addr, port, remote addr, port) per subflow; a fallen-back connection has its one."""
        try:
            return [(a.local[0], a.local[1], a.remote[0], a.remote[1])
                    for a in sockopt.subflow_addrs(self.sock)]
        except OSError:
            if sockopt.is_fallback(self.sock):
                return [(*self.sock.getsockname(), *self.sock.getpeername())]
            raise

    def fell_back(self) -> bool:
        """Whether the connection runs as plain TCP."""
        return sockopt.is_fallback(self.sock)

    def finish(self) -> None:
        """Half-close and wait for the peer's close (both data FINs seen)."""
        self.sock.shutdown(socket.SHUT_WR)
        self.sock.recv(1)

    def close(self) -> None:
        """Release the socket."""
        self.sock.close()


class _UserEnd:
    """One end of a connection of the user-space stack."""

    def __init__(self, conn, timeout: float):
        self.conn, self.timeout = conn, timeout

    def send(self, nbytes: int | None = None, until: float | None = None) -> int:
        """Send nbytes, or until the monotonic time `until`; the bytes sent."""
        sent = 0
        while (nbytes is None or sent < nbytes) and (until is None or time.monotonic() < until):
            n = CHUNK if nbytes is None else min(CHUNK, nbytes - sent)
            self.conn.send(bytes(filler(n)), timeout=self.timeout)
            sent += n
        return sent

    def recv_exact(self, nbytes: int) -> int:
        """Read nbytes (fewer only at the end of the stream)."""
        got = 0
        while got < nbytes:
            d = self.conn.recv(min(CHUNK, nbytes - got), timeout=self.timeout)
            if not d:
                break
            got += len(d)
        return got

    def drain(self, count: list[int] | None = None) -> None:
        """Read to the end of the stream (adding what arrives to count[0])."""
        while data := self.conn.recv(CHUNK, timeout=self.timeout):
            if count is not None:
                count[0] += len(data)

    def subflows(self) -> list[tuple[str, int, str, int]]:
        """(local addr, port, remote addr, port) per subflow, the closed ones too."""
        info = self.conn.info()
        return [(*s.local, *s.remote) for s in info.subflows + info.closed_subflows]

    def fell_back(self) -> bool:
        """Whether the connection runs as plain TCP."""
        return bool(self.conn.info().fallback)

    def finish(self) -> None:
        """Close and wait for the peer's close."""
        self.conn.close()
        self.drain()

    def close(self) -> None:
        """Close (idempotent)."""
        self.conn.close()


def _serve(end, p: Params, errors: list[str], count: list[int]) -> None:
    """One accepted connection: drain it (bulk; bytes into count[0]) or answer
    each request (reqresp)."""
    try:
        if p.pattern == "bulk":
            end.drain(count)
        else:
            while end.recv_exact(p.request_bytes) == p.request_bytes:
                end.send(nbytes=p.response_bytes)
    except (OSError, StackError) as exc:
        errors.append(f"server: {exc}")
    finally:
        end.close()


def _goodput(samples: list[tuple[float, int]], a: float, b: float) -> float | None:
    """Mbit/s the servers read between monotonic times a and b (None for a
    window, or nearest samples, under WINDOW_S apart)."""
    if b - a < WINDOW_S or not samples:
        return None
    at = lambda t: min(samples, key=lambda s: abs(s[0] - t))  # noqa: E731 - the nearest sample
    (ta, ra), (tb, rb) = at(a), at(b)
    return (rb - ra) * 8 / (tb - ta) / 1e6 if tb - ta >= WINDOW_S else None


def _bulk_problem(sent: int, read: int, goodput: float | None) -> str | None:
    """Why a bulk run's goodput does not count (None when it does): the servers
    must read every byte the clients sent, and the goodput window must exist."""
    if read != sent:
        return f"bulk: the servers read {read} bytes, the clients sent {sent} (bound: all of them)"
    if goodput is None:
        return (f"bulk: no goodput window (last start + {RAMP_S:g} s to first stop under "
                f"{WINDOW_S:g} s, bound: {WINDOW_S:g} s)")
    return None


@register
class Privacy(Experiment):
    """K MPTCP connections over shared paths, one passive observer per path."""
    name = "privacy"
    description = "K MPTCP connections over shared paths, a passive observer per path (linking attacks)"
    Params = Params

    def run(self, ctx: RunContext) -> RunOutput:
        p: Params = ctx.params
        tb = ctx.tb
        unknown = [n for n in p.observers if n not in {link.name for link in tb.graph.links}]
        if unknown:
            return RunOutput(metrics={}, status="failed",
                             reason=f"observers: no link {unknown[0]!r} in topology {tb.topology.name!r}")
        rng = random.Random(ctx.spec.seed)
        clients = tb.graph.nodes("client")
        npaths = len(tb.graph.paths_of(clients[0]))
        starts = ([0.0] * p.connections if p.start == "together"
                  else sorted(rng.uniform(0, p.stagger_s) for _ in range(p.connections)))
        thinks = [[rng.expovariate(1000 / p.think_ms) if p.think_ms else 0.0 for _ in range(10000)]
                  for _ in range(p.connections)]
        errors: list[str] = []
        truth: dict[int, set[tuple[str, int, str, int]]] = {i: set() for i in range(p.connections)}
        served: list[threading.Thread] = []
        fell_back: set[int] = set()
        # the cost of a countermeasure: connect() until usable (user stack: joins
        # and TLS included), the servers' bytes over time (bulk), answers received (reqresp)
        setup_s = [math.nan] * p.connections
        received: list[list[int]] = []  # per served connection: bytes its server read
        samples: list[tuple[float, int]] = []
        done = [0] * p.connections
        sent = [0] * p.connections  # bulk: bytes each client handed over (checked against what was read)
        timeout = p.stagger_s + p.seconds + 30
        resources = contextlib.ExitStack()

        def prepare(end) -> None:
            """What the server does with a connection before serving it (TLS, with tls-keys)."""
        if p.stack == "kernel":
            listener = run_in_netns(tb.server.pid, lambda: sockopt.listener(
                PORT, "0.0.0.0", "mptcp", "cubic", min(4096, 2 * p.connections)))
            resources.callback(listener.close)
            listener.settimeout(timeout)

            def accept() -> _KernelEnd:
                conn, _ = listener.accept()
                conn.settimeout(timeout)
                return _KernelEnd(conn)

            def connect(node) -> _KernelEnd:
                sock = run_in_netns(node.pid, lambda: sockopt.mptcp_socket("cubic", "mptcp"))
                sock.settimeout(30)
                try:
                    sock.connect((tb.server_addr, PORT))
                except OSError:
                    sock.close()
                    raise
                return _KernelEnd(sock)
        else:
            ext = {"obfuscate_dsn": "dsn-offset" in p.countermeasure,
                   "external_keys": "tls-keys" in p.countermeasure}
            stacks = {c: resources.enter_context(Stack(netns=tb.node(c).pid, **ext))
                      for c in clients[:p.connections]}
            server = resources.enter_context(Stack(netns=tb.server.pid, **ext))
            lst = server.listen(PORT, backlog=2 * p.connections)
            addrs = {c: [q.addr.client for q in tb.all_paths if q.graph.client == c] for c in stacks}
            server_tls = tls_keys.context(server=True) if ext["external_keys"] else None

            def accept() -> _UserEnd:
                return _UserEnd(lst.accept(timeout=timeout), timeout)

            if server_tls is not None:
                def prepare(end: _UserEnd) -> None:
                    tls_keys.secure(end.conn, server=True, ctx=server_tls)

            def connect(node) -> _UserEnd:
                paths = addrs[node.name]
                if not ext["external_keys"]:
                    return _UserEnd(stacks[node.name].connect((tb.server_addr, PORT), paths=paths,
                                                              timeout=10), timeout)
                # joins only once the keys come from the TLS exporter
                conn = stacks[node.name].connect((tb.server_addr, PORT), paths=paths[:1], timeout=10)
                tls_keys.secure(conn, server=False)
                for addr in paths[1:]:
                    conn.add_subflow(addr, timeout=10)
                return _UserEnd(conn, timeout)

        def serve(end) -> None:
            try:
                prepare(end)
            except (OSError, StackError) as exc:
                errors.append(f"server: {exc}")
                end.close()
                return
            count = [0]
            received.append(count)
            _serve(end, p, errors, count)

        def accept_all() -> None:
            for _ in range(p.connections):
                try:
                    end = accept()
                except (OSError, StackError) as exc:
                    errors.append(f"accept: {exc}")
                    return
                t = threading.Thread(target=serve, args=(end,), daemon=True)
                t.start()
                served.append(t)

        def client(i: int, t0: float) -> None:
            node = tb.node(clients[i % len(clients)])
            time.sleep(max(0.0, t0 + starts[i] - time.monotonic()))
            began = time.monotonic()
            try:
                end = connect(node)
            except (OSError, StackError) as exc:
                errors.append(f"connection {i} from {node.name}: {exc}")
                return
            setup_s[i] = time.monotonic() - began
            try:
                stop = time.monotonic() + p.seconds
                n = 0
                while time.monotonic() < stop:
                    if p.pattern == "bulk":
                        sent[i] += end.send(until=min(stop, time.monotonic() + 0.25))
                    else:
                        end.send(nbytes=p.request_bytes)
                        if end.recv_exact(p.response_bytes) < p.response_bytes:
                            raise OSError("response cut short")
                        time.sleep(min(thinks[i][n % len(thinks[i])], max(0.0, stop - time.monotonic())))
                        n += 1
                        done[i] = n
                    if len(truth[i]) < npaths:
                        truth[i].update(end.subflows())
                truth[i].update(end.subflows())
                if end.fell_back():
                    fell_back.add(i)
                end.finish()
            except (OSError, StackError) as exc:
                errors.append(f"connection {i} from {node.name}: {exc}")
            finally:
                end.close()

        observers = PathObservers(tb, p.observers, ctx.raw_dir)
        wall0 = time.time()
        try:
            acceptor = threading.Thread(target=accept_all, daemon=True)
            acceptor.start()
            t0 = time.monotonic()
            ctx.start_clock()
            wall0 = time.time()
            workers = [threading.Thread(target=client, args=(i, t0), daemon=True)
                       for i in range(p.connections)]
            for w in workers:
                w.start()
            sampling = threading.Event()

            def sample() -> None:  # the servers' byte count over time (bulk goodput)
                while not sampling.wait(SAMPLE_S):
                    samples.append((time.monotonic(), sum(c[0] for c in list(received))))
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            for w in workers:
                w.join(p.stagger_s + p.seconds + 60)
            sampling.set()
            sampler.join(1)
            acceptor.join(5)
            for t in served:
                t.join(10)
            time.sleep(0.3)  # the last FIN/ACKs reach the observers
        finally:
            observers.stop()
            resources.close()
        if errors:
            return RunOutput(metrics={}, status="failed", reason=errors[0])
        obs = observed_subflows(observers.packets(), {PORT}, t0=wall0)
        owner = {sf: str(i) for i, sfs in truth.items() for sf in sfs}
        obs["connection"] = [owner.get((r.client, r.cport, r.server, r.sport))
                             for r in obs.itertuples(index=False)]
        per_path = obs.groupby("path")["connection"].nunique() if not obs.empty else None
        goodput = (_goodput(samples, t0 + max(starts) + RAMP_S, t0 + min(starts) + p.seconds)
                   if p.pattern == "bulk" else None)
        setup_q = statistics.quantiles(setup_s, n=4) if p.connections > 1 else setup_s * 3
        m = {"connections": p.connections, "pattern": p.pattern, "start": p.start,
             "stack": p.stack, "countermeasure": p.countermeasure,
             "setup_ms_median": 1000 * statistics.median(setup_s),
             "setup_ms_p25": 1000 * setup_q[0], "setup_ms_p75": 1000 * setup_q[-1],
             "goodput_mbit": goodput,
             "bulk_bytes": sum(c[0] for c in received) if p.pattern == "bulk" else None,
             "answers_per_s": sum(done) / p.seconds if p.pattern == "reqresp" else None,
             "clients": len(clients), "observers": ",".join(p.observers),
             "observed_subflows": len(obs),
             "subflows_with_truth": int(obs["connection"].notna().sum()) if not obs.empty else 0,
             **{f"connections_seen.{k}": int(v) for k, v in (per_path.items() if per_path is not None else [])}}
        out = RunOutput(metrics=m, tables={"observed_subflows": obs})
        problems = observers.problems()
        if p.pattern == "bulk" and (bad := _bulk_problem(sum(sent), sum(c[0] for c in received), goodput)):
            problems.append(bad)
        joined = [i for i, sfs in truth.items() if len(sfs) >= len(p.observers)]
        m.update({"connections_joined": len(joined), "fallbacks": len(fell_back)})
        if len(joined) < MIN_JOINED * p.connections:
            problems.append(f"{len(joined)} of {p.connections} connections had a subflow on every "
                            f"observed path ({len(fell_back)} fell back to TCP; bound: "
                            f"{MIN_JOINED:.0%} of them)")
        if problems:
            out.status, out.reason = "invalid", problems[0]
        return out
