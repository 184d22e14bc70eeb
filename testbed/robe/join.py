"""Adding the other paths to the winning connection as MP_JOIN subflows.

Two ways, selectable:
- "userspace" (preferred): the client namespace runs net.mptcp.path_manager =
  userspace; we wait for the PM's `established` event of the winner's token
  (subflow-create before that fails with ENOTCONN: the kernel only joins a
  fully established connection, i.e. after the first data is acknowledged or
  the server sent data) and then ask for one subflow per path. We choose the
  moment and the paths, and see each step.
- "kernel": the in-kernel PM joins from its `subflow` endpoints by itself once
  the connection is fully established; we make sure every path has an
  endpoint and only observe. Endpoints we had to add are temporary
  (endpoints.py): deleted once the connection's `closed` event arrived.
In both modes `sub_established` events (matched by token and source address)
stamp when each join completed, so the report is the same.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import threading
import time
from pathlib import Path

from testbed.mptcp.pm import PMError, PMEventListener, UserspacePM
from testbed.robe import endpoints
from testbed.robe import report as R
from testbed.robe.history import PathRecord
from testbed.robe.sockets import LocalPath

MODES = ("auto", "userspace", "kernel", "none")


def current_path_manager() -> str:
    """net.mptcp.path_manager of the calling thread's namespace."""
    # /proc/sys/net resolves to the opening thread's namespace.
    try:
        return Path("/proc/sys/net/mptcp/path_manager").read_text().strip()
    except OSError:
        try:  # older kernels: pm_type 0 = kernel, 1 = userspace
            v = Path("/proc/sys/net/mptcp/pm_type").read_text().strip()
            return "userspace" if v == "1" else "kernel"
        except OSError:
            return "kernel"


def resolve_mode(mode: str) -> str:
    """The join mode to use ('auto' resolved from the namespace's path manager)."""
    if mode not in MODES:
        raise ValueError(f"join mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        return "userspace" if current_path_manager() == "userspace" else "kernel"
    return mode


def _wait_event(lst: PMEventListener, type_: str, token: int, deadline: float):
    # 1 ms granularity: the event carries its own arrival stamp, but the
    # subflow-create that follows it should not wait longer than needed.
    while True:
        for ev in lst.events():
            if ev.type == type_ and ev.token == token:
                return ev
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.001)


if TYPE_CHECKING:
    from testbed.robe.history import History


def learn_join(history: "History | None", path: str, handshake_s: float) -> None:
    """A completed join teaches IPS its path's handshake RTT and a success."""
    if history is None:
        return

    def change(records: dict) -> None:
        rec = records.setdefault(path, PathRecord())
        rec.add_rtt(handshake_s)
        rec.add_outcome(True)

    try:
        history.update(change)
    except OSError:
        pass  # a read-only store must not break joining


