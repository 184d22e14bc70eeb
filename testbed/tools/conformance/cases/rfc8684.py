"""RFC 8684 conformance cases: each sends the kernel one unusual thing and
records what it answers on the wire, in its counters and to its application."""
from __future__ import annotations

from testbed.stack.crypto import add_addr_hmac
from testbed.stack.options import CAP_B_EXT, CAP_H_SHA256, AddAddr, Dss, MpCapable, MpFail, MpFastclose, \
    MpPrio, RemoveAddr, UnknownMptcp
from testbed.stack.packet import ACK, RST, SYN
from testbed.stack.scripted import ScriptedSubflow, ScriptError
from testbed.tools.conformance.case import Observation, case
from testbed.tools.conformance.lab import KernelConnection, Lab
from testbed.tools.conformance.wire import NO_ANSWER, counters_text, data_acks, describe, established, \
    ignored_or_not, still_works

SYNACK_MPC = "SYN/ACK with MP_CAPABLE v1"
SYNACK_PLAIN = "SYN/ACK without MPTCP option"
CHECKSUM_ON = {"net.mptcp.checksum_enabled": 1}


def _syn_answer(lab: Lab, options: list) -> Observation:
    """Send a SYN with these options; the outcome is the answer in words."""
    sf = lab.peer.subflow(lab.port)
    answer = sf.handshake(options)
    return Observation(describe(answer), f"answered the SYN with {describe(answer)}; "
                                         f"{counters_text(lab.counters())}")


def _mapping_rejected(lab: Lab, kernel: KernelConnection, sf: ScriptedSubflow, start: int) -> Observation:
    """After a DSS on sf the kernel must reject: a RST on sf (in words), or 'fallback to
    TCP' when it sent none and the connection fell back instead."""
    rst = sf.expect(lambda s: bool(s.flags & RST), 0.5, since=start)
    fell_back = kernel.error is None and kernel.fell_back()
    outcome = describe(rst) if rst else "fallback to TCP" if fell_back else NO_ANSWER
    return Observation(outcome, f"{describe(rst) if rst else 'no RST'}; the connection "
                                f"{'fell back to TCP' if fell_back else 'did not fall back'}; "
                                f"{counters_text(lab.counters())}")


# ---- the handshake ---------------------------------------------------------------------------
@case("unknown-subtype-in-syn", "3, 8",
      """Subtypes 0x9-0xE are unassigned: an unknown MPTCP subtype carries nothing to act on,
      so a SYN that also carries MP_CAPABLE is answered as an MPTCP SYN.""",
      conforming={SYNACK_MPC}, recorded=SYNACK_MPC,
      counters={"MPTcpExtMPCapableSYNRX": 1})
def unknown_subtype_in_syn(lab: Lab) -> Observation:
    """A SYN with MP_CAPABLE and an option of unassigned subtype 0xC."""
    return _syn_answer(lab, [MpCapable(CAP_H_SHA256), UnknownMptcp(0xC, bytes([30, 4, 0xC0, 0]))])


@case("mp-capable-version-0", "3.1",
      """A responder that does not support the version the initiator asks for and has no
      lower one falls back to regular TCP: the SYN/ACK carries no MP_CAPABLE.""",
      conforming={SYNACK_PLAIN}, recorded=SYNACK_PLAIN,
      counters={"MPTcpExtMPCapableSYNRX": 0})
def mp_capable_version_0(lab: Lab) -> Observation:
    """A SYN with an MPTCP v0 MP_CAPABLE (RFC 6824 form: 12 bytes, the sender's key)."""
    return _syn_answer(lab, [MpCapable(CAP_H_SHA256, sender_key=0x0123456789ABCDEF, version=0)])


@case("mp-capable-version-2", "3.1",
      """A host asked for a version it does not support replies with MP_CAPABLE carrying the
      highest version it supports below the requested one (here v1); the initiator then
      chooses to go on with it or fall back.""",
      conforming={SYNACK_MPC}, recorded=SYNACK_MPC,
      counters={"MPTcpExtMPCapableSYNRX": 1})
