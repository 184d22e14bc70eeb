"""The inactivity experiment's two programs, run in the testbed's namespaces.

    python -m experiments.inactivity_peer server --stack kernel --port 5000 --p1 65536 --out s.json
    python -m experiments.inactivity_peer client --stack kernel --server 10.100.0.2 --p1 65536 \
        --p2 65536 --out c.json

`server` / `client` (make-after-break): the client sends --p1 bytes, the server
answers one byte once it has them all (nothing is in flight when the outage
starts), and the client prints `{"ready": t_ns}` on stdout. It then waits for a
line `resume <local address> <join 0|1>` on stdin (the experiment sends it when
a path is back), joins from that address when told to (user-space stack; the
kernel's path manager joins by itself when it gets an endpoint, and the kernel
client waits for that join before it closes), sends --p2 bytes more on the same
connection and closes. The server reads to the end,
hashing everything, samples its view of the connection every --sample-ms, and
writes its result; so does the client.

`state-server` / `state-client`: the client opens --connections connections and
sends --p1 bytes on each; the server accepts them all, prints `{"ready": t_ns}`
and then samples every --sample-ms, until `stop` on stdin: connections held,
subflows, and memory (kernel: the socket memory of the namespace's TCP subflows
from sock_diag; user-space stack: the process's RSS) as JSON lines in --out.

Every time is time.monotonic_ns(): one clock for every namespace.
With --stack user the stack gets --ito-s / --ito-min-s / --ito-max-s (the
inactivity-time option, testbed.stack's inactivity_s / inactivity_bounds_s).
"""
from __future__ import annotations

import argparse
import errno as errno_mod
import hashlib
import json
import os
import random
import resource
import select
import socket
import sys
import threading
import time
from typing import Any

from testbed.mptcp import sockopt as so
from testbed.stack import Stack, StackError, inactivity

PORT = 5000


def now() -> int:
    """The one clock: time.monotonic_ns()."""
    return time.monotonic_ns()


def payload(seed: int, n: int) -> bytes:
    """n pseudo-random bytes from a seed (what the client sends, what the server must get)."""
    return random.Random(seed).randbytes(n)


def say(**fields: Any) -> None:
    """One JSON line on stdout for the experiment driving this program."""
    print(json.dumps(fields), flush=True)


def stack_options(a: argparse.Namespace) -> dict[str, Any]:
    """The Stack keyword arguments of the inactivity-time option, when one is asked for."""
    if a.ito_s is None:
        return {}
    opts: dict[str, Any] = {"inactivity_s": a.ito_s}
    if a.ito_min_s is not None or a.ito_max_s is not None:  # a bound not given: the option's own
        opts["inactivity_bounds_s"] = (0 if a.ito_min_s is None else a.ito_min_s,
                                       inactivity.TIMER_MAX if a.ito_max_s is None else a.ito_max_s)
    return opts


def open_stack(a: argparse.Namespace) -> Stack:
    """A user-space stack attached to every interface of --netns."""
    return Stack(netns=a.netns, cc="cubic", **stack_options(a))


def _error(exc: BaseException) -> dict[str, Any]:
    code = getattr(exc, "errno", None)
    return {"error": f"{type(exc).__name__}: {exc}", "errno": code,
            "errno_name": errno_mod.errorcode.get(code, "") if code else ""}