class Joiner:
    """Created (and its listener started) *before* the first SYN, in the
    client's namespace, so no PM event of the new connection is missed."""

    def __init__(self, mode: str, report: R.Report, timeout_s: float = 10.0,
                 history: "History | None" = None):
        self.mode = resolve_mode(mode)
        self.report = report
        self.timeout_s = timeout_s
        # Joined subflows teach IPS the RTT of paths it did not start on: the
        # draft's example is exactly "running connections show LTE.RTT < WiFi.RTT".
        self.history = history
        # A thread id names this thread's namespace for /proc/<tid>/ns/net, so
        # the shared PM helpers (which setns by pid) work from inside a thread
        # that itself entered a namespace with setns().
        self._ns_tid = threading.get_native_id()
        self.listener: PMEventListener | None = None
        self.lease: endpoints.Lease | None = None  # kernel mode: endpoints we added
        self._endpoint_error: str | None = None
        if self.mode != "none":
            self.listener = PMEventListener(self._ns_tid, poll_s=0.02).start()

    def prepare(self, paths: list[LocalPath]) -> None:
        """Kernel mode: `subflow` endpoints for the paths, before the first SYN.
        The kernel decides at connect() whether its PM will ever act on the
        connection (only if subflow endpoints exist then), and it skips the
        address the initial subflow uses, so the winner's endpoint does no harm."""
        if self.mode != "kernel":
            return
        try:
            self.lease = endpoints.acquire(paths)
        except Exception as exc:  # noqa: BLE001 - no joins, but connecting goes on
            self._endpoint_error = f"cannot add a subflow endpoint: {type(exc).__name__}: {exc}"

    def use(self, conn: object) -> None:
        """The won connection: the kernel's path manager finds it by its token alone."""

    def start(self, token: int | None, dest: tuple[str, int], all_paths: list[LocalPath],
              winner: LocalPath | None) -> threading.Thread | None:
        """Join every path but the winner's, in the background."""
        others = [p for p in all_paths if winner is None or p.name != winner.name]
        if self.mode == "none" or token is None or not others:
            self.close()
            return None
        if self.mode == "kernel" and self._endpoint_error is not None:
            for p in others:
                self.report.add(R.JOIN_FAILED, p.name, reason=self._endpoint_error)
            self.close()
            return None
        ids = {p.name: i + 1 for i, p in enumerate(all_paths)}  # local ids must be non-zero
        self.report.joins_pending()
        t = threading.Thread(target=self._run, args=(token, dest, others, ids),
                             name="robe-join", daemon=True)
        t.start()
        return t

    def _run(self, token: int, dest: tuple[str, int], others: list[LocalPath],
             ids: dict[str, int]) -> None:
        rep, lst = self.report, self.listener
        assert lst is not None
        deadline = time.monotonic() + self.timeout_s
        try:
            est = _wait_event(lst, "established", token, deadline)
            if est is None:
                for p in others:
                    rep.add(R.JOIN_FAILED, p.name, reason="connection never fully established "
                            "(no data exchanged before the join timeout)")
                return
            rep.add(R.ESTABLISHED, t_ns=est.t_ns)
            pm = UserspacePM(threading.get_native_id())
            pending = {}
            started: dict[str, int] = {p.name: est.t_ns for p in others}
            for p in others:
                if self.mode == "kernel":
                    # The kernel starts its joins on this very event.
                    rep.add(R.JOIN_STARTED, p.name, t_ns=est.t_ns, via="kernel")
                    pending[p.local_addr] = p
                    continue
                rep.add(R.JOIN_STARTED, p.name, via="userspace", local_id=ids[p.name])
                started[p.name] = time.monotonic_ns()
                try:
                    pm.subflow_create(token, p.local_addr, ids[p.name], dest[0], dest[1])
                    pending[p.local_addr] = p
                except PMError as exc:
                    rep.add(R.JOIN_FAILED, p.name, reason=str(exc), errno=exc.errno)
            seen: set[int] = set()
            while pending and time.monotonic() < deadline:
                for ev in lst.events():
                    if id(ev) in seen or ev.token != token:
                        continue
                    seen.add(id(ev))
                    src = ev.attrs.get("saddr4")
                    if ev.type == "sub_established" and src in pending:
                        name = pending.pop(src).name
                        rep.add(R.JOIN_ESTABLISHED, name, t_ns=ev.t_ns, sport=ev.attrs.get("sport"))
                        self._learn(name, (ev.t_ns - started[name]) / 1e9)
                    elif ev.type == "sub_closed" and src in pending:
                        rep.add(R.JOIN_FAILED, pending.pop(src).name, t_ns=ev.t_ns,
                                reason=f"subflow closed (error {ev.attrs.get('error')})")
                time.sleep(0.001)
            for p in pending.values():
                rep.add(R.JOIN_FAILED, p.name, reason=f"not established within {self.timeout_s:g} s")
        except Exception as exc:  # a join problem must never break the connection
            rep.add(R.JOIN_FAILED, None, reason=f"{type(exc).__name__}: {exc}")
        finally:
            rep.joins_finished()
            try:
                if self.lease is not None and self.lease.keys:
                    self._wait_closed(token)
            finally:
                self.close()

    def _wait_closed(self, token: int) -> None:
        """Until the connection's `closed` PM event (its endpoints are then unused)."""
        lst = self.listener
        seen = 0
        while lst is not None:
            evs = lst.events()
            if any(ev.type == "closed" and ev.token == token for ev in evs[seen:]):
                return
            seen = len(evs)
            if not lst.alive():
                return
            time.sleep(0.05)

    def _learn(self, path: str, handshake_s: float) -> None:
        learn_join(self.history, path, handshake_s)

    def close(self) -> None:
        """Stop listening and give back the endpoints (idempotent)."""
        if self.listener is not None:
            self.listener.stop()
            self.listener = None
        if self.lease is not None:
            endpoints.release(self.lease)