def mp_capable_version_2(lab: Lab) -> Observation:
    """A SYN with MP_CAPABLE version 2 (not yet defined)."""
    return _syn_answer(lab, [MpCapable(CAP_H_SHA256, version=2)])


@case("mp-capable-no-crypto", "3.1",
      """An MP_CAPABLE whose crypto-algorithm flags (D-H) are all zero is invalid and MUST be
      ignored: the handshake is a regular TCP one.""",
      conforming={SYNACK_PLAIN}, recorded=SYNACK_PLAIN,
      counters={"MPTcpExtMPCapableSYNRX": 0})
def mp_capable_no_crypto(lab: Lab) -> Observation:
    """A SYN with MP_CAPABLE v1 and no crypto flag (H clear)."""
    return _syn_answer(lab, [MpCapable(0)])


@case("mp-capable-b-flag", "3.1",
      """The B (extensibility) flag is reserved for a future specification; a receiver that
      does not understand it MUST silently ignore the MP_CAPABLE of that SYN (fall back to
      regular TCP); the sender is expected to retry without it.""",
      conforming={SYNACK_PLAIN}, recorded=SYNACK_PLAIN,
      counters={"MPTcpExtMPCapableSYNRX": 0})
def mp_capable_b_flag(lab: Lab) -> Observation:
    """A SYN with MP_CAPABLE v1, flags H and B."""
    return _syn_answer(lab, [MpCapable(CAP_H_SHA256 | CAP_B_EXT)])


@case("mp-capable-bad-length", "3.1",
      """The MP_CAPABLE of a SYN is 4 bytes long; an option of another length is not a
      valid MP_CAPABLE, so the SYN is a regular TCP SYN.""",
      conforming={SYNACK_PLAIN}, recorded=SYNACK_PLAIN,
      counters={"MPTcpExtMPCapableSYNRX": 0})
def mp_capable_bad_length(lab: Lab) -> Observation:
    """A SYN whose MP_CAPABLE says length 5 (one stray byte after the flags)."""
    return _syn_answer(lab, [UnknownMptcp(0, bytes([30, 5, 0x01, CAP_H_SHA256, 0]))])


@case("tcp-option-bad-length", "3.1",
      """(TCP, MUST-7) A TCP implementation MUST be prepared to handle an illegal option
      length; resetting the connection is the suggested reaction. Here the MPTCP option
      claims 20 bytes where the header holds 4.""",
      conforming={SYNACK_PLAIN, "RST without MPTCP option", NO_ANSWER}, recorded=SYNACK_PLAIN,
      rfc="RFC 9293",
      counters={"MPTcpExtMPCapableSYNRX": 0})
def tcp_option_bad_length(lab: Lab) -> Observation:
    """A SYN whose MP_CAPABLE option's length byte runs past the end of the TCP header."""
    return _syn_answer(lab, [UnknownMptcp(0, bytes([30, 20, 0x01, CAP_H_SHA256]))])


@case("third-ack-without-mp-capable", "3.1, 3.7",
      """If the third ACK of the handshake does not carry MP_CAPABLE (a middlebox stripped
      it), the connection MUST fall back to regular TCP.""",
      conforming={"fallback to TCP"}, recorded="fallback to TCP",
      counters={"MPTcpExtMPCapableFallbackACK": 1})
def third_ack_without_mp_capable(lab: Lab) -> Observation:
    """MP_CAPABLE in the SYN and the SYN/ACK, then a plain third ACK and plain data."""
    conn = lab.peer.connect(lab.port, third_ack=False)
    sf = conn.initial
    sf.send(ACK)
    sf.send(ACK, [], b"p" * 100)
    kernel = lab.server.accepted(1.0)
    if kernel is None or not kernel.wait(lambda k: len(k.data) >= 100, 1.0):
        raise ScriptError("the kernel's application did not read the 100 plain bytes within 1 s")
    outcome = "fallback to TCP" if kernel.fell_back() else "MPTCP kept"
    return Observation(outcome, f"application read the plain data; {outcome}; "
                                f"{counters_text(lab.counters())}")


