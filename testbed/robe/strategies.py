"""RobE strategies (draft-amend-tcpm-mptcp-robe-02) and the one entry point.

    sock, report = connect(("10.100.0.2", 80), strategy="sim")

A Strategy only decides which attempts to start, when to give up on one and
which wins (`establish`); `after_establish` then adds the remaining paths —
by default as MP_JOIN subflows through the backend's joiner. Every strategy
runs unchanged over kernel sockets (`backend=KernelBackend()`, the default) or
the user-space stack (`backend=UserStackBackend(stack)`; backends.py): the
returned connection is then a kernel socket or a stack Connection. RobE_eSIM (server support,
MP_JOIN_CAP option; out of scope here) fits the same interface: it would keep
the losing attempts instead of resetting them and override after_establish,
and callers would not change. `requires_server_support` lets a caller refuse
such strategies against an unmodified server.
"""
from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from testbed.robe import paths as P
from testbed.robe import report as R
from testbed.robe.attempts import AttemptSet
from testbed.robe.backends import Backend, KernelBackend
from testbed.robe.history import History, PathRecord
from testbed.robe.sockets import LocalPath
from testbed.robe.timer import TimerPolicy


class RobeError(OSError):
    """No attempt completed (the Report is attached)."""

    def __init__(self, msg: str, report: R.Report):
        super().__init__(msg)
        self.report = report


@dataclass
class Options:
    """How a strategy establishes: timeout, timer, join mode, history, congestion control."""
    timeout_s: float = 10.0            # whole establishment, all attempts
    timer: TimerPolicy = field(default_factory=TimerPolicy)
    join: str = "auto"                 # auto | userspace | kernel | none
    join_timeout_s: float = 10.0
    history: History | None = None     # read by *ips, updated by every strategy
    cc: str | None = "cubic"           # per socket; subflows inherit it
    bind_device: bool = True           # SO_BINDTODEVICE in addition to bind()

    def describe(self) -> dict:
        """The options as a JSON-able dict."""
        # Not asdict(): it would deep-copy the shared History and its lock.
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("history", "timer")}
        d["timer"] = self.timer.describe()
        d["history"] = str(self.history.path) if self.history and self.history.path else None
        return d


@dataclass
class Context:
    """What a strategy works with: destination, paths, options, report, deadline."""
    dest: tuple[str, int]
    paths: list[LocalPath]          # selected paths, default-route path first
    options: Options
    report: R.Report
    deadline: float                # time.monotonic()
    backend: Backend = field(default_factory=KernelBackend)

    def left(self) -> float:
        """Seconds left until the deadline."""
        return max(0.0, self.deadline - time.monotonic())

    def attempts(self, mptcp: bool = True, bind: bool = True) -> AttemptSet:
        """A fresh set of attempts to dest through this establishment's backend."""
        return AttemptSet(self.dest, self.report, mptcp=mptcp, cc=self.options.cc,
                          bind_device=self.options.bind_device, bind=bind, backend=self.backend)


class Strategy(abc.ABC):
    """A RobE strategy: which attempts to start, when to give up on one, which wins."""
    name: ClassVar[str]
    mptcp: ClassVar[bool] = True
    requires_server_support: ClassVar[bool] = False

    @abc.abstractmethod
    def establish(self, ctx: Context) -> tuple[Any, LocalPath]:
        """Return the winning connection (the backend's: socket or stack Connection) and its path,
        or raise RobeError."""

    def after_establish(self, ctx: Context, sock: Any, winner: LocalPath, joiner: Any) -> None:
        """Add the remaining paths to the won connection (MP_JOIN subflows by default)."""
        token = ctx.backend.token(sock) if self.mptcp else None
        joiner.use(sock)
        joiner.start(token, ctx.dest, ctx.paths, winner)


STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy available by its name."""
    STRATEGIES[cls.name] = cls
    return cls


def _fail(ctx: Context, att: AttemptSet, what: str) -> RobeError:
    att.abort_all("gave up")
    ctx.report.add(R.GAVE_UP, reason=what)
    return RobeError(what, ctx.report)


def _single(ctx: Context, path: LocalPath, mptcp: bool, bind: bool) -> tuple[Any, LocalPath]:
    """One attempt, left to the SYN retransmissions until the deadline."""
    att = ctx.attempts(mptcp=mptcp, bind=bind)
    a = att.try_start(path)
    won = att.poll(ctx.left()) if a is not None else None
    if won is None:
        raise _fail(ctx, att, f"no connection via {path.name} within {ctx.options.timeout_s:g} s")
    return att.claim(won), path


@register
class PlainTCP(Strategy):
    """Baseline: one plain TCP connect over the default route (no MPTCP)."""
    name = "tcp"
    mptcp = False

    def establish(self, ctx: Context) -> tuple[Any, LocalPath]:
        return _single(ctx, ctx.paths[0], mptcp=False, bind=False)


@register
class PlainMPTCP(Strategy):
    """Baseline (RFC 8684 as deployed): one MPTCP connect over the default
    route; other paths are joined afterwards like any MPTCP client does."""
    name = "mptcp"

    def establish(self, ctx: Context) -> tuple[Any, LocalPath]:
        return _single(ctx, ctx.paths[0], mptcp=True, bind=False)


@register
class Timer(Strategy):
    """RobE_TIMER: paths in order; when an attempt has not completed within
    the timer it is reset and a fresh SYN+MP_CAPABLE (new key) goes out on the
    next path. The last path keeps its attempt until the overall deadline."""
    name = "timer"

    def order(self, ctx: Context) -> list[LocalPath]:
        """The order in which paths are tried: the default-route path first."""
        return list(ctx.paths)

    def establish(self, ctx: Context) -> tuple[Any, LocalPath]:
        att = ctx.attempts()
        order = self.order(ctx)
        current = att.try_start(order[0]) if order else None
        for i, path in enumerate(order):
            last = i == len(order) - 1
            if current is None:  # failed locally at once: next path immediately
                current = att.try_start(order[i + 1]) if not last else None
                continue
            # The next socket is created and bound while we wait, so its SYN
            # leaves the moment the timer fires.
            nxt = None
            if not last:
                try:
                    nxt = att.prepare(order[i + 1])
                except OSError as exc:
                    att._local_failure(order[i + 1], exc)
            wait = ctx.left() if last else min(ctx.left(), ctx.options.timer.value(path, ctx.options.history))
            won = att.poll(wait)
            if won is not None:
                if nxt is not None:
                    att.discard(nxt)  # never connected: nothing on the wire
                return att.claim(won), won.path
            if ctx.left() <= 0 or nxt is None:
                if current in att.active:
                    att.abort(current, "deadline")
                current = None
                if ctx.left() <= 0:
                    break
                continue
            prev = current if current in att.active else None  # None: it failed early
            try:
                current = att.fire(nxt)     # fresh SYN+MP_CAPABLE (new key) on the next path
            except OSError:
                current = None
            if prev is not None:
                ctx.report.add(R.TIMER_EXPIRED, path.name, after_s=round(wait, 6))
                att.abort(prev, "timer expired")
        raise _fail(ctx, att, f"no path completed a handshake within {ctx.options.timeout_s:g} s")


@register
class Sim(Strategy):
    """RobE_SIM: SYN+MP_CAPABLE on every selected path at once; the first
    SYN/ACK wins, every other attempt is reset (also ones completing later)."""
    name = "sim"

    def establish(self, ctx: Context) -> tuple[Any, LocalPath]:
        att = ctx.attempts()
        # Sockets are created and bound first so the SYNs leave back to back
        # (measured spread on this machine: tens of microseconds).
        att.try_start_all(ctx.paths)
        won = att.poll(ctx.left())
        if won is None:
            raise _fail(ctx, att, f"no path completed a handshake within {ctx.options.timeout_s:g} s")
        return att.claim(won), won.path


@register
class ESim(Strategy):
    """RobE_eSIM: SIM whose SYNs ask for eSIM (ROBE_eSIM_EN); when the winner's
    SYN/ACK echoes it the losing attempts are not reset but end, with
    MP_JOIN_CAP on their final ACK, as subflows of the winner (multipath after
    the slowest MP_CAPABLE handshake). Without the echo (an RFC 8684 server)
    it is exactly SIM. Needs a backend that can ask (the user-space stack)."""
    name = "esim"
    requires_server_support = True

    def establish(self, ctx: Context) -> tuple[Any, LocalPath]:
        if not ctx.backend.supports_esim:
            raise RobeError(f"esim needs the user-space stack (backend {ctx.backend.name!r} cannot ask "
                            "for it)", ctx.report)
        att = ctx.attempts()
        att.esim = True
        att.try_start_all(ctx.paths)
        won = att.poll(ctx.left())
        if won is None:
            raise _fail(ctx, att, f"no path completed a handshake within {ctx.options.timeout_s:g} s")
        agreed = ctx.backend.esim_agreed(won.sock)
        if not agreed:
            ctx.report.add(R.ESIM_FALLBACK, won.path.name, why="the SYN/ACK did not echo ROBE_eSIM_EN")
        sock = att.claim(won, keep_losers=agreed)
        self._kept = [(a.path, a.sock) for a in att.kept]
        self._abort = lambda h: att.abort(next(a for a in att.kept if a.sock is h), "no eSIM subflow")
        return sock, won.path

    def after_establish(self, ctx: Context, sock: Any, winner: LocalPath, joiner: Any) -> None:
        """Kept losers are watched until they are subflows; paths without one join with MP_JOIN."""
        kept = getattr(self, "_kept", [])
        if not kept:
            super().after_establish(ctx, sock, winner, joiner)
            return
        joiner.use(sock)
        joiner.watch_esim(kept, self._abort)
        kept_names = {p.name for p, _ in kept} | {winner.name}
        rest = [p for p in ctx.paths if p.name not in kept_names]
        if rest:
            joiner.start(ctx.backend.token(sock), ctx.dest, rest, None)


def _ips_order(ctx: Context) -> list[LocalPath]:
    h = ctx.options.history
    ranked = h.rank(ctx.paths) if h is not None else list(ctx.paths)
    ctx.report.add("ips_ranked", None, order=[p.name for p in ranked],
                   costs={p.name: (h.cost_s(p.name) if h else None) for p in ranked})
    return ranked


@register
class IPS(Strategy):
    """RobE_IPS: one attempt on the path the history rates best (default
    route without history). A broken chosen path means no connection (draft
    Table 1); the failure is recorded, so the next connection avoids it."""
    name = "ips"

    def establish(self, ctx: Context) -> tuple[Any, LocalPath]:
        return _single(ctx, _ips_order(ctx)[0], mptcp=True, bind=True)


@register
class SimIPS(Strategy):
    """SIM+IPS (draft): SIM while some selected path has no history, IPS after."""
    name = "sim+ips"

    def establish(self, ctx: Context) -> tuple[Any, LocalPath]:
        h = ctx.options.history
        if h is None or not h.complete_for(ctx.paths):
            ctx.report.add("mode", None, using="sim", why="paths without history")
            return Sim().establish(ctx)
        ctx.report.add("mode", None, using="ips")
        return IPS().establish(ctx)


@register
class TimerIPS(Timer):
    """TIMER+IPS (draft): IPS orders the paths, the timer moves on when the
    chosen one does not answer."""
    name = "timer+ips"

    def order(self, ctx: Context) -> list[LocalPath]:
        """The order in which paths are tried: IPS's ranking."""
        return _ips_order(ctx)


