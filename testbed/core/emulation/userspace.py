"""The user-space backend: our own forwarder process on every emulated link.

Works on any kernel with AF_PACKET (no sch_netem needed). Per link: HTB + pfifo
on both egress ports for rate and bottleneck queue (shaping.py), and one
forwarder process (forwarder.py) moving frames between the ports through
per-direction delay lines with loss. Parameters change live over a control
socket; every change is acknowledged with the forwarder's own timestamp.
"""
from __future__ import annotations

import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from testbed.core.emulation import fastpath, register, shaping
from testbed.core.emulation.base import Backend, Direction, EmulatedLink
from testbed.base.netns import NetnsWorker
from testbed.base.rtnl import RawRtnl, attr
from testbed.base.errors import TestbedError
from testbed.core.model import LinkParams

REPO_ROOT = Path(__file__).resolve().parents[3]  # testbed/core/emulation/ -> the repository
START_TIMEOUT_S = 10.0
CTL_TIMEOUT_S = 5.0
SHAPING_FIELDS = ("rate_mbit", "queue_pkts", "queue_bdp")


class ForwarderHandle:
    """The parent's side of one forwarder: process and control socket."""

    def __init__(self, link: EmulatedLink, seed: int | None = None, sched: str = "fifo"):
        self.link = link
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ctl = parent
        self.lock = threading.Lock()
        self.last_stats: dict[str, Any] = {}
        config = {"up": link.up.model_dump(mode="json"), "down": link.down.model_dump(mode="json")}
        argv = [sys.executable, "-m", "testbed.core.emulation.forwarder",
                "--netns", f"/proc/{link.pid}/ns/net",
                "--port-a", link.port_a, "--port-b", link.port_b,
                "--ctl-fd", str(child.fileno()), "--mtu", str(link.mtu), "--sched", sched,
                "--config", json.dumps(config)]
        if seed is not None:
            argv += ["--seed", str(seed)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        try:
            self.proc = subprocess.Popen(argv, pass_fds=[child.fileno()], env=env,
                                         stdin=subprocess.DEVNULL)
        finally:
            child.close()
        self.sched = "?"

    def wait_ready(self) -> None:
        """Wait for the forwarder's hello. Separate from spawning so that many
        forwarders start concurrently (each needs ~0.2 s of interpreter start)."""
        link = self.link
        self.ctl.settimeout(START_TIMEOUT_S)
        try:
            hello = json.loads(self.ctl.recv(65536) or b"{}")
        except (TimeoutError, json.JSONDecodeError):
            hello = {"ready": False, "error": "no answer from the forwarder"}
        if not hello.get("ready"):
            self.kill()
            raise TestbedError(f"link {link.name!r}: user-space forwarder failed to start: "
                               f"{hello.get('error', 'exited')}")
        self.ctl.settimeout(CTL_TIMEOUT_S)
        self.sched = hello.get("sched", "?")

    @property
    def pid(self) -> int:
        """The forwarder process's pid."""
        return self.proc.pid

    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send one control request to the forwarder and return its answer."""
        with self.lock:
            if self.proc.poll() is not None:
                raise TestbedError(f"link {self.link.name!r}: forwarder exited "
                                   f"(status {self.proc.returncode})")
            try:
                self.ctl.send(json.dumps(msg).encode())
                reply = json.loads(self.ctl.recv(1 << 20))
            except (OSError, json.JSONDecodeError) as exc:
                raise TestbedError(f"link {self.link.name!r}: forwarder control channel: {exc}") from None
        if not reply.get("ok"):
            raise TestbedError(f"link {self.link.name!r}: forwarder refused {msg.get('op')}: "
                               f"{reply.get('error')}")
        if "stats" in reply:
            self.last_stats = reply["stats"]
        return reply

    def request_stop(self) -> None:
        """Ask the forwarder to stop (no wait)."""
        if self.proc.poll() is None:
            try:
                self.request({"op": "stop"})
            except TestbedError:
                pass

    def stop(self) -> None:
        """Stop the forwarder: asked first, killed by its handle if it does not exit."""
        self.request_stop()
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        """Kill the forwarder by its own process handle."""
        if self.proc.poll() is None:
            self.proc.kill()  # by our own Popen handle, never by name
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.ctl.close()


class RawTc(RawRtnl):
    """HTB class + pfifo changes as hand-packed rtnetlink messages.

    A timed rate change must land within 1 ms; through pyroute2 one direction
    takes ~1 ms (message building and its asyncio round trip), here ~0.1 ms.
    The socket is created in the emulator's namespace and stays bound to it.
    Same values as shaping.change() (rates in bytes/s with the Ethernet link
    layer, so the kernel needs no rate tables; burst times via pyroute2's own
    calc_xmittime); any error falls back to shaping.change()."""

    RTM_NEWQDISC, RTM_NEWTCLASS = 36, 40
    TC_LINKLAYER_ETHERNET = 1

    def _tc(self, msg_type: int, ifindex: int, handle: int, parent: int, attrs: bytes) -> None:
        # tcmsg: family, pad, ifindex, handle, parent, info
        self.request(msg_type, 0, struct.pack("BxxxiIII", 0, ifindex, handle, parent, 0) + attrs)

    def change(self, ifindex: int, htb: dict[str, Any], limit: int | None) -> None:
        """Change an HTB class's rate and its pfifo's limit in one netlink round trip each."""
        from pyroute2.netlink.rtnl.tcmsg.common import calc_xmittime, get_rate

        rate = int(get_rate(htb["rate"]))  # bytes/s
        buffer = int(calc_xmittime(rate, htb["burst"]))
        cbuffer = int(calc_xmittime(rate, htb["cburst"]))
        r32 = min(rate, (1 << 32) - 1)
        spec = struct.pack("BBHhHI", 0, self.TC_LINKLAYER_ETHERNET, 0, 0, 0, r32)
        parms = spec + spec + struct.pack("IIIII", buffer, cbuffer, htb["quantum"], 0, 0)
        opts = attr(1, parms)  # TCA_HTB_PARMS
        if rate >= 1 << 32:
            opts += attr(6, struct.pack("Q", rate)) + attr(7, struct.pack("Q", rate))
        attrs = attr(1, b"htb\0") + attr(2 | 0x8000, opts)  # TCA_KIND, TCA_OPTIONS
        self._tc(self.RTM_NEWTCLASS, ifindex, 0x00010010, 0x00010000, attrs)
        if limit is not None:
            attrs = attr(1, b"pfifo\0") + attr(2, struct.pack("I", limit))
            self._tc(self.RTM_NEWQDISC, ifindex, 0x00100000, 0x00010010, attrs)  # 10: (hex)


class UserspaceBackend(Backend):
    """Our AF_PACKET forwarder for delay, jitter and loss; HTB + pfifo for rate and queue."""
    name = "userspace"

    def __init__(self, seed: int | None = None, sched: str | None = None):
        """sched: forwarder scheduling, "fifo" (default; real-time priority 10),
        "nice" or "other"; also settable by $MPTB_FORWARDER_SCHED."""
        self.seed = seed
        self.sched = sched or os.environ.get("MPTB_FORWARDER_SCHED", "fifo")
        if self.sched not in ("fifo", "nice", "other"):
            raise TestbedError(f"forwarder scheduling must be fifo, nice or other, not {self.sched!r}")
        self._handles: dict[int, ForwarderHandle] = {}  # id(link) -> handle
        self._names: dict[int, str] = {}
        self._final_stats: dict[str, Any] = {}
        self._seeds: dict[str, int] = {}

    @classmethod
    def check(cls) -> str | None:
        try:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            s.close()
        except PermissionError:
            return "AF_PACKET sockets need root (CAP_NET_RAW): run as root"
        except OSError as exc:
            return f"AF_PACKET unavailable ({exc.strerror}): enable CONFIG_PACKET or use backend 'netem'"
        try:  # built here, once, before any forwarder needs it
            fastpath.build()
        except TestbedError as exc:
            return str(exc)
        return None

    def _handle(self, link: EmulatedLink) -> ForwarderHandle:
        h = self._handles.get(id(link))
        if h is None:
            raise TestbedError(f"link {link.name!r} is not running on the userspace backend")
        return h

    def start(self, link: EmulatedLink) -> None:
        self.start_many([link])

    def start_many(self, links: list[EmulatedLink]) -> None:
        handles = [self._spawn(link) for link in links]
        for link, h in zip(links, handles):
            h.wait_ready()
            self._attach(link)

    def _spawn(self, link: EmulatedLink) -> ForwarderHandle:
        for d in ("up", "down"):
            shaping.install(link, d)  # type: ignore[arg-type]
        # Loss decisions are reproducible: the forwarder's seed comes from the
        # backend's seed or else from Python's `random` (the runner seeds it per
        # run), and is recorded in describe().
        seed = (self.seed + len(self._handles)) if self.seed is not None else random.getrandbits(62)
        self._seeds[link.name] = seed
        h = self._handles[id(link)] = ForwarderHandle(link, seed, self.sched)
        self._names[id(link)] = link.name
        return h

    def _attach(self, link: EmulatedLink) -> None:
        # A netlink socket kept open in the emulator's namespace: a timed rate
        # change is then one netlink round trip (~0.3 ms), not a thread + socket.
        nl = NetnsWorker(link.pid, link.name)
        link.state["nl"] = nl
        ports = {d: link.egress_port(d) for d in ("up", "down")}  # type: ignore[arg-type]
        link.state["ifindex"] = nl.call(
            lambda ipr: {d: ipr.link_lookup(ifname=p)[0] for d, p in ports.items()})
        try:
            link.state["rawtc"] = RawTc(link.pid)
        except OSError:
            pass  # pyroute2 through the worker then
        link.state["forwarder_pid"] = self._handles[id(link)].pid

    def update(self, link: EmulatedLink, direction: Direction, params: LinkParams) -> float | None:
        """Apply at once; returns after the forwarder acknowledged, with its apply
        time (for a rate or queue change: when the qdisc change was acknowledged)."""
        old = link.params(direction)
        shaping_changed = any(getattr(old, f) != getattr(params, f) for f in SHAPING_FIELDS)
        line_changed = any(getattr(old, f) != getattr(params, f)
                           for f in LinkParams.model_fields if f not in SHAPING_FIELDS)
        applied = None
        if shaping_changed:
            self._change_shaping(link, direction, params)
            applied = time.monotonic()
        if line_changed or not shaping_changed:  # the forwarder ignores rate and queue
            reply = self._handle(link).request({"op": "set", "dir": direction,
                                                "params": params.model_dump(mode="json")})
            applied = reply["t"] if applied is None else max(applied, reply["t"])
        return applied

    @staticmethod
    def _change_shaping(link: EmulatedLink, direction: Direction, params: LinkParams) -> None:
        """shaping.change() over the link's open netlink socket (same messages)."""
        nl = link.state.get("nl")
        if nl is None:
            shaping.change(link, direction, params)
            return
        idx = link.state["ifindex"][direction]
        htb = shaping.htb_args(params, link.mtu)
        limit = shaping.queue_limit(link, params)
        limits = link.state.setdefault("queue_limit", {})
        old_limit = limits.get(direction, shaping.queue_limit(link, link.params(direction)))

        def apply(ipr: Any) -> None:
            ipr.tc("change-class", "htb", index=idx, handle="1:10", parent="1:", **htb)
            if limit != old_limit:
                ipr.tc("change", "pfifo", index=idx, handle="10:", parent="1:10", limit=limit)

        raw = link.state.get("rawtc")
        try:
            if raw is None:
                raise OSError("no raw netlink socket")
            raw.change(idx, htb, limit if limit != old_limit else None)
        except OSError:
            nl.call(apply)
        limits[direction] = limit

    def set_blackhole(self, link: EmulatedLink, direction: Direction, on: bool) -> float | None:
        reply = self._handle(link).request({"op": "blackhole", "dir": direction, "on": on})
        return reply["t"]

    def stats(self, link: EmulatedLink) -> dict[str, Any]:
        """Counters of the link's forwarder: per direction rx/tx/drops per cause,
        lateness, and the process's CPU seconds."""
        if id(link) not in self._handles:
            return self._final_stats.get(link.name, {})
        return self._handle(link).request({"op": "stats"})["stats"]

    def stop_many(self, links: list[EmulatedLink]) -> None:
        for link in links:  # all forwarders wind down at once
            h = self._handles.get(id(link))
            if h is not None:
                h.request_stop()
        super().stop_many(links)

    def stop(self, link: EmulatedLink) -> None:
        nl = link.state.pop("nl", None)
        if nl is not None:
            nl.close()
        raw = link.state.pop("rawtc", None)
        if raw is not None:
            raw.close()
        h = self._handles.pop(id(link), None)
        if h is not None:
            h.stop()
            self._final_stats[link.name] = h.last_stats

    def pids(self) -> list[int]:
        return [h.pid for h in self._handles.values()]

    def describe(self) -> dict[str, Any]:
        """The backend and its forwarders' counters, for the manifest."""
        counters = dict(self._final_stats)
        for key, h in self._handles.items():
            try:
                counters[self._names[key]] = h.request({"op": "stats"})["stats"]
            except TestbedError as exc:
                counters[self._names[key]] = {"error": str(exc)}
        return {"backend": self.name, "forwarder": "AF_PACKET deadline queues in C (fastpath.c)",
                "sched": sorted({h.sched for h in self._handles.values()}) or [self.sched],
                "python": sys.version.split()[0], "seeds": dict(self._seeds), "counters": counters}


register(UserspaceBackend)