@case("duplicate-mp-capable", "3.1",
      """The third ACK's MP_CAPABLE (both keys) is repeated until the peer's first DSS
      arrives, so a repeated one after establishment is normal and changes nothing.""",
      conforming={"ignored"}, recorded="ignored")
def duplicate_mp_capable(lab: Lab) -> Observation:
    """The MP_CAPABLE third ACK again, after data has flowed both ways."""
    conn, kernel = established(lab)
    return ignored_or_not(lab, conn, kernel, [MpCapable(CAP_H_SHA256, conn.local_key, conn.remote_key)])


# ---- joins -----------------------------------------------------------------------------------
@case("join-by-the-book", "3.2",
      """The SYN/ACK of a join carries the leftmost 64 bits of HMAC(Key-B||Key-A, R-B||R-A);
      after a valid third ACK (160 bits of HMAC(Key-A||Key-B, R-A||R-B)) the responder sends
      the fourth ACK and the subflow carries data.""",
      conforming={"joined"}, recorded="joined",
      counters={"MPTcpExtMPJoinAckRx": 1})
def join_by_the_book(lab: Lab) -> Observation:
    """An MP_JOIN to the connection's token with the right keys, then data on the new subflow."""
    conn, kernel = established(lab)
    sf, synack = conn.join(addr_id=1)
    if synack is None or not synack.flags & SYN:
        return Observation(describe(synack), f"answered the join SYN with {describe(synack)}")
    mac_ok = conn.synack_hmac_valid(sf, synack)
    fourth = sf.expect(lambda s: s.flags & ACK and not s.flags & (SYN | RST), 1.0)
    ok = fourth is not None and still_works(conn, kernel, sf)
    event = lab.events.wait_for("sub_established", 0.5)
    outcome = "joined" if mac_ok and ok else "join failed"
    return Observation(outcome, f"SYN/ACK HMAC {'valid' if mac_ok else 'WRONG'}; fourth ACK "
                                f"{'came' if fourth else 'never came'}; data on the subflow "
                                f"{'delivered' if ok else 'not delivered'}; event sub_established "
                                f"{'seen' if event else 'missing'}; {counters_text(lab.counters())}")


@case("join-wrong-hmac", "3.2, 3.6",
      """If the HMAC of the join's third ACK is not valid the subflow MUST be closed with a
      RST (an MP_TCPRST may give the reason); the connection is not affected.""",
      conforming={"RST without MPTCP option", "RST with MP_TCPRST reason 1"},
      recorded="RST with MP_TCPRST reason 1",
      counters={"MPTcpExtMPJoinAckHMacFailure": 1})
def join_wrong_hmac(lab: Lab) -> Observation:
    """An MP_JOIN whose third ACK carries a wrong HMAC."""
    conn, kernel = established(lab)
    sf, synack = conn.join(addr_id=1, hmac160=bytes(20))
    if synack is None or not synack.flags & SYN:
        raise ScriptError(f"the join SYN was answered with {describe(synack)}, not a SYN/ACK")
    rst = sf.expect(lambda s: bool(s.flags & RST), 1.0)
    ok = still_works(conn, kernel)
    return Observation(describe(rst), f"answered the bad third ACK with {describe(rst)}; the connection "
                                      f"{'still delivers data' if ok else 'stopped delivering data'}; "
                                      f"{counters_text(lab.counters())}")


@case("join-unknown-token", "3.2",
      """If the token is unknown the receiver sends back a RST, analogous to an unknown port
      in TCP, containing an MP_TCPRST option with the "MPTCP specific error" reason (1).""",
      conforming={"RST with MP_TCPRST reason 1"}, recorded="RST with MP_TCPRST reason 1",
      counters={"MPTcpExtMPJoinNoTokenFound": 1})
def join_unknown_token(lab: Lab) -> Observation:
    """An MP_JOIN SYN naming a token no connection has."""
    conn, _kernel = established(lab)
    _sf, answer = conn.join(token=(conn.remote_token + 1) & 0xFFFFFFFF)
    return Observation(describe(answer), f"answered the join SYN with {describe(answer)}; "
                                         f"{counters_text(lab.counters())}")