# ---- make-after-break: one connection ---------------------------------------------
class ServerView:
    """What the server holds of its one connection, sampled: alive or not, subflows."""

    def __init__(self, conn: Any, stack: Stack | None):
        self.conn, self.stack = conn, stack
        self.samples: list[tuple[int, int, int]] = []  # t_ns, held (0/1), subflows
        self._stop = threading.Event()

    def sample(self) -> None:
        """Record whether the connection is still held and how many subflows it has."""
        if self.stack is not None:
            info = self.conn.info()
            held = int(self.conn in self.stack.connections and self.conn.state != "CLOSED")
            self.samples.append((now(), held, len(info.subflows) if held else 0))
            return
        try:
            # MPTCP_INFO answers on a closed connection too: the msk's own state (TCP_INFO
            # on an MPTCP socket) says whether the kernel still holds it
            if so.tcp_info(self.conn).state == "CLOSE":
                raise ConnectionResetError(errno_mod.ENOTCONN, "the connection is closed")
            info = so.mptcp_info(self.conn)
            # subflows counts the additional ones; subflows_total (6.10+) the initial too
            n = info.subflows_total if info.subflows_total is not None else info.subflows + 1
            held = 1
        except OSError:
            n, held = 0, 0
        self.samples.append((now(), held, n))

    def run(self, period_s: float) -> None:
        """Sample every period_s until stopped (in a thread)."""
        while not self._stop.wait(period_s):
            self.sample()

    def stop(self) -> None:
        """Stop sampling after one last sample."""
        self._stop.set()
        self.sample()


def run_server(a: argparse.Namespace) -> dict[str, Any]:
    """Accept one connection, confirm --p1 bytes, read to the end; report hash, times, samples."""
    out: dict[str, Any] = {"role": "server", "stack": a.stack}
    stack = open_stack(a) if a.stack == "user" else None
    try:
        lst: Any = stack.listen(a.port) if stack else so.listener(a.port, "0.0.0.0", "mptcp", "cubic")
        say(listening=now())
        conn = lst.accept(timeout=a.timeout) if stack else lst.accept()[0]
        out["accepted_ns"] = now()
        if stack is None:
            conn.settimeout(a.timeout)
        view = ServerView(conn, stack)
        view.sample()
        sampler = threading.Thread(target=view.run, args=(a.sample_ms / 1000,), daemon=True)
        sampler.start()
        stopped = threading.Event()
        threading.Thread(target=_stop_on_command, args=(conn, stack, stopped), daemon=True).start()
        digest, got = hashlib.sha256(), 0
        try:
            while True:
                data = (conn.recv(65536, timeout=a.timeout) if stack else conn.recv(65536))
                if not data:
                    break
                t = now()
                if got < a.p1 <= got + len(data):
                    out["p1_done_ns"] = t
                    (conn.send(b"k", timeout=a.timeout) if stack else conn.sendall(b"k"))
                if got + len(data) > a.p1 and "p2_first_ns" not in out:
                    out["p2_first_ns"] = t
                digest.update(data)
                got += len(data)
                out["last_byte_ns"] = t
            if not stopped.is_set():
                out["eof_ns"] = now()
        except (OSError, StackError) as exc:
            if not stopped.is_set():
                out.update(_error(exc), failed_ns=now())
        if stopped.is_set():
            out["stopped_ns"] = now()
        view.stop()
        out.update(bytes_received=got, sha256_received=digest.hexdigest(), samples=view.samples)
        if stack:
            out["ito"] = _ito(conn)
            conn.close()
            out["stack_log"] = stack.log_lines[-20:]
        else:
            conn.close()
    finally:
        if stack:
            stack.close()
    return out


def _stop_on_command(conn: Any, stack: Stack | None, stopped: threading.Event) -> None:
    """`stop` on stdin (the client is done and the server still waits): end the connection
    so the server reports what it has; not counted as the connection ending by itself."""
    if sys.stdin.readline().strip() != "stop":
        return
    stopped.set()
    try:
        conn.abort() if stack else conn.shutdown(socket.SHUT_RDWR)
    except (OSError, StackError):
        pass


