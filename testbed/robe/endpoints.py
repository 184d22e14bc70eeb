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

from pyroute2 import MPTCP, IPRoute

from testbed.base.netns import setns_current_thread
from testbed.robe.sockets import PathSpec

SUBFLOW_FLAG = 0x2  # MPTCP_PM_ADDR_FLAG_SUBFLOW


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


def acquire(paths: list[PathSpec]) -> Lease:
    """A `subflow` endpoint for every path without one, in the calling thread's
    namespace; returns the lease to release when the connection closed."""
    ino = _ns_inode()
    lease = Lease()
    with _lock, MPTCP() as m, IPRoute() as ipr:
        have: set[str] = set()
        used_ids: set[int] = set()
        for e in m.endpoint("show"):
            a = dict(e.get_attr("MPTCP_PM_ATTR_ADDR")["attrs"])
            have.add(a.get("MPTCP_PM_ADDR_ATTR_ADDR4"))
            used_ids.add(a.get("MPTCP_PM_ADDR_ATTR_ID"))
        next_id = max(used_ids | {0}) + 1
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
            kw = {}
            if p.ifname:
                idx = ipr.link_lookup(ifname=p.ifname)
                if idx:  # pyroute2 wants IF_IDX as raw bytes
                    kw["if_idx"] = idx[0].to_bytes(4, "little", signed=True)
            m.endpoint("add", addr=p.local_addr, id=next_id, flags=SUBFLOW_FLAG, **kw)
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
    def run() -> None:
        try:
            setns_current_thread(f"/proc/self/fd/{ep.ns_fd}")
            with MPTCP() as m:
                m.endpoint("del", id=ep.endpoint_id)
        except Exception:  # noqa: BLE001 - already gone (namespace or endpoint): nothing left
            pass

    t = threading.Thread(target=run, name="robe-endpoint-del", daemon=True)
    t.start()
    t.join(5)
    os.close(ep.ns_fd)


atexit.register(release_all)
