"""Per-subflow DSN offsets (testbed/stack/privacy.py): negotiated in the SYN,
both ends agree, data intact, the wire's data-sequence numbers no longer
reveal the connection's spaces, and a peer that does not echo gets plain
RFC 8684."""
from __future__ import annotations

import hashlib
import os

import pytest

from test_stack_engine import Wire, transfer
from test_stack_interop import pair  # noqa: F401 - the two-namespace fixture
from testbed.stack import crypto, privacy
from testbed.stack.connection import Connection
from testbed.stack.options import Dss


def test_both_ends_compute_the_same_offsets_and_each_subflow_and_space_differs():
    ka, kb = crypto.new_key(), crypto.new_key()
    client, server = privacy.DsnOffsets(ka, kb, active=True), privacy.DsnOffsets(kb, ka, active=False)
    c_mine, c_peer = client.offsets(True, 11, 22)
    s_mine, s_peer = server.offsets(True, 22, 11)   # the server's local nonce is R_server
    assert (c_mine, c_peer) == (s_peer, s_mine)
    assert c_mine != c_peer
    assert client.offsets(False, 11, 22) != (c_mine, c_peer)   # the initial subflow has its own
    assert client.offsets(True, 12, 22) != (c_mine, c_peer)


class OffsetWire(Wire):
    """Wire whose client (and, if told, server) ask for DSN offsets; the
    DSS options that cross it are kept."""

    def __init__(self, server_agrees: bool, checksum: bool = False):
        self.server_agrees = server_agrees
        self.seen: list[Dss] = []
        super().__init__(checksum=checksum)
        self.client.privacy_wanted = privacy.FLAG_DSN_OFFSET
        # the SYN went out in super().__init__() before the flag: send it again
        self.a.outbox.clear()
        self.client.subflows[0].send_syn()
        self.filter = self._keep

    def _keep(self, direction, seg):
        self.seen += [(direction, o) for o in seg.options if isinstance(o, Dss)]
        return seg

    def server_connection(self) -> Connection:
        """The passive connection, agreeing to DSN offsets if told to."""
        return Connection(self.b, active=False, checksum=False, obfuscate_dsn=self.server_agrees)


def _near(a: int, b: int, within: int = 1 << 32) -> bool:
    return min((a - b) % (1 << 64), (b - a) % (1 << 64)) < within


@pytest.mark.parametrize("checksum", [False, True])
def test_agreed_offsets_move_the_wire_numbers_and_keep_the_data(checksum):
    w = OffsetWire(server_agrees=True, checksum=checksum)
    data = os.urandom(200_000)
    assert transfer(w, data) == data
    assert w.client.dsn_offsets is not None and w.server.dsn_offsets is not None
    idsn_client = crypto.idsn_of(w.client.local_key)
    sent = [o.dsn for d, o in w.seen if d == "a->b" and o.dsn is not None]
    acks = [o.data_ack for d, o in w.seen if d == "b->a" and o.data_ack is not None]
    assert sent and acks
    assert not any(_near(x, idsn_client) for x in sent + acks)   # far from the real space
    assert max(sent) - min(sent) < 1 << 20                       # but one contiguous range


def test_a_server_that_does_not_echo_gets_plain_rfc8684():
    w = OffsetWire(server_agrees=False)
    data = os.urandom(50_000)
    assert transfer(w, data) == data
    assert w.client.dsn_offsets is None and w.server.dsn_offsets is None
    idsn_client = crypto.idsn_of(w.client.local_key)
    assert all(_near(o.dsn, idsn_client) for d, o in w.seen if d == "a->b" and o.dsn is not None)


# ---- against the kernel, and over two real paths --------------------------------
@pytest.mark.root
def test_kernel_server_ignores_the_request_and_the_transfer_is_plain(pair):
    from test_stack_interop import kernel_server
    from testbed.stack import Stack
    t, result = kernel_server(pair)
    data = os.urandom(1_000_000)
    with Stack(pair.a, obfuscate_dsn=True) as st:
        conn = st.connect(("10.0.0.2", 5000), timeout=5)
        conn.send(data, timeout=30)
        conn.close()
        answer = conn.recv(100, timeout=30)
        t.join(10)
        assert answer.decode() == hashlib.sha256(data).hexdigest(), result
        assert conn.dsn_offsets is None and not conn.info().fallback


@pytest.mark.root
def test_two_path_observers_cannot_link_by_dsn_when_offsets_are_agreed(pair, tmp_path):
    """User client and user server, two paths, a capture per path: with offsets
    the DSN attack finds no link; without, it links the two subflows."""
    from analysis.privacy import attack
    from test_stack_interop import A_ADDRS, serve_sha
    from testbed.harness.observers import dissect, observed_subflows
    from testbed.stack import Stack
    import threading
    import pandas as pd
    for obfuscate in (False, True):
        pcaps = [pair.capture(pair.a, "va0"), pair.capture(pair.a, "va1")]
        with Stack(pair.b, obfuscate_dsn=obfuscate) as srv, Stack(pair.a, obfuscate_dsn=obfuscate) as st:
            lst = srv.listen(5000)
            got = {}
            t = threading.Thread(target=lambda: got.update(r=serve_sha(lst.accept(timeout=10))))
            t.start()
            conn = st.connect(("10.0.0.2", 5000), paths=A_ADDRS, timeout=5)
            data = os.urandom(3_000_000)
            conn.send(data, timeout=30)
            conn.close()
            t.join(30)
            assert got["r"][1] == hashlib.sha256(data).hexdigest()
            assert (conn.dsn_offsets is not None) == obfuscate
            truth = {sf.local[1]: "0" for sf in conn.info().subflows + conn.info().closed_subflows}
        pair.stop_captures()
        packets = pd.concat([dissect(p, f) for p, f in zip(("p0", "p1"), pcaps)], ignore_index=True)
        obs = observed_subflows(packets, {5000})
        obs["connection"] = [truth.get(int(p)) for p in obs["cport"]]
        obs[["key_client", "key_server", "join_token"]] = None   # the observers missed the handshakes
        s = attack(obs, "p0", "p1")["dsn"]
        assert s.positives == 1
        assert (s.tp, s.fp) == ((0, 0) if obfuscate else (1, 0)), (obfuscate, s)


