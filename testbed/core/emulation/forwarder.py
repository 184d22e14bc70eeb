"""User-space link emulator: one process per link, both directions.

    python -m testbed.core.emulation.forwarder --netns /proc/PID/ns/net \
        --port-a x1-a --port-b x1-b --ctl-fd 5 --config '{"up": {...}, "down": {...}}'

It joins the emulator's network namespace, opens one AF_PACKET socket per port
(PACKET_IGNORE_OUTGOING, so it never sees its own transmissions) and moves
frames a -> b ("up") and b -> a ("down") through a deadline queue per
direction: random or Gilbert-Elliott loss and the blackhole switch are decided
on arrival, the packet leaves at arrival + delay (+ jitter). Without `reorder`
deadlines never decrease, so a FIFO is the queue; with `reorder` it is a heap.
Rate and bottleneck queue are HTB + pfifo on the egress port (see shaping.py);
a send refused with ENOBUFS is the full pfifo and counts as a queue drop, one
refused with EAGAIN a full socket buffer (drop_sndbuf).

The per-packet path is C (fastpath.c, built and driven by fastpath.py): it
forwards until the control socket is readable, then this process answers the
message (writing the new parameters into the C side's struct) and lets it
forward again. This module keeps the command line, the namespace, the sockets,
the scheduling and the control channel.

Timing: ppoll() sleeps until shortly before the next deadline (with timer
slack 1 ns, wake-ups overshoot by ~20-100 us) and the last stretch (SPIN_S) is
busy-polled with a zero timeout, which still notices arriving packets. The
process runs SCHED_FIFO (priority 10) by default so that it wakes up on time on
a busy machine; see set_scheduling().

Control channel: a SOCK_SEQPACKET socket (fd passed by the parent), one JSON
object per message, each answered at once:
    {"op": "set", "dir": "up", "params": {...LinkParams...}} -> {"ok": true, "t": <monotonic>}
    {"op": "blackhole", "dir": "up", "on": true}              -> {"ok": true, "t": ...}
    {"op": "stats"}                                          -> {"ok": true, "stats": {...}}
    {"op": "stop"}                                           -> {"ok": true, "stats": {...},
                                                                 "exit_sched": "other"}, exit
A stopping forwarder leaves real-time scheduling before it answers `stop`
(exit_sched: the policy the kernel then reports) and exits without the
interpreter's teardown: see leave_realtime().
The first message the forwarder sends is {"ready": true, "pid": ...}.
Changes apply to packets arriving from then on; packets already in the delay
line keep their departure time (as with netem).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import time
from typing import Any

from testbed.base.sockbuf import force_buffers
from testbed.core.emulation.fastpath import COUNTERS, FastPath, FpDir

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23

# Busy-poll this long before a deadline: wake-ups from a sleep overshoot. Measured
# here (2 cores, load average 2) with timer slack 1 ns: SCHED_FIFO median 19 us,
# p99 44 us; SCHED_OTHER median 27, p90 41, p99 108 us (70-170 us with the
# default 50 us slack). Spinning longer only burns CPU and, under SCHED_FIFO,
# starves the softirqs that drain HTB on the same core.
SPIN_S = {"fifo": 0.00006, "nice": 0.0001, "other": 0.0001}
PR_SET_TIMERSLACK = 29
SNDBUF = 64 << 20  # larger than any pfifo we install: the pfifo must be the queue
RCVBUF = 32 << 20


class Dir:
    """One direction's parameters as the control channel sets them, kept in the
    C fast path's struct (which owns the queue, the counters and the lateness)."""

    def __init__(self, name: str, state: FpDir, params: dict[str, Any]):
        self.name = name
        self.s = state
        self.set(params)

    @property
    def blackhole(self) -> bool:
        """Whether every packet arriving in this direction is dropped."""
        return bool(self.s.blackhole)

    @blackhole.setter
    def blackhole(self, on: bool) -> None:
        self.s.blackhole = int(on)

    def set(self, params: dict[str, Any]) -> None:
        """Take new parameters for this direction (effective for the next packet)."""
        self.params = dict(params)
        s = self.s
        s.delay = float(params.get("delay_ms") or 0) / 1000
        s.jitter = float(params.get("jitter_ms") or 0) / 1000
        s.loss = float(params.get("loss_pct") or 0) / 100
        ge = params.get("gilbert")
        # (p, r, loss in bad, loss in good) as probabilities
        s.ge_on = 1 if ge else 0
        if ge:
            s.ge_p, s.ge_r = ge["p_pct"] / 100, ge["r_pct"] / 100
            s.ge_bad_loss = ge.get("bad_loss_pct", 100) / 100
            s.ge_good_loss = ge.get("good_loss_pct", 0) / 100
        # A FIFO needs no reordering to undo; the C side reshapes the queue
        # (sorts it or heapifies it) before it forwards again.
        s.reorder = int(bool(params.get("reorder")) and s.jitter > 0)

    def stats(self) -> dict[str, Any]:
        """This direction's counters, queue length and lateness."""
        s = self.s
        out: dict[str, Any] = dict(zip(COUNTERS, s.c))
        tx = out["tx"]
        out["queued"] = s.queued
        out["late_mean_us"] = round(s.late_sum / tx * 1e6, 1) if tx else 0.0
        out["late_max_us"] = round(s.late_max * 1e6, 1)
        out["blackhole"] = self.blackhole
        out["ge_state"] = "bad" if s.ge_bad else "good"
        return out


