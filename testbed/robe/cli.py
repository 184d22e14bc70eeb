"""`robe` command: a netcat-like client and a local TCP->RobE/MPTCP proxy.

    robe connect --strategy sim HOST PORT            stdin -> socket -> stdout
    robe proxy --listen 127.0.0.1:8080 --strategy sim HOST PORT

Paths: `--bind-path NAME=ADDR[%IFNAME]` (repeatable, the first is the default
path) or discovered from the local interfaces (default route first).
Errors are one line on stderr with a non-zero exit status, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
from typing import Any

from testbed.robe import paths as P
from testbed.robe.history import History
from testbed.robe.report import Report
from testbed.robe.strategies import STRATEGIES, Options, RobeError, connect
from testbed.robe.timer import TimerPolicy


class UsageError(Exception):
    pass


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
    ap = _Parser(prog="robe", description="Robust MPTCP session establishment (RobE) client")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    common = _Parser(add_help=False)
    common.add_argument("--strategy", default="sim", choices=sorted(STRATEGIES))
    common.add_argument("--bind-path", action="append", default=[], metavar="NAME=ADDR[%IF]")
    common.add_argument("--paths", help="comma-separated subset/order of path names")
    common.add_argument("--timeout", type=float, default=10.0, help="establishment deadline, s")
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
    c.add_argument("--report-wait", type=float, default=2.0,
                   help="at exit, wait this long for pending joins before reporting")
    x = sub.add_parser("proxy", parents=[common], help="plain TCP in, RobE/MPTCP out")
    x.add_argument("--listen", type=_hostport, required=True, metavar="ADDR:PORT")
    x.add_argument("host")
    x.add_argument("port", type=_port)
    return ap


def _setup(args: argparse.Namespace) -> tuple[list, Options]:
    try:
        found = P.parse_bind(args.bind_path) if args.bind_path else P.discover()
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


def _pump(src: Any, dst: socket.socket, done: threading.Event) -> None:
    """Copy until EOF, then half-close the destination."""
    try:
        while True:
            data = src.recv(65536) if isinstance(src, socket.socket) else src.read1(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        done.set()


def cmd_connect(args: argparse.Namespace) -> int:
    paths, opts = _setup(args)
    dest = _resolve(args.host, args.port)
    try:
        sock, rep = connect(dest, args.strategy, paths, args.timeout, options=opts)
    except RobeError as exc:
        _emit(exc.report, args.report)
        raise UsageError(f"{args.strategy}: {exc}") from None
    up_done = threading.Event()
    threading.Thread(target=_pump, args=(sys.stdin.buffer, sock, up_done), daemon=True).start()
    out = sys.stdout.buffer
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            out.write(data)
            out.flush()
    except OSError as exc:
        raise UsageError(f"connection: {exc.strerror or exc}") from None
    finally:
        rep.wait_joins(args.report_wait)
        _emit(rep, args.report)
        sock.close()
    return 0


def cmd_proxy(args: argparse.Namespace) -> int:
    paths, opts = _setup(args)
    dest = _resolve(args.host, args.port)
    try:
        ls = socket.create_server(args.listen, reuse_port=False, backlog=64)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.listen[0]}:{args.listen[1]}: {exc.strerror}") from None
    print(f"robe: proxy {args.listen[0]}:{args.listen[1]} -> {dest[0]}:{dest[1]} "
          f"({args.strategy}, paths {','.join(p.name for p in paths)})", file=sys.stderr, flush=True)
    lock = threading.Lock()  # the history store is shared by the connections

    def serve(client: socket.socket) -> None:
        with client:
            try:
                with lock:
                    o = Options(timer=opts.timer, join=opts.join, history=opts.history)
                upstream, rep = connect(dest, args.strategy, paths, args.timeout, options=o)
            except (RobeError, OSError) as exc:
                if isinstance(exc, RobeError):
                    _emit(exc.report, args.report, "failed: ")
                print(f"robe: upstream {dest[0]}:{dest[1]}: {exc}", file=sys.stderr, flush=True)
                return
            if args.report == "text":
                _emit(rep, "text")
            with upstream:
                a, b = threading.Event(), threading.Event()
                threading.Thread(target=_pump, args=(client, upstream, a), daemon=True).start()
                _pump(upstream, client, b)
                a.wait()
            if args.report == "json":
                rep.wait_joins(0)
                _emit(rep, "json")

    while True:
        c, _ = ls.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = build_parser().parse_args(argv)
    try:
        return cmd_connect(args) if args.cmd == "connect" else cmd_proxy(args)
    except UsageError as exc:
        print(f"robe: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"robe: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
