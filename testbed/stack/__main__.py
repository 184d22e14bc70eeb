"""Command line for the user-space MPTCP stack: a sink server and a sending client.

    python -m testbed.stack --netns PID|PATH|self listen 5201 [--count 1] [--checksum]
    python -m testbed.stack --netns PID send 10.0.0.2 5201 --bytes 10M [--paths A,B] [--backup B]

`listen` reads each connection to its end and prints one JSON line (bytes,
sha256, seconds, Mbit/s, connection info); `send` sends random bytes, closes,
and prints the same. Errors are one line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict

from testbed.stack.attach import AttachError
from testbed.stack.cc import CONTROLLERS
from testbed.stack.connection import StackError
from testbed.stack.scheduler import SCHEDULERS
from testbed.stack.stack import Stack


def parse_size(text: str) -> int:
    """'10M' -> 10_000_000 (k, M, G are powers of 1000)."""
    units = {"k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9}
    text = text.strip().lower()
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def _report(conn, n: int, digest: str, seconds: float) -> str:
    return json.dumps({"bytes": n, "sha256": digest, "seconds": round(seconds, 4),
                       "mbit_s": round(n * 8 / seconds / 1e6, 2) if seconds > 0 else None,
                       "info": asdict(conn.info())})


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    ap = argparse.ArgumentParser(prog="python -m testbed.stack", description=__doc__.splitlines()[0])
    # Required, so nobody attaches to the host's namespace by accident; "self" is
    # for a process already started inside the right namespace (mnexec, nsenter).
    ap.add_argument("--netns", required=True, help="PID or path of the network namespace, or 'self'")
    ap.add_argument("--checksum", action="store_true", help="ask for DSS checksums")
    ap.add_argument("--cc", default="cubic", choices=list(CONTROLLERS), help="congestion control (lia, olia: coupled)")
    ap.add_argument("--scheduler", default="lowrtt", choices=list(SCHEDULERS), help="packet scheduler")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds for connect/accept/recv")
    sub = ap.add_subparsers(dest="cmd", required=True)
    lp = sub.add_parser("listen", help="accept connections, read each to its end")
    lp.add_argument("port", type=int)
    lp.add_argument("--count", type=int, default=1, help="connections to serve (default 1)")
    sp = sub.add_parser("send", help="connect and send random bytes")
    sp.add_argument("host")
    sp.add_argument("port", type=int)
    sp.add_argument("--bytes", type=parse_size, default=parse_size("1M"))
    sp.add_argument("--paths", default="", help="comma-separated local addresses (first: initial subflow)")
    sp.add_argument("--backup", default="", help="comma-separated local addresses joined as backup")
    args = ap.parse_args(argv)
    netns = None if args.netns == "self" else int(args.netns) if args.netns.isdigit() else args.netns
    try:
        with Stack(netns, checksum=args.checksum, cc=args.cc, scheduler=args.scheduler) as st:
            if args.cmd == "listen":
                lst = st.listen(args.port)
                for _ in range(args.count):
                    conn = lst.accept(timeout=args.timeout)
                    t0, h, n = time.monotonic(), hashlib.sha256(), 0
                    while chunk := conn.recv(1 << 20, timeout=args.timeout):
                        h.update(chunk)
                        n += len(chunk)
                    conn.close()
                    conn.wait_closed(5)
                    print(_report(conn, n, h.hexdigest(), time.monotonic() - t0), flush=True)
            else:
                data = os.urandom(args.bytes)
                paths = [p for p in args.paths.split(",") if p] or None
                backup = [p for p in args.backup.split(",") if p]
                t0 = time.monotonic()
                conn = st.connect((args.host, args.port), paths=paths, backup=backup, timeout=args.timeout)
                conn.send(data, timeout=args.timeout)
                conn.close()
                while conn.recv(1 << 16, timeout=args.timeout):
                    pass
                print(_report(conn, len(data), hashlib.sha256(data).hexdigest(), time.monotonic() - t0))
    except (StackError, AttachError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