@case("data-before-fourth-ack", "3.2",
      """The side that sent the join's third ACK must not send data before the fourth ACK
      (the subflow is not established until then); the RFC sets no rule for a receiver that
      gets data with the third ACK, so accepting, dropping or resetting all conform.""",
      conforming={"data accepted", "data dropped", "subflow reset"}, recorded="data accepted",
      counters={"MPTcpExtMPJoinAckRx": 1})
def data_before_fourth_ack(lab: Lab) -> Observation:
    """A join's third ACK carrying 100 bytes of data with their DSS mapping (before any fourth ACK)."""
    conn, kernel = established(lab)
    before = len(kernel.data)
    # 24 bytes of MP_JOIN plus a 14-byte DSS (32-bit DSN, no DATA_ACK) fill the 40 option bytes.
    mapping = Dss(dsn=conn.snd_dsn & 0xFFFFFFFF, dsn64=False, subflow_seq=1, data_len=100)
    sf, synack = conn.join(addr_id=1, third_ack_options=[mapping], payload=b"j" * 100)
    if synack is None or not synack.flags & SYN:
        raise ScriptError(f"the join SYN was answered with {describe(synack)}, not a SYN/ACK")
    conn.snd_dsn += 100
    got = kernel.wait(lambda k: len(k.data) >= before + 100, 0.5)
    rst = sf.expect(lambda s: bool(s.flags & RST), 0.05)
    acked = sf.expect(lambda s: s.ack == sf.snd_nxt and not s.flags & RST, 0.05)
    outcome = "subflow reset" if rst else "data accepted" if got else "data dropped"
    return Observation(outcome, f"application {'read' if got else 'did not read'} the 100 bytes; subflow "
                                f"{'acknowledged them' if acked else 'did not acknowledge them'}; "
                                f"{describe(rst) if rst else 'no RST'}; {counters_text(lab.counters())}")


# ---- data ------------------------------------------------------------------------------------
@case("dss-bad-checksum", "3.3.1, 3.7",
      """A DSS checksum failure is reported with MP_FAIL (3.7): on the only subflow, while a
      fallback is still possible, an ACK with MP_FAIL and then an infinite mapping; with
      several subflows, a RST carrying MP_FAIL on the failing one.""",
      conforming={"MP_FAIL", "RST with MP_FAIL"}, recorded="MP_FAIL", sysctls=CHECKSUM_ON,
      counters={"MPTcpExtDataCsumErr": 1, "MPTcpExtMPFailTx": 1})
def dss_bad_checksum(lab: Lab) -> Observation:
    """With checksums negotiated, 100 bytes whose DSS checksum is wrong."""
    conn, kernel = established(lab, checksum=True)
    before, start = len(kernel.data), len(lab.peer.received)
    good = conn.dss(payload=b"c" * 100).checksum or 0
    conn.send_data(b"c" * 100, checksum=good ^ 0xFFFF)
    fail = lab.peer.expect(lambda s: s.option(MpFail) is not None or bool(s.flags & RST), 1.0, since=start)
    kernel.wait(lambda k: len(k.data) > before, 0.2)
    outcome = ("RST with MP_FAIL" if fail.flags & RST else "MP_FAIL") if fail is not None and \
        fail.option(MpFail) else describe(fail)
    return Observation(outcome, f"answered with {describe(fail)}; application read "
                                f"{len(kernel.data) - before} of the 100 corrupted bytes; "
                                f"{counters_text(lab.counters())}")


@case("dss-checksum-missing", "3.3",
      """If a checksum is not present when its use has been negotiated, the receiver MUST
      close the subflow with a RST, as it is considered broken.""",
      conforming={"RST without MPTCP option", "RST with MP_TCPRST reason 1"},
      recorded="fallback to TCP", sysctls=CHECKSUM_ON,
      counters={"MPTcpExtDssFallback": 1})