def run_client(a: argparse.Namespace) -> dict[str, Any]:
    """Send --p1, wait for the server's confirmation, then for `resume` on stdin, then --p2 and close."""
    out: dict[str, Any] = {"role": "client", "stack": a.stack}
    stack = open_stack(a) if a.stack == "user" else None
    data = payload(a.seed, a.p1 + a.p2)
    out["sha256_sent"], out["bytes_sent"] = hashlib.sha256(data).hexdigest(), len(data)
    try:
        if stack:
            conn: Any = stack.connect((a.server, a.port), paths=[a.first], timeout=10)
            send = lambda d: conn.send(d, timeout=a.timeout)  # noqa: E731
            recv = lambda: conn.recv(65536, timeout=a.timeout)  # noqa: E731
        else:
            conn = so.mptcp_socket("cubic")
            conn.bind((a.first, 0))
            conn.settimeout(10)
            conn.connect((a.server, a.port))
            conn.settimeout(a.timeout)
            send, recv = conn.sendall, lambda: conn.recv(65536)
        out["established_ns"] = now()
        send(data[:a.p1])
        if recv() != b"k":
            raise ConnectionError(errno_mod.ECONNRESET, "no confirmation of the first part")
        say(ready=now())
        line = sys.stdin.readline().split()
        if not line or line[0] != "resume":
            out["aborted"] = "no resume command"
            return out
        addr, join = line[1], line[2] == "1"
        out["resume_ns"] = now()
        if stack:
            _user_resume(conn, addr, join, a.timeout, out)
        send(data[a.p1:])
        out["p2_queued_ns"] = now()
        if stack:
            conn.close()
            conn.wait_closed(a.timeout)
        else:
            if join:
                _kernel_wait_join(conn, addr, a.timeout, out)
            conn.shutdown(socket.SHUT_WR)
            while recv():
                pass
        out["done_ns"] = now()
    except (OSError, StackError) as exc:
        out.update(_error(exc), failed_ns=now())
    finally:
        if stack:
            out["ito"] = _ito(conn) if "conn" in locals() else None
            out["stack_log"] = stack.log_lines[-20:]
            stack.close()
    return out


def _kernel_wait_join(conn: socket.socket, addr: str, timeout: float, out: dict[str, Any]) -> None:
    """Kernel client: wait until the path manager's subflow from addr is established before
    shutting down. Shutting down while that join is still in SYN_SENT makes the kernel drop it
    (mptcp_subflow_shutdown() disconnects SYN_SENT subflows once the DATA_FIN is due); the
    server's SYN/ACK then finds no socket and the client's TCP answers with a bare RST
    (MPJoinSynTx 1, no MPJoinSynAckRx, TcpOutRsts 1), and the data waits for a dead path."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if any(sf.addrs.local[0] == addr and sf.tcp.state == "ESTABLISHED" for sf in so.subflows(conn)):
                out["joined_ns"] = now()
                return
        except OSError:
            pass
        time.sleep(0.005)
    out["join_error"] = f"no established subflow from {addr} within {timeout:g} s"


def _user_resume(conn: Any, addr: str, join: bool, timeout: float, out: dict[str, Any]) -> None:
    """What a user-space client does when a path is back: join from a new address; with ITO
    in force and no subflow up, re-establish at once (Connection.resume) instead of waiting
    for half the timer. Failures are recorded, the data is sent anyway."""
    ito = conn.info().inactivity
    if ito is not None and (ito.inactive_for_s is not None or conn.state == "CLOSED"):
        try:  # every usable local address, the new one included
            conn.resume(timeout=timeout)
            out["resumed_ns"] = now()
        except StackError as exc:
            out["resume_error"] = str(exc)
    elif join:
        try:
            conn.add_subflow(addr, timeout=timeout)
            out["joined_ns"] = now()
        except StackError as exc:
            out["join_error"] = str(exc)


def _ito(conn: Any) -> dict[str, Any] | None:
    """The connection's ITO values as the stack holds them (None: ITO not in force)."""
    ito = conn.info().inactivity
    if ito is None:
        return None
    return {"local_s": ito.local_s, "peer_s": ito.peer_s, "adopted_s": ito.adopted_s,
            "sends": ito.sends, "resumed": ito.resumed}


