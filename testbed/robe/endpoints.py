"""Temporary in-kernel path manager endpoints for RobE's joins.

With the kernel path manager a join needs a `subflow` endpoint for the path's
address, and endpoints are shared by every MPTCP connection of the network
namespace. RobE therefore only adds an endpoint for an address that has none,
counts the connections using it, and deletes it when the last of them closed
(or when the process ends: `release_all()` runs at exit and from the CLI's
signal handlers). Endpoints that existed before are never touched.

    lease = acquire(paths)   # in the connection's namespace (calling thread's)
    ...connection lives...
    release(lease)           # from any thread
"""
from __future__ import annotations

import atexit
import os
import threading
from dataclasses import dataclass, field

from testbed.mptcp import pm
from testbed.robe.sockets import LocalPath


@dataclass
class _Endpoint:
    ns_fd: int           # the namespace the endpoint lives in, held open
    endpoint_id: int
    users: int = 0


@dataclass
class Lease:
    """The endpoints one connection uses: (namespace inode, address) keys."""
    keys: list[tuple[int, str]] = field(default_factory=list)
    released: bool = False


_lock = threading.Lock()
_endpoints: dict[tuple[int, str], _Endpoint] = {}


def _ns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def acquire(paths: list[LocalPath]) -> Lease:
    """A `subflow` endpoint for every path without one, in the calling thread's
    namespace; returns the lease to release when the connection closed."""
    ino = _ns_inode()
    lease = Lease()
    with _lock:
        existing = pm.endpoints(None)
        have = {e.addr for e in existing}
        next_id = max({e.id for e in existing} | {0}) + 1
        for p in paths:
            key = (ino, p.local_addr)
            ours = _endpoints.get(key)
            if ours is not None and p.local_addr in have:
                ours.users += 1
                lease.keys.append(key)
                continue
            if p.local_addr in have:
                continue  # someone else's endpoint: use it, never change it
            users = 1
            if ours is not None:  # ours, but deleted by someone else: add it again
                os.close(ours.ns_fd)
                users += ours.users
            pm.add_endpoints(None, [pm.Endpoint(p.local_addr, p.ifname, ("subflow",), next_id)])
            _endpoints[key] = _Endpoint(os.open("/proc/thread-self/ns/net", os.O_RDONLY),
                                        next_id, users=users)
            lease.keys.append(key)
            next_id += 1
    return lease


def release(lease: Lease) -> None:
    """Drop the lease; endpoints nobody uses any more are deleted."""
    with _lock:
        if lease.released:
            return
        lease.released = True
        for key in lease.keys:
            ep = _endpoints.get(key)
            if ep is None:
                continue
            ep.users -= 1
            if ep.users <= 0:
                del _endpoints[key]
                _delete(ep)


def release_all() -> None:
    """Delete every endpoint this process added (exit, signal)."""
    with _lock:
        while _endpoints:
            _delete(_endpoints.popitem()[1])


def added() -> list[tuple[int, str]]:
    """(namespace inode, address) of the endpoints this process holds now."""
    with _lock:
        return list(_endpoints)


def _delete(ep: _Endpoint) -> None:
    """Delete in the endpoint's own namespace, whichever thread releases it."""
    try:
        pm.delete_endpoint(f"/proc/self/fd/{ep.ns_fd}", ep.endpoint_id)
    except Exception:  # noqa: BLE001 - already gone (namespace or endpoint): nothing left
        pass
    os.close(ep.ns_fd)


atexit.register(release_all)
