"""Run Python code inside another network namespace without forking.

setns(CLONE_NEWNET) only affects the calling thread, so we run the function in
a short-lived thread that first joins the target namespace. Anything created
there (sockets, netlink sockets, /proc/sys/net writes) stays bound to that
namespace for its whole life, even when used later from other threads. This
lets one Python process drive every Mininet host precisely, with no shell.
"""
from __future__ import annotations

import ctypes
import os
import threading
from typing import Callable, TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def setns_current_thread(ns_path: str) -> None:
    fd = os.open(ns_path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns_path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def ns_path(pid: int) -> str:
    return f"/proc/{pid}/ns/net"


def run_in_netns(pid: int, fn: Callable[[], T]) -> T:
    """Call fn() in the network namespace of process `pid` and return its result."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            setns_current_thread(ns_path(pid))
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=target, name=f"netns-{pid}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def write_sysctl(pid: int, values: dict[str, str | int]) -> None:
    """Write sysctls (dotted names, e.g. net.mptcp.enabled) in pid's namespace."""

    def apply() -> None:
        for name, value in values.items():
            with open("/proc/sys/" + name.replace(".", "/"), "w") as f:
                f.write(str(value))

    run_in_netns(pid, apply)


def read_sysctl(pid: int, names: list[str]) -> dict[str, str]:
    def read() -> dict[str, str]:
        out = {}
        for name in names:
            with open("/proc/sys/" + name.replace(".", "/")) as f:
                out[name] = f.read().strip()
        return out

    return run_in_netns(pid, read)
