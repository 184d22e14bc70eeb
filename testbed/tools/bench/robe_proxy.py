"""Soak benchmark of `robe proxy`: many short connections, some clients abort.

    ./tb bench.robe-proxy [--connections 1000] [--concurrency 50] [--abort-pct 20]
                          [--strategy sim+ips] [--join auto]

On a two-path testbed (wifi 2x5 ms, lte 2x10 ms, user-space emulation, client
path manager userspace) the proxy runs in the client namespace as the `robe`
command would (strategy sim+ips, a history file). Clients in the client
namespace, `concurrency` at a time, each either echo 64 KiB through it and
check every byte, or (abort-pct of them, seeded) ask for an endless stream and
reset the connection mid-stream. The proxy's threads and descriptors are
sampled from /proc every 0.2 s. Printed, measured against the target:
the proxy is still up, every echo came back intact, threads and descriptors
at the end are no more than after warm-up, the history file is valid and
counts at least one outcome per connection.
"""
from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from testbed.base.netns import ns_path, run_command, setns_current_thread
from testbed.core.model import HostSettings
from testbed.core.net import Testbed, wait_until
from testbed.core.topology import load
from testbed.mptcp.sockopt import listener

PORT = 5720
PROXY_PORT = 8080
ECHO_BYTES = 64 << 10
REPO_ROOT = Path(__file__).resolve().parents[3]


def _proc_status(pid: int) -> tuple[int, int]:
    """(threads, open descriptors) of pid."""
    threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            threads = int(line.split()[1])
    return threads, len(os.listdir(f"/proc/{pid}/fd"))


def mode_server(tb: Testbed, port: int = PORT) -> socket.socket:
    """Kernel MPTCP listener in the server namespace, one thread per connection;
    the first byte picks what a connection gets: S = an endless stream, E = echo
    until EOF, anything else = nothing until the client closes (idle)."""
    ls = tb.in_ns(tb.server, lambda: listener(port, backlog=256))
    chunk = b"s" * 65536

    def handle(c: socket.socket) -> None:
        with c:
            try:
                mode = c.recv(1)
                if mode == b"S":
                    while True:
                        c.sendall(chunk)
                elif mode == b"E":
                    while data := c.recv(65536):
                        c.sendall(data)
                else:
                    c.recv(1)
            except OSError:
                pass

    def serve() -> None:
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(c,), daemon=True).start()

    threading.Thread(target=serve, name="soak-server", daemon=True).start()
    return ls