def dss_checksum_missing(lab: Lab) -> Observation:
    """With checksums negotiated, 100 bytes whose DSS mapping has no checksum."""
    conn, kernel = established(lab, checksum=True)
    start = len(lab.peer.received)
    conn.checksum = False
    conn.send_data(b"m" * 100)
    return _mapping_rejected(lab, kernel, conn.initial, start)


@case("dss-checksum-missing-two-subflows", "3.3",
      """If a checksum is not present when its use has been negotiated, the receiver MUST
      close the subflow with a RST, as it is considered broken (here the connection has a
      second subflow, so falling back to TCP is no longer possible).""",
      conforming={"RST without MPTCP option", "RST with MP_TCPRST reason 1"},
      recorded="RST with MP_TCPRST reason 1", sysctls=CHECKSUM_ON,
      counters={"MPTcpExtMPRstTx": 1, "MPTcpExtDssFallback": 0})
def dss_checksum_missing_two_subflows(lab: Lab) -> Observation:
    """With checksums negotiated and a joined second subflow, 100 bytes on the first whose DSS has no checksum."""
    conn, kernel = established(lab, checksum=True)
    sf, synack = conn.join(addr_id=1)
    if synack is None or not synack.flags & SYN or sf.expect(lambda s: not s.flags & (SYN | RST), 1.0) is None:
        raise ScriptError(f"the join was answered with {describe(synack)} and no fourth ACK")
    lab.mark()
    start = len(lab.peer.received)
    conn.checksum = False
    conn.send_data(b"m" * 100)
    return _mapping_rejected(lab, kernel, conn.initial, start)


@case("dss-checksum-unexpected", "3.3",
      """If a checksum is present but its use had not been negotiated, the receiver MUST
      close the subflow with a RST, as it is not behaving as negotiated.""",
      conforming={"RST without MPTCP option", "RST with MP_TCPRST reason 1"},
      recorded="fallback to TCP",
      counters={"MPTcpExtDssFallback": 1})
def dss_checksum_unexpected(lab: Lab) -> Observation:
    """Without checksums negotiated, 100 bytes whose DSS mapping carries one."""
    conn, kernel = established(lab)
    start = len(lab.peer.received)
    conn.checksum = True
    conn.send_data(b"u" * 100)
    return _mapping_rejected(lab, kernel, conn.initial, start)


@case("dss-beyond-window", "3.3.4, 3.8",
      """Data whose data sequence number is outside the receive window is dropped, and no
      DATA_ACK covers it.""",
      conforming={"dropped"}, recorded="dropped",
      counters={"MPTcpExtNoDSSInWindow": 1})
def dss_beyond_window(lab: Lab) -> Observation:
    """100 bytes mapped 2^32 bytes beyond the next expected data sequence number."""
    conn, kernel = established(lab)
    before, start = len(kernel.data), len(lab.peer.received)
    expected = conn.snd_dsn
    conn.send_data(b"w" * 100, dsn=expected + (1 << 32))
    lab.peer.settle(0.2)
    acks = data_acks(lab.peer.received[start:])
    covered = any(a > expected for a in acks)
    delivered = len(kernel.data) - before
    ok = still_works(conn, kernel)
    outcome = "dropped" if not covered and not delivered else "accepted"
    return Observation(outcome, f"application read {delivered} bytes of it; DATA_ACKs after it "
                                f"{'moved past' if covered else 'stayed at'} the expected DSN; the connection "
                                f"{'still delivers' if ok else 'stopped delivering'} in-window data; "
                                f"{counters_text(lab.counters())}")


@case("data-fin-before-data", "3.3.3",
      """A DATA_FIN is acknowledged (DATA_ACK one past it) only once all data before it has
      been received; until then the application sees no end of stream.""",
      conforming={"DATA_FIN held until the data came"}, recorded="DATA_FIN held until the data came")
