"""One RobE establishment trial on a running Testbed, for the experiment runner.

    metrics = run_establishment_trial(tb, "sim", {"timeout_s": 8})

The client connects to a listener in the server namespace (unmodified kernel
MPTCP, or the user-space stack with server_stack "user"; a thread of this
process, started once per testbed and closed by the testbed's stop()), sends a
small request, reads the response, waits for the joins and closes. With
client_stack "user" the same strategy runs over the user-space stack
(testbed.robe.backends.UserStackBackend; one stack per testbed in the client
namespace). The caller applies the path condition (blackhole, loss, ...)
beforehand.

scenario_params (all optional):
  timeout_s        establishment deadline (default 8)
  port             server port (default 5600)
  request_bytes    request size (default 100); response_bytes (default 1000)
  join_timeout_s   how long to wait for the joins after setup (default 3)
  timer            RobE_TIMER policy: "rto" (1 s), "rtt", or seconds (default "rto")
  join             auto | userspace | kernel | none (default auto)
  history_dir      where the IPS history (robe-history.json) lives; without it
                   an in-memory history per testbed is used
  client_stack     kernel | user (default kernel); server_stack likewise

Metrics returned (seconds are relative to the start of connect()):
  setup_s          SYN/ACK of the winning attempt received (None: failed)
  ttfb_s           first response byte received (None: failed)
  multipath_s      first additional subflow established (PM sub_established
                   event); None when no join completed within join_timeout_s
  multipath_client_s  the same moment as the kernel stamps it, for either client:
                   kernel sockets: multipath_s (sub_established fires when the
                   join's SYN/ACK arrived); user stack: when the client sent the
                   final ACK of a join that then completed (MP_JOIN's third ACK,
                   or eSIM's MP_JOIN_CAP ACK), from the stack's segment record -
                   its multipath_s is the server's fourth ACK, one RTT later
  outcome          "mptcp" | "fallback_tcp" | "tcp" | "failed"
  winner_path      path of the winning attempt (None: failed)
  syns_sent        SYNs the client sent: kernel counters TcpActiveOpens +
                   TcpExtTCPSynRetrans (MP_CAPABLE, plain and MP_JOIN SYNs);
                   on the user stack the SYNs it sent (retransmissions too)
  rsts_sent        RSTs the client sent (TcpOutRsts; aborted attempts, and
                   the kernel's answers to SYN/ACKs of attempts already reset;
                   on the user stack the RSTs it sent)
  extra_handshakes MP_CAPABLE handshakes that completed besides the winner's
                   (each one cost the server a connection that we reset)
  attempts         MP_CAPABLE/TCP attempts started
  joined_paths     paths joined as subflows
  data_ok          the response arrived complete (sha256 match)
"""
from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable


from testbed.harness.workload.user_socket import UserListener, UserSocket
from testbed.robe import report as R
from testbed.robe.backends import Backend, KernelBackend, UserStackBackend
from testbed.robe.history import History
from testbed.mptcp.sockopt import listener
from testbed.robe.sockets import LocalPath
from testbed.robe.strategies import Options, RobeError, connect
from testbed.robe.timer import TimerPolicy
from testbed.stack import Stack
from testbed.stack.esim import join_cap_in
from testbed.stack.options import MpJoinAck
from testbed.stack.packet import RST, SYN

# run_id:port -> (stack, close) of the servers running (closed by their testbed's stop(); a
# user-stack one also at the end of its run, see release_user_stacks)
_servers: dict[str, tuple[str, Callable[[], None]]] = {}
_histories: dict[str, History] = {}
_client_stacks: dict[str, Stack] = {}  # run_id -> the client namespace's user-space stack


