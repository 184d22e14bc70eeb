"""The inactivity-time option (ITO) on the user-space stack without namespaces: the
codec, the local policy's bounds, and the exchange between two connections wired
back to back in memory (values adopted within bounds, at most three sends)."""
from __future__ import annotations

import pytest

from testbed.stack import Stack, StackError, inactivity
from testbed.stack.inactivity import InactivityTime
from testbed.stack.options import KIND, UnknownMptcp, decode_mptcp, encode_mptcp
from tests.test_stack_engine import Wire


def test_round_trip_and_wire_bytes():
    for timer in (0, 1, 4, 7440, 65535):
        raw = encode_mptcp(InactivityTime(timer))
        assert raw == bytes([KIND, 5, 0xF2, timer >> 8, timer & 0xFF])
        assert decode_mptcp(raw) == InactivityTime(timer)


@pytest.mark.parametrize("raw", [
    bytes([KIND, 4, 0xF2, 0]),               # too short for the timer
    bytes([KIND, 6, 0xF2, 0, 4, 0]),         # one byte too many
    bytes([KIND, 5, 0xF2, 0]),               # length says 5, 4 bytes there
])
def test_malformed_lengths_stay_unknown(raw):
    assert isinstance(decode_mptcp(raw), UnknownMptcp)


def test_other_private_use_nibbles_are_not_ito():
    assert not isinstance(decode_mptcp(bytes([KIND, 5, 0xF0, 0, 4])), InactivityTime)


def test_timer_out_of_range_is_refused():
    with pytest.raises(ValueError, match="0..65535"):
        InactivityTime(65536)


@pytest.mark.parametrize("kwargs, message", [
    ({"inactivity_s": 70000}, "inactivity_s: 70000 is not an integer in 0..65535"),
    ({"inactivity_s": -1}, "inactivity_s: -1"),
    ({"inactivity_s": 4, "inactivity_bounds_s": (10, 5)}, "inactivity_bounds_s: low 10 is above high 5"),
    ({"inactivity_s": 4, "inactivity_bounds_s": (0, 99999)}, "inactivity_bounds_s: 99999"),
])
def test_stack_refuses_a_bad_policy_before_attaching(kwargs, message):
    with pytest.raises(StackError, match=message):
        Stack(netns="/nonexistent", **kwargs)


class ItoWire(Wire):
    """The in-memory wire with ITO values on each side."""

    def __init__(self, client: tuple[int | None, tuple[int, int]], server: tuple[int | None, tuple[int, int]]):
        self.policies = client, server
        import threading
        from tests.test_stack_engine import MemoryStack
        lock = threading.RLock()
        a, b = MemoryStack("10.0.0.1", lock), MemoryStack("10.0.0.2", lock)
        for st, (timer, bounds) in ((a, client), (b, server)):
            st.inactivity_s, st.inactivity_bounds_s = timer, bounds
        self._stacks = a, b
        super().__init__()

    def __setattr__(self, name, value):
        # Wire.__init__ makes its own MemoryStacks: swap in ours (with the ITO policy) first
        if name in ("a", "b") and hasattr(self, "_stacks"):
            value = self._stacks[0 if name == "a" else 1]
            value.lock = self.lock
        object.__setattr__(self, name, value)

    def server_connection(self):
        from testbed.stack.connection import Connection
        return Connection(self.b, active=False, checksum=False)


def _sent_itos(stack) -> list[int]:
    from testbed.stack.packet import decode_ipv4
    return [o.timer_s for _sf, raw in stack.sent_log for o in decode_ipv4(raw).tcp.options
            if isinstance(o, InactivityTime)]


def test_each_side_adopts_the_peers_value_within_its_bounds():
    wire = ItoWire(client=(4, (0, 65535)), server=(600, (2, 6)))
    for st in (wire.a, wire.b):
        st.sent_log = []
        orig = st.transmit
        st.transmit = lambda sf, seg, st=st, orig=orig: (orig(sf, seg), st.sent_log.append(st.outbox[-1]))
    wire.pump(until=lambda: wire.server is not None and wire.server.state == "ESTABLISHED")
    wire.pump()
    with wire.lock:
        wire.client.tx += b"x" * 5000
        wire.client.push()
    wire.pump()
    client, server = wire.client.info().inactivity, wire.server.info().inactivity
    assert (client.local_s, client.peer_s, client.adopted_s) == (4, 600, 600)
    assert (server.local_s, server.peer_s, server.adopted_s) == (600, 4, 4)   # 4 is inside 2..6
    # the client's value rode on the MP_CAPABLE ACK and answered the server's first one once;
    # the server's own (due on its first segment) was its answer too: nothing more after that
    assert _sent_itos(wire.a) == [4, 4] and _sent_itos(wire.b) == [600]


def test_the_peers_value_is_clamped_and_a_stack_without_ito_ignores_it():
    wire = ItoWire(client=(7440, (0, 65535)), server=(30, (0, 60)))
    wire.pump(until=lambda: wire.server is not None and wire.server.state == "ESTABLISHED")
    wire.pump()
    assert wire.server.info().inactivity.adopted_s == 60
    plain = ItoWire(client=(7440, (0, 65535)), server=(None, (0, 65535)))
    plain.pump(until=lambda: plain.server is not None and plain.server.state == "ESTABLISHED")
    plain.pump()
    assert plain.server.info().inactivity is None
    info = plain.client.info().inactivity
    assert info.peer_s is None and info.adopted_s == 7440 and 1 <= info.sends <= inactivity.MAX_SENDS