def test_rekey_needs_external_keys_agreed_in_the_handshake():
    from testbed.stack import StackError
    w = OffsetWire(server_agrees=True)
    transfer(w, b"x" * 1000)
    with pytest.raises(StackError, match="external keys were not agreed"):
        w.client.rekey(1, 2)


@pytest.mark.root
def test_keys_from_a_tls_exporter_hide_the_join_token_from_mp_capable_observers(pair):
    """User client and server agree to external keys, run TLS over the first
    subflow, rekey from the exporter, then join the second path: the join's
    token is the exporter key's, not one the MP_CAPABLE exchange showed, so
    the token attack finds nothing; the data arrives intact."""
    import threading
    import pandas as pd
    from analysis.privacy import attack
    from test_stack_interop import A_ADDRS, serve_sha
    from testbed.harness import tls_keys
    from testbed.harness.observers import dissect, observed_subflows
    from testbed.stack import Stack
    pcaps = [pair.capture(pair.a, "va0"), pair.capture(pair.a, "va1")]
    with Stack(pair.b, external_keys=True) as srv, Stack(pair.a, external_keys=True) as st:
        lst = srv.listen(5000)
        got = {}

        def serve():
            conn = lst.accept(timeout=10)
            tls_keys.secure(conn, server=True)
            got["r"] = serve_sha(conn)
        t = threading.Thread(target=serve)
        t.start()
        conn = st.connect(("10.0.0.2", 5000), paths=A_ADDRS[:1], timeout=5)
        wire_keys = (conn.local_key, conn.remote_key)
        tls_keys.secure(conn, server=False)
        assert (conn.local_key, conn.remote_key) != wire_keys
        conn.add_subflow(A_ADDRS[1], timeout=5)
        assert [s.join for s in conn.info().subflows] == [False, True]
        data = os.urandom(1_000_000)
        conn.send(data, timeout=30)
        conn.close()
        t.join(30)
        assert got["r"][1] == hashlib.sha256(data).hexdigest()
        truth = {sf.local[1]: "0" for sf in conn.info().subflows + conn.info().closed_subflows}
    pair.stop_captures()
    packets = pd.concat([dissect(p, f) for p, f in zip(("p0", "p1"), pcaps)], ignore_index=True)
    obs = observed_subflows(packets, {5000})
    obs["connection"] = [truth.get(int(p)) for p in obs["cport"]]
    join = obs[obs["kind"] == "join"].iloc[0]
    assert join["join_token"] == crypto.token_of(conn.remote_key)
    s = attack(obs, "p0", "p1")
    assert s["token"].positives == 1 and (s["token"].tp, s["token"].fp) == (0, 0)
    assert s["dsn"].tp == 1   # without offsets the DSN ranges still link them


def _observed_keys(pcap: str) -> tuple[int, int]:
    from testbed.harness.observers import dissect, from_i64, observed_subflows
    obs = observed_subflows(dissect("p0", pcap), {5000})
    cap = obs[obs["kind"] == "capable"].iloc[0]
    return from_i64(cap["key_client"]), from_i64(cap["key_server"])


@pytest.mark.root
@pytest.mark.parametrize("external_keys", [False, True], ids=["rfc8684", "exporter-keys"])
def test_join_hijack_by_an_on_path_observer(pair, external_keys):
    """An observer of the first path reads the keys of MP_CAPABLE and joins the
    victim's connection from its own address: accepted by a server whose keys
    went by in the clear, refused once the keys came from a TLS exporter."""
    import threading
    from testbed.harness import tls_keys
    from testbed.stack import Stack, StackError
    # the attacker: its own stack on va1 (10.0.1.1), the victim's stack only on va0
    pcap = pair.capture(pair.a, "va0")
    with Stack(pair.b, external_keys=external_keys) as srv, \
            Stack(pair.a, interfaces=["va0"], external_keys=external_keys) as victim:
        lst = srv.listen(5000)
        accepted = {}

        def serve():
            conn = lst.accept(timeout=10)
            if external_keys:
                tls_keys.secure(conn, server=True)
            accepted["conn"] = conn
        t = threading.Thread(target=serve)
        t.start()
        conn = victim.connect(("10.0.0.2", 5000), paths=["10.0.0.1"], timeout=5)
        if external_keys:
            tls_keys.secure(conn, server=False)
        conn.send(b"hello", timeout=5)
        t.join(10)
        pair.stop_captures()
        key_client, key_server = _observed_keys(pcap)
        assert key_client is not None and key_server is not None   # in the clear either way
        with Stack(pair.a, interfaces=["va1"]) as attacker:
            if external_keys:
                with pytest.raises(StackError, match="refused"):
                    privacy.join_with_keys(attacker, ("10.0.0.2", 5000), key_client, key_server, "10.0.1.1")
                assert len(accepted["conn"].info().subflows) == 1
            else:
                sf = privacy.join_with_keys(attacker, ("10.0.0.2", 5000), key_client, key_server, "10.0.1.1")
                assert sf.fully_established
                subs = accepted["conn"].info().subflows
                assert ("10.0.1.1", sf.lport) in [s.remote for s in subs]   # the server took it in
                sf.send_rst()
        conn.abort()
