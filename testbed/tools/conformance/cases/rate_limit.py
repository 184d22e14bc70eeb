"""The subflow rate-limit option (SRL, draft-hoang-mptcp-sub-rate-limit-00; the code is
this project's experimental one, testbed/stack/rate_limit.py) against an unmodified
kernel: what Linux does when its peer asks it, on a data segment or on a pure ACK, to
stop sending on the subflow (rate 0). The kernel does not know the option; RFC 8684 §3
says a receiver ignores a subtype it does not implement, so the requester must not rely
on it: a rate limit holds only against a peer that implements SRL."""
from __future__ import annotations

from testbed.stack.options import Dss
from testbed.stack.packet import ACK, RST
from testbed.stack.rate_limit import SubflowRateLimit
from testbed.stack.scripted import ScriptedConnection
from testbed.tools.conformance.case import Observation, case
from testbed.tools.conformance.lab import KernelConnection, Lab
from testbed.tools.conformance.wire import counters_text, describe, established, mapped_data_with, still_works

STOP = SubflowRateLimit(0.0)
IGNORED = "ignored, kernel still sends"


def _after_srl(lab: Lab, conn: ScriptedConnection, kernel: KernelConnection, start: int) -> Observation:
    """What followed an SRL asking for rate 0: a RST? does our data still reach the kernel's
    application? does the kernel still send new data on the subflow (1000 bytes written)?"""
    rst = lab.peer.expect(lambda s: bool(s.flags & RST), 0.3, since=start)
    ok = still_works(conn, kernel) and kernel.error is None and not kernel.eof
    before = len(lab.peer.received)
    kernel.send(b"k" * 1000)
    sent = conn.initial.expect(lambda s: len(s.payload) > 0 and not s.flags & RST, 1.0, since=before)
    if rst is not None:
        outcome = describe(rst)
    elif not ok:
        outcome = "connection stalled"
    else:
        outcome = IGNORED if sent is not None else "no new data (honoured)"
    return Observation(outcome, f"{describe(rst) if rst else 'no RST'}; the connection "
                                f"{'still delivers data' if ok else 'stopped delivering data'}; after its "
                                f"application wrote 1000 bytes the kernel "
                                f"{'sent ' + str(len(sent.payload)) + ' bytes' if sent else 'sent nothing'} "
                                f"on the subflow; {counters_text(lab.counters())}")


@case("srl-on-data-segment", "3",
      """Subtype 0xF is for private use: a receiver that does not implement the experiment
      ignores the option. A data segment carrying SRL with rate 0 ("stop sending on this
      subflow") is delivered as any other, and a kernel without SRL keeps sending on the
      subflow at its own pace.""",
      conforming={IGNORED}, recorded=IGNORED,
      counters={"MPTcpExtMPRstTx": 0, "MPTcpExtMPPrioRx": 0})
def srl_on_data_segment(lab: Lab) -> Observation:
    """100 bytes with a DSS mapping and SRL rate 0 (private-use subtype 0xF, nibble 3, 7 bytes), then the kernel writes."""
    conn, kernel = established(lab)
    start = len(lab.peer.received)
    return mapped_data_with(lab, conn, kernel, STOP, b"r" * 100) or _after_srl(lab, conn, kernel, start)


@case("srl-on-pure-ack", "3",
      """The user-space stack sends SRL on a pure ACK of the subflow (with its DATA_ACK). A
      receiver that does not implement the private-use option ignores it: no RST, the
      connection goes on, and the kernel keeps sending on the subflow.""",
      conforming={IGNORED}, recorded=IGNORED,
      counters={"MPTcpExtMPRstTx": 0})
def srl_on_pure_ack(lab: Lab) -> Observation:
    """A pure ACK with a DATA_ACK and SRL rate 0, then the kernel writes."""
    conn, kernel = established(lab)
    start = len(lab.peer.received)
    conn.initial.send(ACK, [Dss(data_ack=conn.remote_idsn + 1), STOP])   # nothing received from it yet
    return _after_srl(lab, conn, kernel, start)