def data_fin_before_data(lab: Lab) -> Observation:
    """Bytes 100-199 with a DATA_FIN after them, then (on the same subflow) the missing bytes 0-99."""
    conn, kernel = established(lab)
    base, before = conn.snd_dsn, len(kernel.data)
    start = len(lab.peer.received)
    conn.send_data(b"2" * 100, dsn=base + 100, data_fin=True)
    lab.peer.settle(0.2)
    early = [a for a in data_acks(lab.peer.received[start:]) if a > base]
    eof_early = kernel.eof
    conn.send_data(b"1" * 100, dsn=base)
    kernel.wait(lambda k: k.eof, 1.0)
    done = lab.peer.expect(lambda s: base + 201 in data_acks([s]), 1.0, since=start)
    if early or eof_early:
        outcome = "DATA_FIN acknowledged early"
    elif done is not None and kernel.eof and len(kernel.data) - before == 200:
        outcome = "DATA_FIN held until the data came"
    else:
        outcome = "DATA_FIN never acknowledged"
    return Observation(outcome, f"before the gap was filled: DATA_ACK {'moved' if early else 'did not move'}, "
                                f"application end of stream {'seen' if eof_early else 'not seen'}; after: "
                                f"application read {len(kernel.data) - before} bytes, end of stream "
                                f"{'seen' if kernel.eof else 'not seen'}, DATA_FIN "
                                f"{'acknowledged' if done else 'not acknowledged'}")


# ---- connection-level signals ----------------------------------------------------------------
@case("fastclose-right-key", "3.5",
      """On an MP_FASTCLOSE carrying its key, the receiver answers with a RST on every
      subflow and tears the connection down; its application sees a reset.""",
      conforming={"RST, application reset"}, recorded="RST, application reset",
      counters={"MPTcpExtMPFastcloseRx": 1, "MPTcpExtMPRstTx": 1})
def fastclose_right_key(lab: Lab) -> Observation:
    """An ACK with MP_FASTCLOSE carrying the kernel's key."""
    conn, kernel = established(lab)
    start = len(lab.peer.received)
    conn.initial.send(ACK, [MpFastclose(conn.remote_key)])
    rst = lab.peer.expect(lambda s: bool(s.flags & RST), 1.0, since=start)
    reset = kernel.wait(lambda k: k.error is not None or k.eof, 1.0)
    outcome = ("RST" if rst else "no RST") + (", application reset" if kernel.error else
                                             ", application end of stream" if kernel.eof else
                                             ", application not told")
    return Observation(outcome, f"answered with {describe(rst)}; application "
                                f"{'got ' + str(kernel.error) if kernel.error else 'saw end of stream' if reset else 'saw nothing'}; "
                                f"{counters_text(lab.counters())}")


@case("fastclose-wrong-key", "3.5",
      """MP_FASTCLOSE carries the receiver's key so that only the real peer can close the
      connection this way; one with another key does not close it.""",
      conforming={"ignored"}, recorded="ignored",
      counters={"MPTcpExtMPFastcloseRx": 0})
def fastclose_wrong_key(lab: Lab) -> Observation:
    """An ACK with MP_FASTCLOSE carrying a key that is not the kernel's."""
    conn, kernel = established(lab)
    return ignored_or_not(lab, conn, kernel, [MpFastclose(conn.remote_key ^ 1)])


@case("add-addr-bad-hmac", "3.4.1",
      """An ADD_ADDR whose truncated HMAC does not verify is not acted upon: the address is
      not learnt and no echo is sent.""",
      conforming={"dropped"}, recorded="dropped",
      counters={"MPTcpExtAddAddr": 0, "MPTcpExtEchoAddTx": 0})
def add_addr_bad_hmac(lab: Lab) -> Observation:
    """An ADD_ADDR (id 5, 10.231.0.9) whose HMAC is wrong."""
    conn, kernel = established(lab)
    start = len(lab.peer.received)
    mac = add_addr_hmac(conn.local_key, conn.remote_key, 5, bytes([10, 231, 0, 9]), None) ^ 1
    conn.initial.send(ACK, [AddAddr(5, "10.231.0.9", hmac64=mac)])
    echo = lab.peer.expect(lambda s: (a := s.option(AddAddr)) is not None and a.echo, 0.5, since=start)
    announced = lab.pm_events("announced")
    outcome = "dropped" if echo is None and not announced else "accepted"
    return Observation(outcome, f"{'echoed' if echo else 'no echo'}; {len(announced)} 'announced' event(s); "
                                f"{counters_text(lab.counters())}")


