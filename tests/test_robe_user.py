"""RobE over the user-space stack: every strategy's one implementation driving
testbed.stack attempts (testbed.robe.backends.UserStackBackend), against the
kernel MPTCP server and the stack's own. Root; one testbed per test."""
from __future__ import annotations

import pytest

from experiments.establishment import Params
from experiments.robe_trial import run_establishment_trial
from testbed.core.events import EventSpec
from testbed.core.model import HostSettings
from testbed.core.net import Testbed
from testbed.core.topology import load
from testbed.robe import STRATEGIES
from testbed.robe import strategies as strategies_module

pytestmark = pytest.mark.root


def two_path_tb() -> Testbed:
    # wifi (default route) 2x10 ms, lte 2x20 ms: the default path is the faster one.
    return Testbed(load("two-path", wifi_delay_ms=10, lte_delay_ms=20), backend="userspace",
                   client=HostSettings(path_manager="userspace"))


def test_every_strategy_runs_over_the_user_stack_against_kernel_and_user_servers():
    user = {"client_stack": "user", "timeout_s": 5, "timer": "0.3", "join_timeout_s": 2}
    with two_path_tb() as tb:
        for server, port in (("kernel", 5710), ("user", 5711)):
            for name in STRATEGIES:
                m = run_establishment_trial(tb, name, user | {"server_stack": server, "port": port})
                want = "tcp" if name == "tcp" else "mptcp"
                assert (m["outcome"], m["data_ok"], m["error"]) == (want, True, None), (server, name, m)
                assert m["winner_path"] == "wifi" and 0.019 <= m["setup_s"] < 0.030, (server, name, m)
                if name != "tcp":  # the losing or untried path joins the won connection
                    assert m["joined_paths"] == "lte" and m["multipath_s"] > m["setup_s"], (server, name, m)
        # A blackholed default path: SIM wins on LTE at once, TIMER after its timer.
        tb.apply_event(EventSpec(at_s=0, action="blackhole", path="wifi"))
        sim = run_establishment_trial(tb, "sim", user | {"port": 5710})
        assert sim["winner_path"] == "lte" and 0.039 <= sim["setup_s"] < 0.052 and sim["data_ok"], sim
        assert sim["syns_sent"] >= 2 and sim["extra_handshakes"] == 0, sim
        timer = run_establishment_trial(tb, "timer", user | {"port": 5710})
        assert timer["winner_path"] == "lte" and 0.33 <= timer["setup_s"] < 0.36 and timer["data_ok"], timer


def test_strategies_have_one_implementation_for_both_backends():
    # The strategies module opens nothing itself: every attempt goes through a Backend.
    src = open(strategies_module.__file__).read()
    assert "socket.socket(" not in src and "sockopt" not in src and "import socket" not in src


def test_establishment_params_take_the_stacks_and_refuse_others():
    p = Params.model_validate({"strategy": "sim", "client_stack": "user", "server_stack": "user"})
    assert (p.client_stack, p.server_stack) == ("user", "user")
    with pytest.raises(ValueError, match="client_stack"):
        Params.model_validate({"strategy": "sim", "client_stack": "dpdk"})


def test_esim_needs_a_user_stack_client_at_load():
    with pytest.raises(ValueError, match="esim.*client_stack 'user'"):
        Params.model_validate({"strategy": "esim"})


def test_esim_losing_attempt_becomes_a_subflow_and_falls_back_to_sim_against_the_kernel():
    user = {"client_stack": "user", "timeout_s": 5, "join_timeout_s": 2}
    with two_path_tb() as tb:
        esim = run_establishment_trial(tb, "esim", user | {"server_stack": "user", "port": 5720})
        sim = run_establishment_trial(tb, "sim", user | {"server_stack": "user", "port": 5720})
        assert esim["data_ok"] and esim["winner_path"] == "wifi" and esim["joined_paths"] == "lte", esim
        assert esim["esim_subflows"] == 1 and not esim["esim_fallback"] and esim["rsts_sent"] == 0, esim
        # lte's MP_CAPABLE handshake (40 ms) + the server's ACK of MP_JOIN_CAP (40 ms), vs
        # SIM's wifi handshake + MP_JOIN on lte after the reset.
        assert esim["multipath_s"] < 0.095 and esim["multipath_s"] < sim["multipath_s"], (esim, sim)
        kernel = run_establishment_trial(tb, "esim", user | {"server_stack": "kernel", "port": 5721})
        assert kernel["esim_fallback"] and kernel["esim_subflows"] == 0, kernel
        # Exactly SIM: the loser was reset (still in SYN_SENT here: nothing on the wire then; its late
        # SYN/ACK gets the stack's RST for an unknown connection) and lte joined with MP_JOIN.
        assert kernel["joined_paths"] == "lte" and kernel["data_ok"], kernel


def test_wire_esim_loser_carries_join_cap_with_the_winners_key_and_is_never_reset():
    """tcpdump in the client namespace, tshark's raw option bytes decoded by the stack's codec."""
    import os
    import signal
    import subprocess
    import tempfile
    import time
    from analysis.esim_wire import esim_segments
    pcap = tempfile.NamedTemporaryFile(suffix=".pcap", delete=False).name
    os.chmod(pcap, 0o666)
    with two_path_tb() as tb:
        addr = {p.name: p.addr.client for p in tb.paths}
        proc = tb.popen(tb.client, ["tcpdump", "-i", "any", "-n", "-U", "--immediate-mode", "-Z", "root",
                                    "-w", pcap, "tcp"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert any("listening" in proc.stderr.readline() for _ in range(2))
        m = run_establishment_trial(tb, "esim", {"client_stack": "user", "server_stack": "user", "port": 5730,
                                                 "timeout_s": 5, "join_timeout_s": 2})
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    assert m["esim_subflows"] == 1, m
    seg = esim_segments(pcap)
    os.unlink(pcap)
    # the winner's final ACK on wifi: MP_CAPABLE with both keys; its Key-A is the client's
    final = seg[(seg.src == addr["wifi"]) & ~seg.syn & seg.ack & seg.mpc_receiver_key.notna()]
    key_a = final.mpc_sender_key.iloc[0]
    assert seg[(seg.src == addr["wifi"]) & seg.syn].esim_en.all()       # ROBE_eSIM_EN in the SYNs
    caps = seg[(seg.src == addr["lte"]) & seg.join_cap_key_a.notna()]
    assert len(caps) and (caps.join_cap_key_a == key_a).all(), caps
    loser = seg[(seg.src == addr["lte"]) & (seg.sport == caps.sport.iloc[0])]
    # never reset as a loser: a RST on it may only come with the connection's teardown (after the first FIN)
    first_fin = seg[seg.fin].t.min()
    assert loser.syn.any() and (loser[loser.rst].t >= first_fin).all(), (loser, first_fin)
