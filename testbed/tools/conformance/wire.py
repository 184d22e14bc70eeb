"""What the kernel put on the wire, in words, and the small scripts many cases share.

`describe` names a segment the way the conformance table speaks of it
("RST with MP_TCPRST reason 1", "SYN/ACK with MP_CAPABLE v1"), so outcomes
read the same in every case.
"""
from __future__ import annotations

from testbed.stack.options import AddAddr, Dss, MpCapable, MpFail, MpFastclose, MpJoinSynAck, MpPrio, \
    MpTcpRst, RemoveAddr, UnknownMptcp
from testbed.stack.packet import ACK, FIN, RST, SYN, TcpSegment
from testbed.stack.scripted import ScriptedConnection, ScriptError, ScriptedSubflow
from testbed.tools.conformance.case import Observation
from testbed.tools.conformance.lab import KernelConnection, Lab

NO_ANSWER = "no answer"


def flags_name(seg: TcpSegment) -> str:
    """SYN/ACK, RST, FIN/ACK, ACK ... of a segment."""
    names = [n for bit, n in ((SYN, "SYN"), (FIN, "FIN"), (RST, "RST")) if seg.flags & bit]
    if seg.flags & ACK and not seg.flags & RST:
        names.append("ACK")
    return "/".join(names) or "no flags"


def option_name(opt) -> str:
    """One MPTCP option in words."""
    if isinstance(opt, MpCapable):
        return f"MP_CAPABLE v{opt.version}"
    if isinstance(opt, MpTcpRst):
        return f"MP_TCPRST reason {opt.reason}"
    if isinstance(opt, MpJoinSynAck):
        return "MP_JOIN"
    if isinstance(opt, AddAddr):
        return "ADD_ADDR echo" if opt.echo else "ADD_ADDR"
    if isinstance(opt, Dss):
        return "DSS"
    names = {MpFail: "MP_FAIL", MpFastclose: "MP_FASTCLOSE", MpPrio: "MP_PRIO", RemoveAddr: "REMOVE_ADDR"}
    for cls, name in names.items():
        if isinstance(opt, cls):
            return name
    if isinstance(opt, UnknownMptcp):
        return f"MPTCP subtype {opt.subtype}"
    return type(opt).__name__


def describe(seg: TcpSegment | None, options: tuple[type, ...] = (MpCapable, MpJoinSynAck, MpTcpRst, MpFail,
                                                                     AddAddr, UnknownMptcp)) -> str:
    """A segment as 'FLAGS with OPTION, OPTION' (only the option classes given; DSS is
    on nearly every segment and left out unless asked for)."""
    if seg is None:
        return NO_ANSWER
    named = [option_name(o) for o in seg.options if isinstance(o, options)]
    return flags_name(seg) + (" with " + ", ".join(named) if named else " without MPTCP option"
                              if seg.flags & SYN else "")


def established(lab: Lab, checksum: bool = False) -> tuple[ScriptedConnection, KernelConnection]:
    """An MPTCP connection with the kernel by the book, its first 100 bytes delivered
    (so both sides are fully established); ScriptError when that does not happen.
    The lab's counters start from here, so a case reports what its stimulus changed."""
    conn = lab.peer.connect(lab.port, checksum=checksum)
    kernel = lab.server.accepted(1.0)
    if kernel is None:
        raise ScriptError("the kernel's listener accepted no connection within 1 s")
    send_and_wait(conn, kernel, b"a" * 100)
    lab.mark()
    return conn, kernel


def send_and_wait(conn: ScriptedConnection, kernel: KernelConnection, payload: bytes,
                  sf: ScriptedSubflow | None = None, timeout: float = 1.0) -> None:
    """Send payload on a subflow (default the initial one) and wait until the kernel's
    application has read it; ScriptError if it does not."""
    want = len(kernel.data) + len(payload)
    conn.send_data(payload, sf)
    if not kernel.wait(lambda k: len(k.data) >= want, timeout):
        raise ScriptError(f"the kernel's application read {len(kernel.data)} of {want} bytes "
                          f"within {timeout} s of in-order data")


def still_works(conn: ScriptedConnection, kernel: KernelConnection, sf: ScriptedSubflow | None = None) -> bool:
    """Whether new data on the connection still reaches the kernel's application."""
    try:
        send_and_wait(conn, kernel, b"z" * 10, sf)
        return True
    except ScriptError:
        return False


def ignored_or_not(lab: Lab, conn: ScriptedConnection, kernel: KernelConnection, options: list) -> Observation:
    """Send an ACK with these options on the initial subflow, something the kernel should
    ignore: outcome 'ignored' when no RST follows, its application is told nothing and
    new data still arrives; else the RST in words, or 'connection stalled'."""
    start = len(lab.peer.received)
    conn.initial.send(ACK, options)
    rst = lab.peer.expect(lambda s: bool(s.flags & RST), 0.3, since=start)
    ok = still_works(conn, kernel) and kernel.error is None and not kernel.eof
    outcome = "ignored" if ok and rst is None else describe(rst) if rst else "connection stalled"
    return Observation(outcome, f"{describe(rst) if rst else 'no RST'}; the connection "
                                f"{'still delivers data' if ok else 'stopped delivering data'}; "
                                f"{counters_text(lab.counters())}")


def mapped_data_with(lab: Lab, conn: ScriptedConnection, kernel: KernelConnection, option,
                     payload: bytes) -> Observation | None:
    """Send payload on the initial subflow with its DSS mapping and `option` next to it: None
    once the kernel's application read it (within 1 s), else the 'data dropped' observation."""
    want = len(kernel.data) + len(payload)
    conn.initial.send(ACK, [conn.dss(conn.initial, payload), option], payload)
    conn.snd_dsn = (conn.snd_dsn + len(payload)) & 0xFFFFFFFFFFFFFFFF
    if kernel.wait(lambda k: len(k.data) >= want, 1.0):
        return None
    return Observation("data dropped", f"the kernel's application read {len(kernel.data)} of {want} bytes; "
                                       f"{counters_text(lab.counters())}")


def data_acks(segments: list[TcpSegment]) -> list[int]:
    """The DATA_ACK values of these segments, in order."""
    return [d.data_ack for s in segments if (d := s.option(Dss)) is not None and d.data_ack is not None]


def counters_text(counters: dict[str, int], names: tuple[str, ...] | None = None) -> str:
    """'MPTcpExtX +1, MPTcpExtY +2' for the counters given (all that changed when None)."""
    picked = {k: v for k, v in counters.items() if names is None or k in names}
    return ", ".join(f"{k} {v:+d}" for k, v in sorted(picked.items())) or "no MPTcpExt counter changed"