def _client(abort: bool, payload: bytes) -> str:
    """One client connection through the proxy; 'ok', 'aborted' or an error."""
    try:
        with socket.create_connection(("127.0.0.1", PROXY_PORT), timeout=30) as s:
            if abort:
                s.sendall(b"S")
                got = 0
                while got < 32 << 10:  # mid-stream: data is flowing both ways
                    chunk = s.recv(65536)
                    if not chunk:
                        return "stream ended early"
                    got += len(chunk)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return "aborted"  # close() below sends the RST
            s.sendall(b"E" + payload)
            s.shutdown(socket.SHUT_WR)
            h, n = hashlib.sha256(), 0
            while chunk := s.recv(65536):
                h.update(chunk)
                n += len(chunk)
            if n != len(payload) or h.digest() != hashlib.sha256(payload).digest():
                return f"echo corrupted ({n} of {len(payload)} bytes)"
            return "ok"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def run_soak(connections: int = 1000, concurrency: int = 50, abort_pct: float = 20,
             seed: int = 1, strategy: str = "sim+ips", join: str = "auto") -> dict[str, Any]:
    """Run the soak; returns the measured figures (see the module docstring)."""
    rng = random.Random(seed)
    plan = [rng.random() * 100 < abort_pct for _ in range(connections)]
    payload = os.urandom(ECHO_BYTES)
    out: dict[str, Any] = {"connections": connections, "concurrency": concurrency,
                           "aborting_clients": sum(plan), "strategy": f"{strategy}, join {join}"}
    with tempfile.TemporaryDirectory(prefix="robe-soak-") as tmp, \
            Testbed(load("two-path", wifi_delay_ms=5, lte_delay_ms=10), backend="userspace",
                    client=HostSettings(path_manager="userspace")) as tb:
        history = Path(tmp) / "history.json"
        ls = mode_server(tb)
        log = open(Path(tmp) / "proxy.log", "w+")
        proxy = tb.popen(tb.client, [sys.executable, "-m", "testbed.robe.cli", "proxy",
                                     "--listen", f"127.0.0.1:{PROXY_PORT}", "--strategy", strategy, "--join", join,
                                     "--history", str(history), "--max-connections",
                                     str(concurrency), "--idle-timeout", "30",
                                     tb.server_addr, str(PORT)],
                         stdout=subprocess.DEVNULL, stderr=log, cwd=str(REPO_ROOT))
        try:
            if not wait_until(lambda: f":{PROXY_PORT}" in run_command(
                    tb.client.pid, ["ss", "-ltnH", "sport", "=", f":{PROXY_PORT}"]).stdout, 15):
                raise RuntimeError("the proxy did not start listening")
            client_ns = ns_path(tb.client.pid)
            pool = ThreadPoolExecutor(concurrency, initializer=setns_current_thread,
                                      initargs=(client_ns,))
            with pool:
                warm = list(pool.map(lambda _: _client(False, payload), range(concurrency)))
                time.sleep(1)
                out["threads_start"], out["fds_start"] = _proc_status(proxy.pid)
                peak = [out["threads_start"], out["fds_start"]]
                stop = threading.Event()

                def sample() -> None:
                    while not stop.wait(0.2):
                        try:
                            t, f = _proc_status(proxy.pid)
                        except OSError:
                            return
                        peak[0], peak[1] = max(peak[0], t), max(peak[1], f)

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                t0 = time.monotonic()
                results = list(pool.map(lambda a: _client(a, payload), plan))
                out["soak_s"] = round(time.monotonic() - t0, 1)
                stop.set()
                sampler.join()
            out["warmup_ok"] = warm.count("ok")
            out["echo_ok"] = results.count("ok")
            out["aborted"] = results.count("aborted")
            errors = [r for r in results if r not in ("ok", "aborted")]
            out["client_errors"] = len(errors)
            out["first_errors"] = sorted(set(errors))[:3]
            out["threads_peak"], out["fds_peak"] = peak
            # the last connections' threads wind down: settle, then measure
            wait_until(lambda: proxy.poll() is not None or
                       _proc_status(proxy.pid)[0] <= out["threads_start"], 15, 0.2)
            out["proxy_alive"] = proxy.poll() is None
            if out["proxy_alive"]:
                out["threads_end"], out["fds_end"] = _proc_status(proxy.pid)
        finally:
            if proxy.poll() is None:
                proxy.send_signal(signal.SIGINT)
                try:
                    proxy.wait(10)
                except subprocess.TimeoutExpired:
                    proxy.kill()
            ls.close()
        from testbed.robe.history import History
        try:
            h = History.load(history)
            out["history_valid"] = True
            out["history_outcomes"] = sum(r.attempts for r in h.records.values())
        except ValueError as exc:
            out["history_valid"] = False
            out["history_error"] = str(exc)
            out["history_outcomes"] = 0
        log.seek(0)
        lines = log.read().splitlines()
        log.close()
        out["proxy_log_lines"] = len(lines)
        out["proxy_failures"] = [line for line in lines if "failed" in line][:3]
        out["proxy_tracebacks"] = sum("Traceback" in line for line in lines)
    return out


def format_report(m: dict[str, Any]) -> tuple[str, bool]:
    """The measured figures against their targets; (text, all targets met)."""
    normal = m["connections"] - m["aborting_clients"]
    rows = [
        ("proxy still up", "yes" if m["proxy_alive"] else "no", "yes", m["proxy_alive"]),
        ("echoes intact", f"{m['echo_ok']} of {normal}", f"{normal} of {normal}",
         m["echo_ok"] == normal),
        ("clients aborted mid-stream", f"{m['aborted']}", f"{m['aborting_clients']}",
         m["aborted"] == m["aborting_clients"]),
        ("proxy threads start/peak/end",
         f"{m['threads_start']}/{m['threads_peak']}/{m.get('threads_end', '-')}",
         "end <= start", m.get("threads_end", 1 << 30) <= m["threads_start"]),
        ("proxy descriptors start/peak/end",
         f"{m['fds_start']}/{m['fds_peak']}/{m.get('fds_end', '-')}",
         "end <= start", m.get("fds_end", 1 << 30) <= m["fds_start"]),
        ("history file", "valid" if m["history_valid"] else f"INVALID: {m.get('history_error')}",
         "valid", m["history_valid"]),
        ("history outcomes", f"{m['history_outcomes']}", f">= {m['connections']}",
         m["history_outcomes"] >= m["connections"]),
        ("tracebacks in the proxy's log", f"{m['proxy_tracebacks']}", "0", m["proxy_tracebacks"] == 0),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"robe proxy soak ({m['strategy']}): {m['connections']} connections, "
             f"{m['concurrency']} at once, "
             f"{m['aborting_clients']} clients abort mid-stream; {m['soak_s']} s",
             f"{'':{width}}  {'measured':>16}  {'target':>16}"]
    for name, measured, target, ok in rows:
        lines.append(f"{name:{width}}  {measured:>16}  {target:>16}  {'ok' if ok else 'MISSED'}")
    if m["first_errors"]:
        lines.append(f"client errors ({m['client_errors']}): {'; '.join(m['first_errors'])}")
    for line in m["proxy_failures"]:
        lines.append(f"proxy said: {line}")
    return "\n".join(lines), all(r[3] for r in rows)
