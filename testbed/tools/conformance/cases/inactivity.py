"""The inactivity-time option (ITO, draft-hoang-mptcp-inactivity-time-00; the code is
this project's experimental one, testbed/stack/inactivity.py) against an unmodified
kernel: what Linux does when its peer tells it, on the MP_CAPABLE third ACK or on a
data segment, how long to keep the connection while no subflow is up. The kernel does
not know the option; RFC 8684 §3 says a receiver ignores a subtype it does not
implement, so a host must not count on a kernel peer keeping its state for the value
it sent (the kernel's own rules apply: net.mptcp.close_timeout and TCP's timers)."""
from __future__ import annotations

from testbed.stack.inactivity import InactivityTime
from testbed.stack.options import CAP_H_SHA256, MpCapable
from testbed.stack.packet import ACK, RST
from testbed.stack.scripted import ScriptedConnection, ScriptError
from testbed.tools.conformance.case import Observation, case
from testbed.tools.conformance.lab import KernelConnection, Lab
from testbed.tools.conformance.wire import counters_text, describe, established, mapped_data_with, send_and_wait, \
    still_works

ITO = InactivityTime(4)
IGNORED = "ignored"


def _after_ito(lab: Lab, conn: ScriptedConnection, kernel: KernelConnection, start: int) -> Observation:
    """What followed an ITO: a RST? a fallback to TCP? does data still reach the kernel's application?"""
    rst = lab.peer.expect(lambda s: bool(s.flags & RST), 0.3, since=start)
    ok = still_works(conn, kernel) and kernel.error is None and not kernel.eof
    fell_back = kernel.fell_back()
    if rst is not None:
        outcome = describe(rst)
    elif not ok:
        outcome = "connection stalled"
    else:
        outcome = "fallback to TCP" if fell_back else IGNORED
    return Observation(outcome, f"{describe(rst) if rst else 'no RST'}; the connection "
                                f"{'still delivers data' if ok else 'stopped delivering data'} and "
                                f"{'fell back to TCP' if fell_back else 'stays MPTCP'}; "
                                f"{counters_text(lab.counters())}")


@case("ito-on-mp-capable-ack", "3",
      """Subtype 0xF is for private use: a receiver that does not implement the experiment
      ignores the option. The user-space stack sends ITO (inactivity timer 4 s) on the
      MP_CAPABLE third ACK, next to the keys: the handshake completes as MPTCP and the
      connection carries data.""",
      conforming={IGNORED}, recorded=IGNORED,
      counters={"MPTcpExtMPCapableSYNRX": 1, "MPTcpExtMPCapableACKRX": 1,
                "MPTcpExtMPCapableFallbackACK": 0, "MPTcpExtMPRstTx": 0})
def ito_on_mp_capable_ack(lab: Lab) -> Observation:
    """SYN with MP_CAPABLE, then a third ACK carrying both keys and ITO (private-use subtype 0xF, nibble 2, 5 bytes)."""
    conn = lab.peer.connect(lab.port, third_ack=False)
    start = len(lab.peer.received)
    conn.initial.send(ACK, [MpCapable(CAP_H_SHA256, conn.local_key, conn.remote_key), ITO])
    kernel = lab.server.accepted(1.0)
    if kernel is None:
        raise ScriptError("the kernel's listener accepted no connection within 1 s")
    send_and_wait(conn, kernel, b"a" * 100)
    return _after_ito(lab, conn, kernel, start)


@case("ito-on-dss-segment", "3",
      """A data segment carrying a DSS mapping and ITO is delivered as any other by a
      receiver that does not implement the option; nothing else changes.""",
      conforming={IGNORED}, recorded=IGNORED,
      counters={"MPTcpExtMPRstTx": 0, "MPTcpExtDSSNotMatching": 0})
def ito_on_dss_segment(lab: Lab) -> Observation:
    """100 bytes with a DSS mapping and ITO (timer 4 s) on an established connection."""
    conn, kernel = established(lab)
    start = len(lab.peer.received)
    return mapped_data_with(lab, conn, kernel, ITO, b"i" * 100) or _after_ito(lab, conn, kernel, start)
