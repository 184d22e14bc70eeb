"""Forged MP_JOIN_CAP on the wire: what an on-path attacker who sees the losing
path of a RobE_eSIM connection gains against the user-space stack's server.

    ./tb bench.esim-forgery [--attempts 5000] [--variants random-tag,right-hint,replay,unknown-key]

On a two-path testbed (wifi 2 x 2 ms default, lte 2 x 4 ms; user-space
emulation) a user-stack client connects with RobE_eSIM to a user-stack server
(Stack(esim=True)); its losing attempt becomes a subflow through MP_JOIN_CAP.
tcpdump in the client namespace records that; the attacker learns only what the
losing path carried (decoded by analysis.esim_wire): the winner's Key-A, the
address ID, the tag (whose low 10 bits are the CRC hint of the unseen Key-B)
and that attempt's server key Key-B'.

The attacker is a scripted peer on the losing path's client address (source
ports outside the stack's range, so the victim's stack leaves them alone). Each
forged attempt is a half-open connection of its own: SYN with MP_CAPABLE and
ROBE_eSIM_EN, the server's SYN/ACK (a new Key-B''), then the final ACK with an
MP_JOIN_CAP naming the victim. Variants of that MP_JOIN_CAP:

    random-tag    the victim's Key-A, 64 random tag bits
    right-hint    the victim's Key-A, the observed hint in the low 10 bits, 54 random bits
    replay        the victim's Key-A and the observed tag verbatim (bound to another Key-B')
    unknown-key   a random Key-A (names no connection), a random tag

Counted per variant: SYN/ACKs, the server's verdicts (Stack.esim_checks: where
each check ended), subflows the victim gained, and on the wire (a second
tcpdump on the losing path's interface, tshark's raw option bytes decoded by
the stack's codec) the server's answers: RST with MP_TCPRST reason 1 expected
for every forged attempt. Against what the math predicts: hint passes ~
Binomial(N, 2^-10) for random tags (N for right-hint and replay, 0 for an
unknown key), an accepted forgery with probability <= N x 2^-54. Afterwards
the victim connection must keep its two subflows and still carry data.
A measurement whose capture lost packets, or whose victim did not get its eSIM
subflow, is invalid with the reason.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.esim_security import FORGERY_FILE, VARIANTS, forgery_table, render_table
from analysis.esim_wire import esim_segments
from experiments.robe_trial import tb_paths
from testbed.base.errors import TestbedError
from testbed.core.model import HostSettings
from testbed.core.net import Testbed
from testbed.core.topology import load
from testbed.harness.probes.pcap import packets_in, stop_tcpdumps, tcpdump_ready
from testbed.robe import Options, UserStackBackend, connect
from testbed.stack import Stack, StackError, esim, privacy
from testbed.stack.options import CAP_H_SHA256, MpCapable, MpTcpRst
from testbed.stack.packet import ACK, RST, SYN
from testbed.stack.scripted import ScriptedPeer, ScriptedSubflow

PORT = 5740
ATTACKER_PORTS = (45000, 49999)   # outside the stack's client range (61000-65535)
BATCH = 32                        # half-open attempts in flight at once (the listener's backlog is 64)
ANSWER_TIMEOUT_S = 1.0
VICTIM_TRIES = 2                  # the eSIM subflow needs the win processed before the loser's SYN/ACK (8 ms here)


@dataclass(frozen=True)
class Observed:
    """What the losing path showed an observer of the victim's establishment."""
    loser_addr: str
    loser_iface: str
    addr_id: int
    key_a: int
    tag: int
    loser_key_b: int     # the losing attempt's server key (its SYN/ACK's MP_CAPABLE)


