"""`robe` command: a netcat-like client and a local TCP->RobE/MPTCP proxy.

    robe connect --strategy sim HOST PORT            stdin -> socket -> stdout
    robe proxy --listen 127.0.0.1:8080 --strategy sim HOST PORT

Paths: `--bind-path NAME=ADDR[%IFNAME]` (repeatable, the first is the default
path) or discovered from the local interfaces that carry a route to HOST
(default route first).
Errors are one line on stderr with a non-zero exit status, never a traceback.

On a shared host: subflow endpoints the kernel path manager needs are added
only for addresses without one and deleted when their connection closes, at
exit and on SIGINT/SIGTERM/SIGHUP. The proxy serves at most --max-connections
clients at once (others wait in the listen backlog), drops a connection idle
in both directions for --idle-timeout s, and survives clients that reset
(SIGPIPE stays ignored; a failed connection is one line on stderr).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import select
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from testbed.robe import endpoints
from testbed.robe import paths as P
from testbed.robe.history import History
from testbed.robe.report import Report
from testbed.robe.strategies import STRATEGIES, Options, RobeError, connect
from testbed.robe.timer import TimerPolicy


class UsageError(Exception):
    """A one-line error for the user (exit status 1)."""


class Terminated(Exception):
    """SIGTERM or SIGHUP arrived (raised in the main thread by the handler)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


CAP_NET_ADMIN, CAP_NET_RAW = 12, 13