def connect(dest: tuple[str, int], strategy: str = "sim", paths: list[LocalPath] | None = None,
            timeout: float = 10.0, report: R.Report | None = None,
            options: Options | None = None, backend: Backend | None = None) -> tuple[Any, R.Report]:
    """Connect to dest with a RobE strategy; returns (connection, Report).

    The connection is a kernel socket, or with backend=UserStackBackend(stack)
    a connection of that user-space stack (`paths` are then required: the
    discovery below asks the kernel's routes).

    Runs in the calling thread's network namespace. `paths` default to the
    discovered local paths with a route to dest (default route first). Joins
    of the other paths continue in the background: `report.wait_joins()`
    waits for them. Raises
    RobeError (with .report) when no attempt completed within `timeout`."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    opts = options or Options()
    opts.timeout_s = timeout
    selected = paths if paths else P.discover(dest[0])
    impl = STRATEGIES[strategy]()
    be = backend or KernelBackend()
    rep = report or R.Report(strategy, dest, [p.name for p in selected])
    rep.options = opts.describe() | {"backend": be.name}
    joiner = be.joiner(opts.join if impl.mptcp else "none", rep, opts.join_timeout_s, opts.history)
    joiner.prepare(selected)
    rep.t0_ns = time.monotonic_ns()  # after the listener is up: not part of setup time
    ctx = Context(dest, selected, opts, rep, time.monotonic() + timeout, be)
    try:
        sock, winner = impl.establish(ctx)
    except BaseException as exc:
        joiner.close()
        rep.outcome = "failed"
        rep.error = str(exc)
        _learn(opts.history, rep)
        raise
    if impl.mptcp and be.is_fallback(sock):
        rep.outcome = "fallback_tcp"
        rep.add(R.FALLBACK_TCP, winner.name)
    else:
        rep.outcome = "connected"
    rep.token = be.token(sock) if impl.mptcp else None
    _learn(opts.history, rep)
    impl.after_establish(ctx, sock, winner, joiner)
    return sock, rep


def _learn(history: History | None, rep: R.Report) -> None:
    """Feed the IPS history: handshake RTTs and per-path outcomes. A loser of
    a SIM race that was still pending teaches nothing (neither good nor bad)."""
    if history is None:
        return
    completed = [(ev.path or "", ev.detail["handshake_ms"] / 1e3)
                 for ev in rep.find(R.CONNECT_COMPLETED)]
    failed = {e.path for e in rep.find(R.TIMER_EXPIRED) + rep.find(R.CONNECT_FAILED)}
    if rep.outcome == "failed":  # the attempts still pending at the deadline failed too
        failed |= {e.path for e in rep.find(R.ATTEMPT_STARTED)} - \
                  {e.path for e in rep.find(R.CONNECT_COMPLETED)}

    def change(records: dict) -> None:
        for name, rtt_s in completed:
            rec = records.setdefault(name, PathRecord())
            rec.add_outcome(True)
            rec.add_rtt(rtt_s)
        for name in failed:
            if name:
                records.setdefault(name, PathRecord()).add_outcome(False)

    try:
        history.update(change)
    except OSError:
        pass  # a read-only store must not break connecting