def _tcpdump(tb: Any, iface: str, pcap: Path, bpf: str) -> subprocess.Popen:
    proc = tb.popen(tb.client, ["tcpdump", "-i", iface, "-n", "-U", "--immediate-mode", "-Z", "root",
                                "-w", str(pcap), bpf], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    said: list[str] = []
    if not tcpdump_ready(proc, pcap, time.monotonic() + 5, said):
        stop_tcpdumps([proc])
        raise TestbedError(f"tcpdump on {iface} was not capturing after 5 s (said: {' | '.join(said)[-200:]})")
    return proc


def observe_losing_path(pcap: Path, addrs: dict[str, tuple[str, str]]) -> Observed:
    """The losing path's MP_JOIN_CAP and its attempt's server key, from the capture alone
    (addrs: client address -> (path name, interface)); TestbedError when there is none."""
    seg = esim_segments(str(pcap))
    caps = seg[seg.join_cap_key_a.notna()] if len(seg) else seg
    if not len(caps):
        raise TestbedError("the victim's establishment carried no MP_JOIN_CAP: nothing for the attacker to see")
    cap = caps.iloc[0]
    synack = seg[(seg.src == cap.dst) & (seg.dst == cap.src) & (seg.dport == cap.sport) & seg.syn & seg.ack
                 & seg.mpc_sender_key.notna()]
    if not len(synack):
        raise TestbedError(f"no SYN/ACK with MP_CAPABLE for the losing attempt from {cap.src}:{cap.sport}")
    as_u64 = lambda v: int(v) & 0xFFFFFFFFFFFFFFFF  # noqa: E731 - pandas may hold them as signed
    return Observed(cap.src, addrs[cap.src][1], int(cap.join_cap_addr_id), as_u64(cap.join_cap_key_a),
                    as_u64(cap.join_cap_tag), as_u64(synack.mpc_sender_key.iloc[0]))


def forged_tag(variant: str, seen: Observed) -> tuple[int, int]:
    """(Key-A, tag) of one forged MP_JOIN_CAP of this variant."""
    rand = int.from_bytes(secrets.token_bytes(8), "big")
    mask = (1 << esim.CRC_BITS) - 1
    if variant == "random-tag":
        return seen.key_a, rand
    if variant == "right-hint":
        return seen.key_a, (rand & ~mask) | (seen.tag & mask)
    if variant == "replay":
        return seen.key_a, seen.tag
    if variant == "unknown-key":
        return int.from_bytes(secrets.token_bytes(8), "big"), rand
    raise TestbedError(f"variant: {variant!r} is not one of {', '.join(VARIANTS)}")


def _attack_batch(peer: ScriptedPeer, variant: str, seen: Observed, n: int, tally: dict[str, int]) -> None:
    """n forged half-open attempts at once: SYNs, then each SYN/ACK answered with MP_JOIN_CAP."""
    start = len(peer.received)
    subflows: list[ScriptedSubflow] = [peer.subflow(PORT) for _ in range(n)]
    syn_opts = [MpCapable(CAP_H_SHA256), privacy.request_option(esim.FLAG_ESIM)]
    for sf in subflows:
        sf.syn(syn_opts)
    answered = []
    for sf in subflows:
        ans = sf.synack(ANSWER_TIMEOUT_S, since=start)
        if ans is None or not ans.flags & SYN or ans.option(MpCapable) is None:
            tally["no_synack"] += 1
            continue
        if not esim.esim_enabled(privacy.requested(ans.options)):
            tally["no_echo"] += 1
        key_a, tag = forged_tag(variant, seen)
        sf.send(ACK, [esim.join_cap_option(seen.addr_id, key_a, tag)])
        answered.append(sf)
    tally["synacks"] += len(answered)
    for sf in answered:
        ans = sf.expect(lambda s: not s.flags & SYN, ANSWER_TIMEOUT_S, since=start)
        rst = ans.option(MpTcpRst) if ans is not None and ans.flags & RST else None
        if rst is not None and rst.reason == 1:
            tally["rst_mptcprst_peer"] += 1
        elif ans is not None and not ans.flags & RST:
            tally["acked_peer"] += 1   # the server's ACK: taken as a subflow
        else:
            tally["other_answer"] += 1


def run_forgery(attempts: int = 5000, variants: tuple[str, ...] = VARIANTS,
                out: str | Path | None = None) -> dict[str, Any]:
    """The whole measurement (root): the victim's eSIM connection, then `attempts`
    forgeries per variant from the losing path; a JSON-ready document (written to
    out/esim-forgery.json when out is given: in a results directory, the report shows it)."""
    for v in variants:
        if v not in VARIANTS:
            raise TestbedError(f"variants: {v!r} is not one of {', '.join(VARIANTS)}")
    most = ATTACKER_PORTS[1] - ATTACKER_PORTS[0] + 1
    if not 1 <= attempts <= most:
        raise TestbedError(f"attempts: {attempts} is outside 1-{most} (one source port per attempt of a variant)")
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="mptb-esim-forgery-"))
    os.chmod(work, 0o777)
    doc: dict[str, Any] = {"attempts_per_variant": attempts, "crypto": esim.DEFAULT_CRYPTO.describe(),
                           "topology": "two-path, wifi 2 x 2 ms (default), lte 2 x 4 ms", "variants": {}}
    try:
        with Testbed(load("two-path", wifi_delay_ms=2, lte_delay_ms=4), backend="userspace",
                     client=HostSettings(path_manager="userspace")) as tb, \
                Stack(netns=tb.server.pid, esim=True) as server, Stack(netns=tb.client.pid) as client:
            lst = server.listen(PORT, backlog=64)
            addrs = {p.addr.client: (p.name, p.client_if) for p in tb.paths}
            # 1. the victim: RobE_eSIM from both paths, recorded in the client namespace
            cap1 = work / "victim.pcap"
            for attempt in range(VICTIM_TRIES):
                accepted_before = server.esim_checks[esim.OK]
                cap1.unlink(missing_ok=True)
                dump = _tcpdump(tb, "any", cap1, f"tcp port {PORT}")
                try:
                    conn, rep = tb.in_ns(tb.client, lambda: connect(
                        (tb.server_addr, PORT), "esim", tb_paths(tb), 5.0,
                        options=Options(join_timeout_s=2.0), backend=UserStackBackend(client)))
                    rep.wait_joins(3.0)
                    victim = lst.accept(5.0)
                    time.sleep(0.1)
                finally:
                    stop_tcpdumps([dump])
                if server.esim_checks[esim.OK] - accepted_before == 1 and len(victim.subflows) == 2:
                    break
                # the loser's SYN/ACK came before the win was processed: it joined as SIM does
                conn.abort()
                if attempt == VICTIM_TRIES - 1:
                    raise TestbedError(f"the victim got no eSIM subflow in {VICTIM_TRIES} establishments "
                                       f"(server checks {dict(server.esim_checks)}, {len(victim.subflows)} "
                                       "subflow(s)): nothing to attack")
            doc["victim_establishments"] = attempt + 1
            seen = observe_losing_path(cap1, addrs)
            doc["observed"] = {"loser_path": addrs[seen.loser_addr][0], "addr_id": seen.addr_id,
                               "key_a": f"{seen.key_a:016x}", "tag": f"{seen.tag:016x}",
                               "hint": seen.tag & ((1 << esim.CRC_BITS) - 1)}
            # 2. the attacker, on the losing path's address; each variant captured on its interface
            with ScriptedPeer(tb.client.pid, seen.loser_addr, tb.server_addr, ports=ATTACKER_PORTS) as peer:
                for variant in variants:
                    doc["variants"][variant] = _attack(tb, peer, server, victim, variant, seen, attempts,
                                                       work / f"{variant}.pcap")
            # 3. the victim still carries data
            doc["victim_after"] = _victim_still_works(conn, victim)
            bad = [f"{v}: {d['invalid']}" for v, d in doc["variants"].items() if d.get("invalid")]
            if bad:
                doc["invalid"] = "; ".join(bad)
    finally:
        for f in work.glob("*"):
            f.unlink()
        work.rmdir()
    doc["seconds"] = round(time.monotonic() - t0, 1)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / FORGERY_FILE).write_text(json.dumps(doc, indent=2))
    return doc