def missing_capabilities() -> list[str]:
    """Capabilities robe needs that this process lacks (path manager, SO_BINDTODEVICE)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                eff = int(line.split()[1], 16)
                return [name for bit, name in ((CAP_NET_ADMIN, "CAP_NET_ADMIN"),
                                               (CAP_NET_RAW, "CAP_NET_RAW"))
                        if not eff >> bit & 1]
    except (OSError, ValueError, IndexError):
        pass
    return []


def _bounded(kind: type, lo: float, hi: float, unit: str = ""):
    """argparse type: a finite int or float in [lo, hi]."""
    def parse(text: str) -> float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} {text!r}") from None
        if not (math.isfinite(v) and lo <= v <= hi):
            raise argparse.ArgumentTypeError(f"must be in [{lo:g}, {hi:g}]{unit}, got {text}")
        return v
    return parse


def _seconds(lo: float, hi: float):
    """argparse type: a finite number of seconds in [lo, hi]."""
    return _bounded(float, lo, hi, " s")


def _count(lo: int, hi: int):
    """argparse type: an integer in [lo, hi]."""
    return _bounded(int, lo, hi)


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 0 < v < 65536:
        raise argparse.ArgumentTypeError(f"port out of range: {v}")
    return v


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected ADDR:PORT, got {text!r}")
    return host, _port(port)


def _timer(text: str) -> TimerPolicy:
    try:
        return TimerPolicy.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        print(f"robe: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """The `robe` command line: connect, proxy, paths, history."""
    ap = _Parser(prog="robe", description="Robust MPTCP session establishment (RobE) client")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    common = _Parser(add_help=False)
    common.add_argument("--strategy", default="sim", choices=sorted(STRATEGIES))
    common.add_argument("--bind-path", action="append", default=[], metavar="NAME=ADDR[%IF]")
    common.add_argument("--paths", help="comma-separated subset/order of path names")
    common.add_argument("--timeout", type=_seconds(0.001, 3600), default=10.0,
                        help="establishment deadline, s (at most 3600)")
    common.add_argument("--timer", type=_timer, default=TimerPolicy(),
                        help="RobE_TIMER: rto (1 s, default), rtt, or seconds (0.5, 300ms)")
    common.add_argument("--join", default="auto", choices=["auto", "userspace", "kernel", "none"])
    common.add_argument("--history", help="IPS history file (default $ROBE_HISTORY or "
                                          "~/.cache/robe/history.json)")
    common.add_argument("--report", choices=["none", "json", "text"], default="none",
                        help="print the establishment report to stderr")
    c = sub.add_parser("connect", parents=[common], help="netcat-like client")
    c.add_argument("host")
    c.add_argument("port", type=_port)
    c.add_argument("--report-wait", type=_seconds(0, 60), default=2.0,
                   help="at exit, wait this long for pending joins before reporting")
    x = sub.add_parser("proxy", parents=[common], help="plain TCP in, RobE/MPTCP out")
    x.add_argument("--listen", type=_hostport, required=True, metavar="ADDR:PORT")
    x.add_argument("--max-connections", type=_count(1, 10_000), default=64,
                   help="clients served at once; more wait in the listen backlog (default 64)")
    x.add_argument("--idle-timeout", type=_seconds(0.1, 86_400), default=300.0,
                   help="close a connection idle in both directions this long, s (default 300)")
    x.add_argument("host")
    x.add_argument("port", type=_port)
    return ap


def _setup(args: argparse.Namespace, dest: tuple[str, int]) -> tuple[list, Options]:
    try:
        found = P.parse_bind(args.bind_path) if args.bind_path else P.discover(dest[0])
        sel = P.select(found, [n.strip() for n in args.paths.split(",")] if args.paths else None)
        history = History.load(args.history)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return sel, Options(timer=args.timer, join=args.join, history=history)


def _resolve(host: str, port: int) -> tuple[str, int]:
    try:
        return socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][:2]
    except socket.gaierror as exc:
        raise UsageError(f"cannot resolve {host!r}: {exc.strerror}") from None


def _emit(rep: Report, fmt: str, prefix: str = "") -> None:
    if fmt == "json":
        print(json.dumps(rep.to_dict()), file=sys.stderr, flush=True)
    elif fmt == "text":
        s = rep.summary()
        print(f"robe: {prefix}{rep.strategy} {rep.outcome} via {s['winner'] or '-'} setup "
              f"{_ms(s['setup_s'])} multipath {_ms(s['multipath_s'])} joined {s['joined'] or '-'}",
              file=sys.stderr, flush=True)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f} ms"


def _pump(src: socket.socket | int, dst: socket.socket, done: threading.Event,
          activity: list[float] | None = None, failures: list[str] | None = None) -> None:
    """Copy until EOF or an error, then half-close the destination.
    `activity[0]` is stamped whenever bytes moved (the proxy's idle watchdog);
    an error is appended to `failures` as "reading: ..." or "writing: ..."."""
    step = "reading"
    try:
        while True:
            step = "reading"
            # A descriptor is read with os.read(): a daemon thread blocked in a
            # buffered stdin read would abort the interpreter's shutdown on SIGTERM.
            data = src.recv(65536) if isinstance(src, socket.socket) else os.read(src, 65536)
            if not data:
                break
            if activity is not None:
                activity[0] = time.monotonic()
            step = "writing"
            dst.sendall(data)
            if activity is not None:
                activity[0] = time.monotonic()
    except OSError as exc:  # reset, broken pipe, or shut down by the watchdog: this direction ends
        if failures is not None:
            failures.append(f"{step}: {exc.strerror or exc}")
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        done.set()


def cmd_connect(args: argparse.Namespace) -> int:
    """robe connect: stdin -> RobE connection -> stdout."""
    dest = _resolve(args.host, args.port)
    paths, opts = _setup(args, dest)
    try:
        sock, rep = connect(dest, args.strategy, paths, args.timeout, options=opts)
    except RobeError as exc:
        _emit(exc.report, args.report)
        raise UsageError(f"{args.strategy}: {exc}") from None
    up_done = threading.Event()
    threading.Thread(target=_pump, args=(sys.stdin.fileno(), sock, up_done), daemon=True).start()
    out = sys.stdout.buffer
    try:
        while True:
            _wait_readable(sock)
            data = sock.recv(65536)
            if not data:
                break
            out.write(data)
            out.flush()
    except BrokenPipeError:
        pass  # the reader of our stdout went away (robe connect ... | head)
    except OSError as exc:
        raise UsageError(f"connection: {exc.strerror or exc}") from None
    finally:
        rep.wait_joins(args.report_wait)
        _emit(rep, args.report)
        sock.close()
    return 0


class Proxy:
    """robe proxy: one serving thread (plus two copying threads) per client,
    at most `max_connections` at once; every failure stays in its connection."""

    def __init__(self, args: argparse.Namespace, dest: tuple[str, int], paths: list,
                 opts: Options, listener: socket.socket):
        self.args, self.dest, self.paths, self.opts = args, dest, paths, opts
        self.listener = listener
        self.slots = threading.BoundedSemaphore(args.max_connections)
        self.active = 0
        self.served = 0
        self._count_lock = threading.Lock()

    def serve_forever(self) -> None:
        """Accept clients until the process is told to stop."""
        while True:
            while not self.slots.acquire(timeout=STOP_POLL_S):  # at the cap: new clients wait in the backlog
                _raise_if_signalled()
            try:
                _wait_readable(self.listener)
                client, _ = self.listener.accept()
            except OSError as exc:  # EMFILE, ENOBUFS...: wait and accept again
                self.slots.release()
                _log(f"accept: {exc.strerror or exc}")
                time.sleep(0.1)
                continue
            with self._count_lock:
                self.active += 1
            try:
                threading.Thread(target=self._serve, args=(client,), name="robe-conn",
                                 daemon=True).start()
            except RuntimeError as exc:  # can't start new thread
                client.close()
                self._done()
                _log(f"client dropped: {exc}")

    def _done(self) -> None:
        with self._count_lock:
            self.active -= 1
            self.served += 1
        self.slots.release()

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        try:
            o = Options(timer=self.opts.timer, join=self.opts.join, history=self.opts.history)
            try:
                upstream, rep = connect(self.dest, self.args.strategy, self.paths,
                                        self.args.timeout, options=o)
            except RobeError as exc:
                _emit(exc.report, self.args.report, "failed: ")
                _log(f"upstream {self.dest[0]}:{self.dest[1]}: {exc}")
                return
            if self.args.report == "text":
                _emit(rep, "text")
            self._relay(client, upstream)
            if self.args.report == "json":
                rep.wait_joins(0)
                _emit(rep, "json")
        except Exception as exc:  # noqa: BLE001 - one connection's failure never ends the proxy
            _log(f"connection failed: {type(exc).__name__}: {exc}".splitlines()[0])
        finally:
            if upstream is not None:
                upstream.close()
            client.close()
            self._done()

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        """Both directions until both ended, or nothing moved for --idle-timeout s."""
        a, b = threading.Event(), threading.Event()
        activity = [time.monotonic()]
        up_failed: list[str] = []    # client -> upstream: writing is the upstream's fault
        down_failed: list[str] = []  # upstream -> client: reading is
        threading.Thread(target=_pump, args=(client, upstream, a, activity, up_failed),
                         name="robe-up", daemon=True).start()
        threading.Thread(target=_pump, args=(upstream, client, b, activity, down_failed),
                         name="robe-down", daemon=True).start()
        idle = self.args.idle_timeout
        while not (a.is_set() and b.is_set()):
            if time.monotonic() - activity[0] > idle:
                _log(f"connection idle for {idle:g} s: closed")
                for sock in (client, upstream):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)  # wakes both copying threads
                    except OSError:
                        pass
                break
            a.wait(min(1.0, idle / 4))
            if a.is_set():
                b.wait(min(1.0, idle / 4))
        a.wait(5)
        b.wait(5)
        # A client that resets is its own business; the upstream failing is worth a line.
        upstream_errors = [f for f in up_failed if f.startswith("writing")] + \
                          [f for f in down_failed if f.startswith("reading")]
        if upstream_errors:
            _log(f"upstream {self.dest[0]}:{self.dest[1]} failed mid-connection, "
                 f"{upstream_errors[0]}")


def _log(msg: str) -> None:
    print(f"robe: {msg}", file=sys.stderr, flush=True)


def cmd_proxy(args: argparse.Namespace) -> int:
    """robe proxy: plain TCP clients in, RobE/MPTCP connections out."""
    dest = _resolve(args.host, args.port)
    paths, opts = _setup(args, dest)
    try:
        ls = socket.create_server(args.listen, reuse_port=False, backlog=128)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.listen[0]}:{args.listen[1]}: {exc.strerror}") from None
    _log(f"proxy {args.listen[0]}:{args.listen[1]} -> {dest[0]}:{dest[1]} "
         f"({args.strategy}, paths {','.join(p.name for p in paths)}, "
         f"at most {args.max_connections} connections, idle timeout {args.idle_timeout:g} s)")
    with ls:
        Proxy(args, dest, paths, opts, ls).serve_forever()
    return 0


# Stop signals already handled. Python drops the exception a handler raises
# while the main thread runs a weakref callback (garbage collection), so the
# waits the main thread blocks in look here too, every STOP_POLL_S.
_signalled: list[int] = []
STOP_POLL_S = 0.5


def _terminate(signum: int, frame: object) -> None:
    _signalled.append(signum)
    raise Terminated(signum)


def _interrupt(signum: int, frame: object) -> None:
    _signalled.append(signum)
    raise KeyboardInterrupt


def _raise_if_signalled() -> None:
    """Raise for a stop signal already handled (its own exception may be lost)."""
    if _signalled:
        if _signalled[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(_signalled[0])


def _wait_readable(sock: socket.socket) -> None:
    """Block until sock is readable (or at EOF); raise for a stop signal that
    was handled meanwhile, even one whose exception got lost."""
    while not select.select([sock], [], [], STOP_POLL_S)[0]:
        _raise_if_signalled()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status. SIGPIPE stays ignored (Python's
    default): a client that resets is an error on its socket, not the end of robe."""
    args = build_parser().parse_args(argv)
    missing = missing_capabilities()
    if missing:
        print(f"robe: needs root ({' and '.join(missing)} for the MPTCP path manager and "
              f"SO_BINDTODEVICE): run it with sudo", file=sys.stderr)
        return 1
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _terminate)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when started ignoring it
        signal.signal(signal.SIGINT, _interrupt)
    try:
        return cmd_connect(args) if args.cmd == "connect" else cmd_proxy(args)
    except UsageError as exc:
        print(f"robe: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Terminated as exc:
        return 128 + exc.signum
    except OSError as exc:
        print(f"robe: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        print(f"robe: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    finally:
        endpoints.release_all()  # the endpoints we added go with us, however we end


if __name__ == "__main__":
    sys.exit(main())