# ---- server state for N idle connections ---------------------------------------------
def _kernel_subflow_memory() -> tuple[int, int]:
    """(TCP sockets other than listeners, their socket memory in bytes) in this namespace,
    from sock_diag's SK_MEMINFO (every kernel MPTCP subflow is a TCP socket)."""
    from pyroute2 import DiagSocket

    skmeminfo = 1 << (7 - 1)  # INET_DIAG_SKMEMINFO
    count = mem = 0
    with DiagSocket() as ds:
        ds.bind()
        for msg in ds.get_sock_stats(family=socket.AF_INET, protocol=socket.IPPROTO_TCP,
                                     extensions=skmeminfo):
            if msg["idiag_state"] == 10:  # TCP_LISTEN
                continue
            count += 1
            raw = msg.get_attr("INET_DIAG_SKMEMINFO")
            if raw:
                words = bytes.fromhex(raw.replace(":", "")) if isinstance(raw, str) else bytes(raw)
                vals = [int.from_bytes(words[i:i + 4], "little") for i in range(0, len(words), 4)]
                # rmem_alloc, rcvbuf, wmem_alloc, sndbuf, fwd_alloc, wmem_queued, optmem
                mem += vals[0] + vals[2] + vals[4] + vals[5] + vals[6]
    return count, mem


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_state_server(a: argparse.Namespace) -> dict[str, Any]:
    """Accept --connections connections, read --p1 bytes on each, then sample what is held until `stop`."""
    out: dict[str, Any] = {"role": "state-server", "stack": a.stack}
    stack = open_stack(a) if a.stack == "user" else None
    conns: list[Any] = []
    gone: dict[int, int] = {}  # index -> t_ns the server saw the connection end
    try:
        lst: Any = (stack.listen(a.port, backlog=a.connections) if stack
                    else so.listener(a.port, "0.0.0.0", "mptcp", "cubic", backlog=a.connections))
        say(listening=now())
        for _ in range(a.connections):
            c = lst.accept(timeout=a.timeout) if stack else lst.accept()[0]
            got = 0
            while got < a.p1:
                d = c.recv(a.p1 - got, timeout=a.timeout) if stack else c.recv(a.p1 - got)
                if not d:
                    break
                got += len(d)
            conns.append(c)
        out["accepted"] = len(conns)
        say(ready=now())
        with open(a.out + ".samples", "w") as f:
            while True:
                t = now()
                if stack:
                    live = [c for c in conns if c in stack.connections and c.state != "CLOSED"]
                    # established subflows only, as the kernel counts them: a join left
                    # half-open when the paths went down is no subflow that "died" later
                    subflows = sum(1 for c in live for sf in c.info().subflows
                                   if sf.fully_established and sf.state not in ("SYN_SENT", "SYN_RCVD"))
                    mem = _rss_bytes()
                else:
                    _reap(conns, gone)
                    live = [c for i, c in enumerate(conns) if i not in gone]
                    subflows, mem = _kernel_subflow_memory()
                f.write(json.dumps({"t_ns": t, "held": len(live), "subflows": subflows,
                                    "memory_bytes": mem}) + "\n")
                f.flush()
                r, _, _ = select.select([sys.stdin], [], [], a.sample_ms / 1000)
                if r and sys.stdin.readline().strip() in ("stop", ""):
                    break
    except (OSError, StackError) as exc:
        out.update(_error(exc), failed_ns=now())
    finally:
        out["stack_log"] = stack.log_lines[-20:] if stack else []
        if stack:
            stack.close()
    return out