def _attack(tb: Any, peer: ScriptedPeer, server: Stack, victim: Any, variant: str, seen: Observed,
            attempts: int, pcap: Path) -> dict[str, Any]:
    """`attempts` forgeries of one variant in batches, captured on the losing path's interface;
    what the attacker saw, the server's verdicts, the victim's subflows and the wire's counts."""
    before = dict(server.esim_checks)
    subflows_before = len(victim.subflows)
    tally = {k: 0 for k in ("no_synack", "no_echo", "synacks", "rst_mptcprst_peer", "acked_peer", "other_answer")}
    wire_before = len(peer.wire)
    t0 = time.monotonic()
    dump = _tcpdump(tb, seen.loser_iface, pcap, f"tcp portrange {ATTACKER_PORTS[0]}-{ATTACKER_PORTS[1]}")
    try:
        for done in range(0, attempts, BATCH):
            _attack_batch(peer, variant, seen, min(BATCH, attempts - done), tally)
        peer.settle(0.05)   # late answers into the capture before it stops
    finally:
        stop_tcpdumps([dump])
    out: dict[str, Any] = {
        "attempts": attempts, **tally,
        "server": {k: server.esim_checks[k] - before.get(k, 0)
                   for k in (esim.NO_CONNECTION, esim.HINT, esim.HMAC, esim.OK)},
        "victim_subflows_gained": len(victim.subflows) - subflows_before,
        "seconds": round(time.monotonic() - t0, 2)}
    seen_by_peer, captured = len(peer.wire) - wire_before, packets_in(pcap)
    out["capture"] = {"attacker_packets": seen_by_peer, "captured": captured}
    if captured < seen_by_peer:
        out["invalid"] = (f"the capture on {seen.loser_iface} holds {captured} packets, "
                          f"the attacker sent and received {seen_by_peer}")
    out["wire"] = _wire_counts(pcap, seen.loser_addr, tb.server_addr)
    return out


