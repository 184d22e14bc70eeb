"""RobE_eSIM's options against an unmodified kernel (draft-amend-tcpm-mptcp-robe-02;
the codes are this project's experimental ones, testbed/stack/esim.py): what a
Linux server does with ROBE_eSIM_EN in a SYN and with MP_JOIN_CAP on the final
ACK of a half-open connection, and what a Linux client does when a server
echoes ROBE_eSIM_EN. The kernel knows neither option; RFC 8684 says what it
must then do, and that is what makes eSIM's fallback to SIM safe."""
from __future__ import annotations

import socket

from testbed.mptcp.sockopt import IPPROTO_MPTCP
from testbed.stack import esim, privacy
from testbed.stack.crypto import new_key
from testbed.stack.options import CAP_H_SHA256, MpCapable, UnknownMptcp
from testbed.stack.packet import ACK, RST, SYN, Mss, TcpSegment
from testbed.stack.scripted import ScriptError
from testbed.tools.conformance.case import Observation, case
from testbed.tools.conformance.lab import Lab, fell_back
from testbed.tools.conformance.wire import NO_ANSWER, counters_text, describe, established, still_works

ESIM_EN = privacy.request_option(esim.FLAG_ESIM)


@case("esim-en-in-syn", "3",
      """Subtype 0xF is for private use: a host that does not implement the experiment
      ignores it. A SYN with MP_CAPABLE and ROBE_eSIM_EN is answered as an MPTCP SYN, and
      ROBE_eSIM_EN is not echoed, so a RobE_eSIM client behaves exactly as SIM.""",
      conforming={"SYN/ACK with MP_CAPABLE v1"}, recorded="SYN/ACK with MP_CAPABLE v1",
      counters={"MPTcpExtMPCapableSYNRX": 1})
def esim_en_in_syn(lab: Lab) -> Observation:
    """A SYN with MP_CAPABLE and ROBE_eSIM_EN (private-use subtype 0xF, flags 0x04)."""
    answer = lab.peer.subflow(lab.port).handshake([MpCapable(CAP_H_SHA256), ESIM_EN])
    echoed = answer is not None and esim.esim_enabled(privacy.requested(answer.options))
    return Observation(describe(answer), f"answered with {describe(answer)}; ROBE_eSIM_EN "
                                         f"{'echoed' if echoed else 'not echoed'}; {counters_text(lab.counters())}")


@case("join-cap-on-final-ack", "3.1",
      """A third ACK without MP_CAPABLE makes the connection fall back to regular TCP. The
      final ACK of a RobE_eSIM losing attempt carries MP_JOIN_CAP (private use, ignored)
      instead of MP_CAPABLE's keys, so a server without eSIM makes it a plain TCP connection
      of its own; the connection it names is not touched. (A RobE_eSIM client sends
      MP_JOIN_CAP only after the server echoed ROBE_eSIM_EN, which Linux never does.)""",
      conforming={"fallback to TCP"}, recorded="fallback to TCP",
      counters={"MPTcpExtMPCapableFallbackACK": 1, "MPTcpExtMPJoinAckRx": 0})
def join_cap_on_final_ack(lab: Lab) -> Observation:
    """A half-open connection (SYN with ROBE_eSIM_EN) whose final ACK carries MP_JOIN_CAP naming an established one.

    The tag is the right one (the established connection's keys over the attempt's
    server key); 100 plain bytes follow on the attempt."""
    conn, kernel = established(lab)
    sf = lab.peer.subflow(lab.port)
    synack = sf.handshake([MpCapable(CAP_H_SHA256), ESIM_EN])
    cap = synack.option(MpCapable) if synack is not None else None
    if cap is None or cap.sender_key is None:
        raise ScriptError(f"the losing attempt's SYN was answered with {describe(synack)}")
    tag = esim.DEFAULT_CRYPTO.tag(conn.local_key, conn.remote_key, cap.sender_key)
    start = len(lab.peer.received)
    sf.send(ACK, [esim.join_cap_option(1, conn.local_key, tag)])
    sf.send(ACK, [], b"q" * 100)
    second = lab.server.accepted(1.0, index=1)
    got = second is not None and second.wait(lambda k: len(k.data) >= 100, 1.0)
    rst = sf.expect(lambda s: bool(s.flags & RST), 0.05, since=start)
    first_ok = still_works(conn, kernel)
    subflows = 1 + kernel.info().subflows   # MPTCP_INFO counts the joined ones
    if rst is not None:
        outcome = describe(rst)
    elif second is None:
        outcome = NO_ANSWER
    else:
        outcome = "fallback to TCP" if second.fell_back() else "MPTCP kept"
    return Observation(outcome, f"{describe(rst) if rst else 'no RST'}; the half-open attempt became "
                                f"{'a second connection' if second else 'no connection'} whose application "
                                f"{'read' if got else 'did not read'} the 100 plain bytes; the named connection "
                                f"{'still delivers data' if first_ok else 'stopped delivering data'} with "
                                f"{subflows} subflow(s); {counters_text(lab.counters())}")


@case("kernel-client-esim-echo", "3",
      """A client that did not ask for an experiment's option ignores it in the SYN/ACK
      (subtype 0xF, private use): a Linux client that gets ROBE_eSIM_EN echoed completes an
      RFC 8684 handshake, its third ACK carrying MP_CAPABLE with both keys and nothing of eSIM.""",
      conforming={"third ACK with MP_CAPABLE"}, recorded="third ACK with MP_CAPABLE",
      counters={"MPTcpExtMPCapableSYNACKRX": 1})
def kernel_client_esim_echo(lab: Lab) -> Observation:
    """The kernel connects to the scripted peer, which answers with MP_CAPABLE and an echo of ROBE_eSIM_EN."""
    port = lab.peer.new_port()   # the peer's range: its nftables table keeps its kernel from answering
    sock = lab.kernel_ns.run(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP))
    try:
        sock.setblocking(False)
        sock.connect_ex((lab.peer.local, port))
        syn = lab.peer.expect(lambda s: s.dport == port and s.flags & (SYN | ACK) == SYN, 1.0)
        if syn is None or syn.option(MpCapable) is None:
            raise ScriptError(f"the kernel client's SYN: {describe(syn)}")
        key = new_key()
        start = len(lab.peer.received)
        lab.peer.send(TcpSegment(port, syn.sport, 1000, (syn.seq + 1) & 0xFFFFFFFF, SYN | ACK, 65535,
                                 [Mss(1460), MpCapable(CAP_H_SHA256, sender_key=key), ESIM_EN]))
        third = lab.peer.expect(lambda s: s.sport == syn.sport and not s.flags & SYN, 1.0, since=start)
        if third is None:
            return Observation(NO_ANSWER, f"no third ACK; {counters_text(lab.counters())}")
        cap = third.option(MpCapable)
        private = [o for o in third.options if isinstance(o, UnknownMptcp)]
        keys = cap is not None and cap.sender_key is not None and cap.receiver_key == key
        fallback = fell_back(sock)
        outcome = ("third ACK with MP_CAPABLE" if keys and not private and not third.flags & RST
                   else describe(third))
        return Observation(outcome, f"third ACK: {describe(third)}{' with both keys' if keys else ''}; "
                                    f"{len(private)} private-use option(s) in it; the client's connection "
                                    f"{'fell back to TCP' if fallback else 'is MPTCP'}; "
                                    f"{counters_text(lab.counters())}")
    finally:
        sock.close()