def _reap(conns: list[socket.socket], gone: dict[int, int]) -> None:
    """Close the kernel connections that ended (readable with EOF or an error), as a server would."""
    live = {c.fileno(): i for i, c in enumerate(conns) if i not in gone}
    if not live:
        return
    p = select.poll()
    for fd in live:
        p.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
    for fd, _ev in p.poll(0):
        i = live[fd]
        try:
            ended = conns[i].recv(4096, socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            ended = False
        except OSError:
            ended = True
        if ended:
            gone[i] = now()
            conns[i].close()


def run_state_client(a: argparse.Namespace) -> dict[str, Any]:
    """Open --connections connections, send --p1 bytes on each, hold them until `stop`."""
    out: dict[str, Any] = {"role": "state-client", "stack": a.stack}
    stack = open_stack(a) if a.stack == "user" else None
    conns: list[Any] = []
    data = payload(a.seed, a.p1)
    try:
        if stack:
            for _ in range(a.connections):
                c = stack.connect((a.server, a.port), paths=[a.first], timeout=10)
                c.send(data, timeout=a.timeout)
                conns.append(c)
        else:
            for start in range(0, a.connections, CONNECT_BATCH):
                conns += _kernel_batch(a, min(CONNECT_BATCH, a.connections - start), data)
        out["opened"] = len(conns)
        say(ready=now())
        sys.stdin.readline()
    except (OSError, StackError) as exc:
        out.update(_error(exc), failed_ns=now(), opened=len(conns))
        say(failed=now(), error=out["error"])
    finally:
        if stack:
            stack.close()
    return out


CONNECT_BATCH = 50  # kernel connections connecting at once (one at a time took > 50 s for 1,000)


def _kernel_batch(a: argparse.Namespace, n: int, data: bytes) -> list[socket.socket]:
    """n kernel MPTCP connections to the server, connected at once (non-blocking), p1 sent on each."""
    socks = []
    for _ in range(n):
        c = so.mptcp_socket("cubic")
        c.bind((a.first, 0))
        c.setblocking(False)
        c.connect_ex((a.server, a.port))
        socks.append(c)
    pending, deadline = set(socks), time.monotonic() + 10
    while pending:
        _, ready, _ = select.select([], list(pending), [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError(errno_mod.ETIMEDOUT, f"{len(pending)} of {n} connections not up within 10 s")
        for c in ready:
            err = c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, f"connect: {os.strerror(err)}")
            pending.discard(c)
    for c in socks:
        c.setblocking(True)
        c.settimeout(a.timeout)
        c.sendall(data)
    return socks


ROLES = {"server": run_server, "client": run_client, "state-server": run_state_server,
         "state-client": run_state_client}


def main(argv: list[str] | None = None) -> int:
    """Command line: run one role and write its result as JSON to --out."""
    p = argparse.ArgumentParser(prog="python -m experiments.inactivity_peer")
    p.add_argument("role", choices=sorted(ROLES))
    p.add_argument("--out", required=True)
    p.add_argument("--stack", choices=["kernel", "user"], default="kernel")
    p.add_argument("--netns", help="user stack: the namespace file to attach in")
    p.add_argument("--port", type=int, default=PORT)
    p.add_argument("--server", help="client: the server's address")
    p.add_argument("--first", help="client: the local address of the first subflow")
    p.add_argument("--p1", type=int, default=65536, help="bytes before the outage (per connection)")
    p.add_argument("--p2", type=int, default=65536, help="bytes after the outage")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--sample-ms", type=float, default=100.0)
    p.add_argument("--timeout", type=float, default=60.0, help="every blocking call's timeout, s")
    p.add_argument("--ito-s", type=int, help="user stack: the inactivity time this side asks for, s")
    p.add_argument("--ito-min-s", type=int, help="user stack: local lower bound on an adopted value")
    p.add_argument("--ito-max-s", type=int, help="user stack: local upper bound on an adopted value")
    a = p.parse_args(argv)
    if a.stack == "user" and not a.netns:
        p.error("--stack user needs --netns")
    if a.role.endswith("client") and not (a.server and a.first):
        p.error("a client needs --server and --first")
    # N connections: a descriptor each (kernel), more than the default soft limit of 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    result = ROLES[a.role](a)
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