def _victim_still_works(conn: Any, victim: Any) -> dict[str, Any]:
    """Send 20 kB from the victim's client and read them at the server: the attack must not have hurt it."""
    payload = secrets.token_bytes(20000)
    conn.send(payload)
    got = b""
    deadline = time.monotonic() + 5
    while len(got) < len(payload) and time.monotonic() < deadline:
        try:
            chunk = victim.recv(65536, timeout=max(0.05, deadline - time.monotonic()))
        except StackError:
            break   # a reset, or nothing more within the 5 s
        if not chunk:
            break
        got += chunk
    return {"bytes_sent": len(payload), "bytes_intact": got == payload, "subflows": len(victim.subflows)}


def _wire_counts(pcap: Path, attacker: str, server: str) -> dict[str, dict[str, int]]:
    """Per attacker port: MP_JOIN_CAPs it sent and the server's RSTs with MP_TCPRST reason 1 (from tshark)."""
    seg = esim_segments(str(pcap))
    if not len(seg):
        return {"join_caps_sent": 0, "rst_mptcprst": 0, "server_acks_after_join_cap": 0}
    sent = seg[(seg.src == attacker) & seg.join_cap_key_a.notna()]
    answers = seg[(seg.src == server) & ~seg.syn]
    rst = answers[answers.rst & (answers.mptcp_rst_reason == 1)]
    acked = answers[~answers.rst & answers.dport.isin(sent.sport)]
    return {"join_caps_sent": int(sent.sport.nunique()), "rst_mptcprst": int(rst.dport.nunique()),
            "server_acks_after_join_cap": int(acked.dport.nunique())}


def format_report(doc: dict[str, Any]) -> tuple[str, bool]:
    """The measured table against the predictions, and whether every bound held."""
    table = forgery_table(doc)
    ok = bool(table.holds.all()) and not doc.get("invalid") and doc["victim_after"]["bytes_intact"]
    lines = [render_table(table), "",
             f"victim after the attack: {doc['victim_after']['subflows']} subflows, "
             f"{doc['victim_after']['bytes_sent']} bytes {'intact' if doc['victim_after']['bytes_intact'] else 'NOT intact'}",
             f"captures: {sum(v['capture']['captured'] for v in doc['variants'].values())} packets of the "
             f"attacker's {sum(v['capture']['attacker_packets'] for v in doc['variants'].values())}"
             + (f"; INVALID: {doc['invalid']}" if doc.get("invalid") else ""),
             f"{doc['seconds']} s in all", "ok" if ok else "a bound was missed"]
    return "\n".join(lines), ok