def open_port(ifname: str, mtu: int) -> socket.socket:
    """An AF_PACKET socket on ifname for forwarding (outgoing copies ignored)."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    force_buffers(s, rcvbuf=RCVBUF, sndbuf=SNDBUF)
    s.bind((ifname, ETH_P_ALL))
    s.setblocking(False)
    # Frames from other interfaces may have arrived between socket() and bind().
    try:
        while True:
            s.recv(65536)
    except BlockingIOError:
        pass
    s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)  # reset kernel counters
    return s


class Forwarder:
    """Forwarding between two ports: delay, jitter, loss, rate and queue per direction."""
    def __init__(self, port_a: str, port_b: str, ctl: socket.socket, config: dict[str, Any],
                 mtu: int = 1500, seed: int | None = None):
        self.sa = open_port(port_a, mtu)
        self.sb = open_port(port_b, mtu)
        self.ctl = ctl
        self.bufsize = max(2048, mtu + 64)
        self.fast = FastPath(self.sa.fileno(), self.sb.fileno(), ctl.fileno(), self.bufsize, seed)
        self.up = Dir("up", self.fast.dirs[0], config.get("up", {}))
        self.down = Dir("down", self.fast.dirs[1], config.get("down", {}))
        self.kernel_drops = {"up": 0, "down": 0}
        self.running = True
        self.sched = "other"
        self.spin = SPIN_S["other"]
        self.started = time.monotonic()

    # ---- control channel --------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Both directions' counters, with the kernel's socket drops."""
        for name, sock in (("up", self.sa), ("down", self.sb)):
            raw = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
            _packets, drops = struct.unpack("II", raw)
            self.kernel_drops[name] += drops
        out = {}
        for d in (self.up, self.down):
            s = d.stats()
            s["drop_rcvbuf"] = self.kernel_drops[d.name]  # dropped by the kernel before we read
            out[d.name] = s
        try:
            with open("/proc/self/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            tick = os.sysconf("SC_CLK_TCK")
            out["cpu_s"] = (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
        out["uptime_s"] = round(time.monotonic() - self.started, 3)
        out["sched"] = self.sched
        return out

    def handle_ctl(self) -> None:
        """Answer one control request (set parameters, blackhole, stats, stop)."""
        try:
            raw = self.ctl.recv(65536)
        except BlockingIOError:
            return
        if not raw:  # parent gone: stop forwarding
            self.running = False
            return
        try:
            msg = json.loads(raw)
            op = msg.get("op")
            if op == "set":
                self._dir(msg["dir"]).set(msg["params"])
                reply: dict[str, Any] = {"ok": True, "t": time.monotonic()}
            elif op == "blackhole":
                self._dir(msg["dir"]).blackhole = bool(msg["on"])
                reply = {"ok": True, "t": time.monotonic()}
            elif op == "stats":
                reply = {"ok": True, "stats": self.stats()}
            elif op == "stop":
                reply = {"ok": True, "stats": self.stats(), "exit_sched": leave_realtime()}
                self.running = False
            elif op == "ping":
                reply = {"ok": True, "t": time.monotonic()}
            else:
                reply = {"ok": False, "error": f"unknown op {op!r}"}
        except Exception as exc:  # a bad request must not kill the link
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        self.ctl.send(json.dumps(reply).encode())

    def _dir(self, name: str) -> Dir:
        if name not in ("up", "down"):
            raise ValueError(f"direction must be 'up' or 'down', not {name!r}")
        return self.up if name == "up" else self.down

    # ---- main loop --------------------------------------------------------
    def run(self) -> None:
        """Forward packets until told to stop: the C fast path forwards until a
        control message is readable, Python answers it, and so on."""
        self.ctl.send(json.dumps({"ready": True, "pid": os.getpid(), "sched": self.sched}).encode())
        try:
            while self.running:
                if self.fast.run(self.spin):
                    self.handle_ctl()
        finally:
            leave_realtime()  # also when the parent went away or a port failed
            self.fast.close()


def set_scheduling(policy: str, priority: int) -> str:
    """Make the forwarder wake up on time on a busy machine. With SCHED_FIFO a
    wake-up preempts ordinary tasks at once (measured here under load average 2
    on 2 cores: idle RTT p99 20.2 ms instead of 22-24 ms for 2 x 10 ms); the
    kernel's RT throttling (sched_rt_runtime_us) still leaves 5 % to others even
    if the forwarder saturates. Falls back to nice -10, then to nothing."""
    try:  # timer slack 1 ns: wake-ups as asked, not up to 50 us later
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if policy == "fifo":
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
            return f"fifo:{priority}"
        except (OSError, AttributeError):
            policy = "nice"
    if policy == "nice":
        try:
            os.setpriority(os.PRIO_PROCESS, 0, -10)
            return "nice:-10"
        except OSError:
            pass
    return "other"


def leave_realtime() -> str:
    """Drop to SCHED_OTHER once forwarding is over; the policy the kernel now reports.

    What follows (closing, interpreter teardown: ~30 ms of CPU with this
    module's imports) must not run at real-time priority: every forwarder of a
    testbed stops at once, and on 2 cores their exits at priority 10 held the
    forwarders of a testbed beside them off for 40-57 ms (same priority, FIFO:
    no preemption), which voided bulk runs at --parallel 2."""
    try:
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        if os.getpriority(os.PRIO_PROCESS, 0) < 0:  # the nice -10 fallback
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        policy = os.sched_getscheduler(0)
    except (OSError, AttributeError):
        return "unknown"
    return {os.SCHED_OTHER: "other", os.SCHED_FIFO: "fifo"}.get(policy, str(policy))


def main(argv: list[str] | None = None) -> int:
    """Command line: join the namespace, open the ports, forward until stopped."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--netns", help="network namespace to join, e.g. /proc/PID/ns/net")
    ap.add_argument("--port-a", required=True)
    ap.add_argument("--port-b", required=True)
    ap.add_argument("--ctl-fd", type=int, required=True)
    ap.add_argument("--config", default="{}", help="JSON {up: LinkParams, down: LinkParams}")
    ap.add_argument("--mtu", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--sched", choices=("fifo", "nice", "other"), default="fifo")
    ap.add_argument("--rt-priority", type=int, default=10)
    args = ap.parse_args(argv)
    # The inherited descriptor keeps the parent's number, which in a long sweep
    # can exceed select()'s limit of 1024; dup() takes the lowest free one.
    low_fd = os.dup(args.ctl_fd)
    os.close(args.ctl_fd)
    ctl = socket.socket(fileno=low_fd)
    try:
        if args.netns:
            from testbed.base.netns import setns_current_thread

            setns_current_thread(args.netns)  # the only thread: the whole process moves
        fwd = Forwarder(args.port_a, args.port_b, ctl, json.loads(args.config), args.mtu, args.seed)
        fwd.sched = set_scheduling(args.sched, args.rt_priority)
        fwd.spin = SPIN_S[fwd.sched.split(":")[0]]
    except Exception as exc:
        ctl.send(json.dumps({"ready": False, "error": f"{type(exc).__name__}: {exc}"}).encode())
        return 1
    try:
        fwd.run()
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # a port failed under the C loop: one line, not a traceback
        msg = f"link emulator forwarder stopped: {exc.strerror or exc}"
        try:  # the parent's next request gets this as its answer
            ctl.send(json.dumps({"ok": False, "error": msg}).encode())
        except OSError:
            pass
        print(msg, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    status = main()
    # Skip the interpreter's teardown (module and object cleanup of ~500
    # modules, ~30 ms of CPU per forwarder): nothing is left to flush but the
    # standard streams, and a testbed stops all its forwarders at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
