"""Run Python code, or a program, inside another network namespace.

setns(CLONE_NEWNET) only affects the calling thread, so we run the function in
a short-lived thread that first joins the target namespace. Plain sockets
created there stay bound to that namespace for their whole life, even when used
later from other threads; /proc/sys/net writes apply to it. This lets one
Python process drive every Mininet host precisely, with no shell.

Exception: a pyroute2 (0.9) IPRoute keeps its netlink socket per *thread*, so
one created in run_in_netns and used from another thread talks to that thread's
namespace. Use it inside the function, or keep a NetnsWorker (a thread that
lives in the namespace with its own IPRoute) for repeated, fast calls.

Programs (tc, ethtool, nft, iperf3, tcpdump, ...) run through `run_command`
(to completion, output captured) or `start_command` (in the background), both
`nsenter --net=<namespace file>`: the one way the project runs a command in a
namespace, for Mininet nodes (by pid) and held namespaces (by file) alike.
"""
from __future__ import annotations

import ctypes
import os
import queue
import subprocess
import threading
from typing import Any, Callable, Sequence, TypeVar

from testbed.base.errors import TestbedError

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def setns_current_thread(ns_path: str) -> None:
    """Move the calling thread into the network namespace that ns_path names."""
    fd = os.open(ns_path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns_path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def ns_path(pid: int) -> str:
    """The network-namespace file of process pid."""
    return f"/proc/{pid}/ns/net"


def _nsenter(ns: int | str, argv: Sequence[str]) -> list[str]:
    return ["nsenter", f"--net={ns_path(ns) if isinstance(ns, int) else ns}", "--", *argv]


def run_command(ns: int | str, argv: Sequence[str], timeout: float = 10.0,
                input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run argv to completion in a network namespace: a process's (pid) or one
    named by a file; stdout/stderr captured as text, killed at the timeout."""
    return subprocess.run(_nsenter(ns, argv), input=input, capture_output=True, text=True,
                          timeout=timeout)


def start_command(ns: int | str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
    """Start argv in a network namespace (pid or file), in a session of its own
    so that a signal meant for us does not reach it; the caller owns the process."""
    popen_kwargs.setdefault("start_new_session", True)
    return subprocess.Popen(_nsenter(ns, argv), **popen_kwargs)


def run_in_netns(pid: int, fn: Callable[[], T]) -> T:
    """Call fn() in the network namespace of process `pid` and return its result."""
    return run_in_netns_file(ns_path(pid), fn)


def run_in_netns_file(ns_file: str, fn: Callable[[], T]) -> T:
    """Call fn() in the network namespace that ns_file names: /proc/PID/ns/net,
    or /proc/PID/fd/N for a namespace that only a descriptor holds. The helper
    thread runs at the caller's scheduling policy (a real-time caller's new
    threads would start at normal priority: realtime_thread)."""
    box: dict[str, object] = {}
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)

    def target() -> None:
        try:
            if policy & ~os.SCHED_RESET_ON_FORK != os.SCHED_OTHER:
                os.sched_setscheduler(0, policy, param)
            setns_current_thread(ns_file)
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=target, name=f"netns-{ns_file}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


class ScratchNetns:
    """A new, empty network namespace made in this process, held by a descriptor.

    unshare(CLONE_NEWNET) runs in a thread of its own (it moves only the calling
    thread), which opens the namespace and ends; the namespace is checked to
    differ from this process's before anything runs in it, so nothing meant
    for it can land in the namespace we were started in. Leaving the `with`
    block closes the descriptor, and the namespace goes with everything in it.
    """

    def __init__(self) -> None:
        self.fd = -1

    def __enter__(self) -> "ScratchNetns":
        box: dict[str, Any] = {}

        def create() -> None:
            try:
                if _libc.unshare(CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
                box["fd"] = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            except BaseException as exc:  # re-raised in the caller's thread
                box["error"] = exc

        t = threading.Thread(target=create, name="netns-scratch", daemon=True)
        t.start()
        t.join()
        if "error" in box:
            raise box["error"]
        fd = box["fd"]
        if os.fstat(fd).st_ino == os.stat("/proc/self/ns/net").st_ino:
            os.close(fd)
            raise TestbedError("unshare(CLONE_NEWNET) left the thread in this process's namespace")
        self.fd = fd
        return self

    @property
    def path(self) -> str:
        """A path naming the namespace (for setns or `nsenter --net=`) while it is held."""
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    def run(self, fn: Callable[[], T]) -> T:
        """Call fn() inside the namespace."""
        return run_in_netns_file(self.path, fn)

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def write_sysctl(pid: int | str, values: dict[str, str | int]) -> None:
    """Write sysctls (dotted names, e.g. net.mptcp.enabled) in pid's namespace
    (or the one a file names, e.g. ScratchNetns.path)."""

    def apply() -> None:
        for name, value in values.items():
            try:
                with open("/proc/sys/" + name.replace(".", "/"), "w") as f:
                    f.write(str(value))
            except OSError as exc:  # the kernel's range check (EINVAL), or no such knob
                raise TestbedError(f"sysctl {name} = {value}: the kernel refused it "
                                   f"({exc.strerror or exc})") from None

    run_in_netns_file(ns_path(pid) if isinstance(pid, int) else pid, apply)


def read_sysctl(pid: int, names: list[str]) -> dict[str, str]:
    """Read sysctls (dotted names) in pid's namespace."""
    def read() -> dict[str, str]:
        out = {}
        for name in names:
            with open("/proc/sys/" + name.replace(".", "/")) as f:
                out[name] = f.read().strip()
        return out

    return run_in_netns(pid, read)


RT_PRIORITY = 5  # below the forwarders (10): a busy-waiting scheduler never delays packets


def realtime_thread(priority: int = RT_PRIORITY) -> bool:
    """Make the calling thread SCHED_FIFO (Linux schedules threads, so only
    this one); False where not permitted. On a busy 2-core machine this is the
    difference between ~0.1 ms and up to ~40 ms of wake-up delay. Processes
    and threads it starts run at normal priority (SCHED_RESET_ON_FORK), except
    run_in_netns's helper, which takes its caller's."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(priority))
        return True
    except (OSError, AttributeError):
        return False


class NetnsWorker:
    """A thread living in another network namespace with an open IPRoute.

    pyroute2 (0.9) keeps its netlink socket per thread, so a socket opened in
    a namespace only stays there when it is always used from the thread that
    opened it; this worker is that thread. call(fn) runs fn(ipr) there and
    returns its result: one netlink round trip plus a thread hand-off
    (~0.1-0.3 ms) instead of a new thread and socket (~2 ms) per change.
    """

    def __init__(self, pid: int, name: str = "", realtime: bool = True):
        self._realtime = realtime
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(pid,), daemon=True,
                                        name=f"netns-worker-{name or pid}")
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error

    def _run(self, pid: int) -> None:
        from pyroute2 import IPRoute

        try:
            setns_current_thread(ns_path(pid))
            ipr = IPRoute()  # set-up is CPU work: done before the thread turns real-time
            if self._realtime:
                realtime_thread()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                item = self._q.get()
                if item is None:
                    return
                fn, box, done = item
                try:
                    box["value"] = fn(ipr)
                except BaseException as exc:  # re-raised in the caller
                    box["error"] = exc
                done.set()
        finally:
            ipr.close()

    def call(self, fn: Callable[[Any], T], timeout: float = 10.0) -> T:
        """Run fn(ipr) on the worker's thread; its result, or its exception raised here."""
        if not self._thread.is_alive():
            raise TestbedError("netns worker is not running")
        box: dict[str, Any] = {}
        done = threading.Event()
        self._q.put((fn, box, done))
        if not done.wait(timeout):
            raise TestbedError(f"netns worker: no answer within {timeout} s")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def close(self) -> None:
        """Stop the worker thread and close its IPRoute."""
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join(5)