def payload(n: int) -> bytes:
    """n bytes of the trial's fixed response payload."""
    return (hashlib.sha256(b"robe").digest() * (n // 32 + 1))[:n]


def ensure_server(tb: Any, port: int, response_bytes: int, stack: str = "kernel") -> None:
    """An MPTCP listener (unmodified kernel, or the user-space stack with
    stack="user") answering each request with `response_bytes` once
    `request_bytes` arrived; one thread per connection."""
    key = f"{tb.run_id}:{port}"
    running = _servers.get(key)
    if running is not None and running[0] == stack:
        return
    if running is not None:  # the other kind of server on this port: one listener at a time
        running[1]()

    stopping = threading.Event()
    if stack == "user":
        # A user-space stack server accepts RobE_eSIM (an unmodified kernel one never echoes it).
        ls: Any = UserListener(Stack(netns=tb.server.pid, esim=True), port)
        ls.settimeout(0.2)  # the accept loop looks at `stopping` this often
    else:
        ls = tb.in_ns(tb.server, lambda: listener(port))

    def close() -> None:
        if _servers.get(key, (None, None))[1] is not close:
            return  # closed already
        del _servers[key]
        _histories.pop(tb.run_id, None)
        stopping.set()
        if stack == "user":
            t.join(timeout=2)
            ls.close()
            return
        try:
            ls.shutdown(socket.SHUT_RDWR)  # wakes the accept() below; close() alone does not
        except OSError:
            pass
        ls.close()
        t.join(timeout=2)
    body = payload(response_bytes)

    def handle(c: socket.socket) -> None:
        with contextlib.closing(c):
            try:
                c.settimeout(30)
                hdr = c.recv(64)  # "<request_len>\n" then the request
                want, _, rest = hdr.partition(b"\n")
                need = int(want) - len(rest)
                while need > 0:
                    chunk = c.recv(min(65536, need))
                    if not chunk:
                        return
                    need -= len(chunk)
                c.sendall(body)
                c.recv(1)  # wait for the client's close
            except (OSError, ValueError):
                pass

    def serve() -> None:
        while True:
            try:
                c, _ = ls.accept()
            except TimeoutError:
                if stopping.is_set():
                    return
                continue
            except OSError:
                return
            threading.Thread(target=handle, args=(c,), daemon=True).start()

    t = threading.Thread(target=serve, name=f"robe-server-{port}", daemon=True)
    t.start()
    _servers[key] = (stack, close)
    tb.on_stop(close)


def _counters() -> dict[str, int]:
    """TCP/MPTCP counters of the calling thread's namespace."""
    out: dict[str, int] = {}
    for name in ("snmp", "netstat"):
        lines = Path(f"/proc/thread-self/net/{name}").read_text().splitlines()
        for head, vals in zip(lines[::2], lines[1::2]):
            prefix, keys = head.split(":", 1)
            for k, v in zip(keys.split(), vals.split(":", 1)[1].split()):
                out[prefix + k] = int(v)
    return out


def tb_paths(tb: Any) -> list[LocalPath]:
    """The testbed's client paths as RobE paths, the default-route path first."""
    default = tb.topology.default.name
    ps = [LocalPath(p.name, p.addr.client, p.client_if, default=(p.name == default)) for p in tb.paths]
    return sorted(ps, key=lambda p: not p.default)


def client_backend(tb: Any, client_stack: str) -> Backend:
    """Kernel sockets, or the user-space stack of the testbed's client namespace
    (made on first use, with its segments recorded for the SYN/RST counts, closed by the testbed's stop())."""
    if client_stack != "user":
        return KernelBackend()
    st = _client_stacks.get(tb.run_id)
    if st is None:
        st = _client_stacks[tb.run_id] = Stack(netns=tb.client.pid, record=True)

        def close() -> None:
            if _client_stacks.get(tb.run_id) is st:
                del _client_stacks[tb.run_id]
                st.close()
        tb.on_stop(close)
    return UserStackBackend(st)


def release_user_stacks(tb: Any) -> None:
    """Close the testbed's user-space stacks (client and server) at the end of a run: their
    nftables tables are not part of the testbed as built, so while they stand its reset
    check fails and the next run gets a fresh testbed. The next run makes new ones."""
    st = _client_stacks.pop(tb.run_id, None)
    if st is not None:
        st.close()
    for key, (stack, close) in list(_servers.items()):
        if key.startswith(f"{tb.run_id}:") and stack == "user":
            close()


def _sent_flags(backend: Backend, since: int) -> dict[str, int]:
    """SYNs and RSTs the user stack sent from its segment record's index `since` on."""
    if not isinstance(backend, UserStackBackend):
        return {}
    segs = [s.segment for s in backend.stack.sent[since:]]
    return {"syns": sum(1 for g in segs if g.flags & SYN), "rsts": sum(1 for g in segs if g.flags & RST)}


def join_acks_sent_s(backend: Backend, since: int, addrs: set[str], t0_ns: int) -> float | None:
    """User stack: seconds from t0 (monotonic) to the first final ACK of a join (MP_JOIN's
    third ACK or MP_JOIN_CAP) it sent from one of addrs; None for kernel sockets or none sent."""
    if not isinstance(backend, UserStackBackend) or not addrs:
        return None
    sent = [s for s in backend.stack.sent[since:] if s.src in addrs and not s.segment.flags & SYN
            and (s.segment.option(MpJoinAck) is not None or join_cap_in(s.segment.options) is not None)]
    if not sent:
        return None
    wall_minus_mono_ns = time.time_ns() - time.monotonic_ns()  # the record is stamped by the wall clock
    return (min(s.time for s in sent) * 1e9 - wall_minus_mono_ns - t0_ns) / 1e9


def _history(tb: Any, params: dict[str, Any]) -> History:
    if params.get("history_dir"):
        return History.load(Path(params["history_dir"]) / "robe-history.json")
    return _histories.setdefault(tb.run_id, History())


def run_establishment_trial(tb: Any, strategy: str, scenario_params: dict[str, Any]) -> dict[str, Any]:
    """One RobE connect over the testbed against a kernel MPTCP server; the trial's metrics."""
    p = dict(scenario_params or {})
    timeout = float(p.get("timeout_s", 8))
    port = int(p.get("port", 5600))
    req_n, resp_n = int(p.get("request_bytes", 100)), int(p.get("response_bytes", 1000))
    join_timeout = float(p.get("join_timeout_s", 3))
    ensure_server(tb, port, resp_n, p.get("server_stack", "kernel"))
    opts = Options(timer=TimerPolicy.parse(str(p.get("timer", "rto"))), join=p.get("join", "auto"),
                   join_timeout_s=join_timeout, history=_history(tb, p))
    backend = client_backend(tb, p.get("client_stack", "kernel"))
    dest = (tb.server_addr, port)
    before = tb.in_ns(tb.client, _counters)
    sent_before = len(backend.stack.sent) if isinstance(backend, UserStackBackend) else 0
    box: dict[str, Any] = {}

    def client() -> None:
        try:
            conn, rep = connect(dest, strategy, tb_paths(tb), timeout, options=opts, backend=backend)
        except RobeError as exc:
            box["report"] = exc.report
            return
        box["report"] = rep
        sock = conn
        if isinstance(backend, UserStackBackend):
            sock = UserSocket(backend.stack, owns_stack=False, mptcp=strategy != "tcp")
            sock.conn = conn
        with contextlib.closing(sock):
            sock.settimeout(max(1.0, timeout))
            try:
                sock.sendall(b"%d\n" % req_n + payload(req_n))
                first = sock.recv(65536)
                box["ttfb_ns"] = time.monotonic_ns()
                data = first
                while first and len(data) < resp_n:
                    first = sock.recv(65536)
                    data += first
                box["data_ok"] = hashlib.sha256(data).digest() == hashlib.sha256(payload(resp_n)).digest()
            except OSError as exc:
                box["io_error"] = str(exc)
            rep.wait_joins(join_timeout + 1)

    tb.in_ns(tb.client, client)
    time.sleep(0.05)  # let late RSTs (answers to stray SYN/ACKs) be counted
    after = tb.in_ns(tb.client, _counters)
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    user_sent = _sent_flags(backend, sent_before)
    rep: R.Report = box["report"]
    completed = rep.find(R.CONNECT_COMPLETED)
    if rep.outcome == "failed":
        outcome = "failed"
    elif strategy == "tcp":
        outcome = "tcp"
    else:
        outcome = "fallback_tcp" if rep.outcome == "fallback_tcp" else "mptcp"
    ttfb = box.get("ttfb_ns")
    joined = {e.path for e in rep.find(R.JOIN_ESTABLISHED) if e.path}
    multipath_client = rep.multipath_s
    if isinstance(backend, UserStackBackend):
        addrs = {p.local_addr for p in tb_paths(tb) if p.name in joined}
        multipath_client = join_acks_sent_s(backend, sent_before, addrs, rep.t0_ns) if joined else None
    return {
        "setup_s": rep.setup_s,
        "ttfb_s": None if ttfb is None else (ttfb - rep.t0_ns) / 1e9,
        "multipath_s": rep.multipath_s,
        "multipath_client_s": multipath_client,
        "outcome": outcome,
        "winner_path": rep.winner,
        "syns_sent": user_sent["syns"] if user_sent else
        d.get("TcpActiveOpens", 0) + d.get("TcpExtTCPSynRetrans", 0),
        "rsts_sent": user_sent["rsts"] if user_sent else d.get("TcpOutRsts", 0),
        "extra_handshakes": max(0, len(completed) - 1),
        "attempts": len(rep.find(R.ATTEMPT_STARTED)),
        "joined_paths": ",".join(sorted(joined)),
        "data_ok": bool(box.get("data_ok")),
        "esim_subflows": sum(1 for e in rep.find(R.JOIN_ESTABLISHED) if e.detail.get("via") == "esim"),
        "esim_fallback": bool(rep.find(R.ESIM_FALLBACK)),
        "error": rep.error or box.get("io_error"),
    }


__all__ = ["run_establishment_trial", "ensure_server", "release_user_stacks", "tb_paths", "payload"]