@case("add-addr-echo", "3.4.1",
      """A valid ADD_ADDR (the rightmost 64 bits of HMAC-SHA256 keyed with the sender's then
      the receiver's key, over address id, address and port) is acknowledged by echoing it
      with the E flag set and no HMAC.""",
      conforming={"echoed"}, recorded="echoed",
      counters={"MPTcpExtAddAddr": 1, "MPTcpExtEchoAddTx": 1})
def add_addr_echo(lab: Lab) -> Observation:
    """An ADD_ADDR (id 5, 10.231.0.9) with the right HMAC."""
    conn, kernel = established(lab)
    start = len(lab.peer.received)
    mac = add_addr_hmac(conn.local_key, conn.remote_key, 5, bytes([10, 231, 0, 9]), None)
    conn.initial.send(ACK, [AddAddr(5, "10.231.0.9", hmac64=mac)])
    echo = lab.peer.expect(lambda s: (a := s.option(AddAddr)) is not None and a.echo, 1.0, since=start)
    event = lab.events.wait_for("announced", 0.5)
    opt = echo.option(AddAddr) if echo else None
    right = opt is not None and opt.addr_id == 5 and opt.addr == "10.231.0.9" and opt.hmac64 is None
    outcome = "echoed" if right else "echo differs" if opt else "no echo"
    echoed = f"echo of id {opt.addr_id}, {opt.addr}, {'no HMAC' if opt.hmac64 is None else 'with an HMAC'}" \
        if opt else "no echo"
    return Observation(outcome, f"{echoed}; event announced "
                                f"{'seen' if event else 'missing'}; {counters_text(lab.counters())}")


@case("remove-addr-unknown-id", "3.4.2, 3.8",
      """A REMOVE_ADDR for an address id the receiver never learnt is silently ignored.""",
      conforming={"ignored"}, recorded="ignored",
      counters={"MPTcpExtRmAddr": 1})
def remove_addr_unknown_id(lab: Lab) -> Observation:
    """A REMOVE_ADDR for address id 42, never announced."""
    conn, kernel = established(lab)
    obs = ignored_or_not(lab, conn, kernel, [RemoveAddr((42,))])
    return Observation(obs.outcome, f"{obs.detail}; {len(lab.pm_events('removed'))} 'removed' event(s)")


@case("experimental-subtype-mid-stream", "3",
      """Subtype 0xF is reserved for private use (experiments): a receiver that does not
      implement the experiment has nothing to act on, so the connection goes on unchanged.""",
      conforming={"ignored"}, recorded="ignored")
def experimental_subtype_mid_stream(lab: Lab) -> Observation:
    """An ACK carrying an MPTCP option of subtype 0xF (private use)."""
    conn, kernel = established(lab)
    return ignored_or_not(lab, conn, kernel, [UnknownMptcp(0xF, bytes([30, 4, 0xF0, 1]))])


@case("mp-prio-backup", "3.3.8",
      """MP_PRIO with B=1 asks the receiver to treat the subflow it arrives on as a backup
      path (used only when no regular subflow is available).""",
      conforming={"subflow marked backup"}, recorded="subflow marked backup",
      counters={"MPTcpExtMPPrioRx": 1})
def mp_prio_backup(lab: Lab) -> Observation:
    """MP_PRIO with the backup flag on the initial subflow."""
    conn, kernel = established(lab)
    conn.initial.send(ACK, [MpPrio(True)])
    event = lab.events.wait_for("sub_priority", 1.0)
    backup = event is not None and bool(event.attrs.get("backup"))
    outcome = "subflow marked backup" if backup else "no change seen"
    return Observation(outcome, f"event sub_priority {'with backup=1' if backup else 'seen' if event else 'missing'}; "
                                f"{counters_text(lab.counters())}")
