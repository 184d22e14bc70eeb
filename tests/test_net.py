"""Integration: real namespaces, real kernel MPTCP, real traffic."""
from __future__ import annotations

import socket

import pytest

from conftest import assert_connectivity
from testbed.core.bulk import bulk_transfer
from testbed.core.net import Testbed
from testbed.core.topology import load

pytestmark = pytest.mark.root


def no_delay_two_path(**kw):
    return load("two-path", wifi_delay_ms=0, lte_delay_ms=0, **kw)


def test_two_path_comes_up_with_policy_routing_and_endpoints():
    with Testbed(no_delay_two_path(), backend="bridge") as tb:
        assert_connectivity(tb)
        desc = tb.describe()
        client = desc["hosts"]["client"]
        assert client["sysctls"]["net.mptcp.blackhole_timeout"] == "0"
        assert client["subflows"] >= 1 and client["add_addr_accepted"] >= 1
        assert [e["addr"] for e in client["endpoints"]] == ["10.2.0.1"]
        assert client["endpoints"][0]["flags"] == ["subflow"]


def test_join_source_address_leaves_by_its_own_path():
    """Without policy routing a join SYN from the LTE address would take WiFi."""
    with Testbed(no_delay_two_path(), backend="bridge") as tb:
        before = tb.interface_bytes()
        tb.client.cmd(f"ping -n -q -c 20 -i 0.01 -I {tb.path('lte').addr.client} {tb.server_addr}")
        after = tb.interface_bytes()
        lte = after["lte"]["tx_packets"] - before["lte"]["tx_packets"]
        wifi = after["wifi"]["tx_packets"] - before["wifi"]["tx_packets"]
        assert lte >= 20 and wifi < 5


def test_mptcp_uses_every_path_and_aggregates():
    """2 x 20 Mbit: one MPTCP connection reaches >= 0.9 x 40 Mbit (simult_flows bound)
    with a subflow per path, each carrying data."""
    with Testbed(no_delay_two_path(rate_mbit=20), backend="bridge") as tb:
        r = bulk_transfer(tb, seconds=7, warmup=2.5)
    assert r.subflows == 1, "expected one extra subflow (one per path)"
    for name, mbit in r.path_goodput_mbit.items():
        assert mbit > 15, f"path {name} carried only {mbit:.1f} Mbit/s"
    assert r.goodput_mbit >= 0.9 * 40, f"aggregate {r.goodput_mbit:.1f} Mbit/s < 36"


def test_four_paths_get_four_subflows():
    with Testbed(load("n-path", n=4, delay_ms=0, rate_mbit=10), backend="bridge") as tb:
        r = bulk_transfer(tb, seconds=4, warmup=1.5)
    assert r.subflows == 3
    assert all(m > 5 for m in r.path_goodput_mbit.values()), r.path_goodput_mbit


def test_multihomed_server_and_backup_path():
    topo = load("wifi-lte-multihomed")
    spec = topo.model_dump()
    for p in spec["paths"]:
        p["delay_ms"] = 0
    spec["paths"][1]["backup"] = True
    from testbed.core.topology import from_dict
    with Testbed(from_dict(spec), backend="bridge") as tb:
        assert tb.server_addr == "10.1.0.2"
        assert_connectivity_multihomed(tb)
        eps = tb.describe()["hosts"]["client"]["endpoints"]
        assert eps[0]["flags"] == ["subflow", "backup"]


def assert_connectivity_multihomed(tb):
    for p in tb.paths:
        out = tb.client.cmd(f"ping -n -q -c 1 -W 2 -I {p.addr.client} {p.addr.far}")
        assert "1 received" in out, p.name


def test_plain_tcp_stays_on_one_path():
    with Testbed(no_delay_two_path(rate_mbit=20), backend="bridge") as tb:
        r = bulk_transfer(tb, seconds=4, warmup=1.5, protocol="tcp")
    assert r.subflows == 0 and r.path_goodput_mbit["lte"] < 1
    assert 15 < r.goodput_mbit <= 20.5


def test_mptcp_socket_created_in_client_namespace():
    with Testbed(no_delay_two_path(), backend="bridge") as tb:
        s = tb.in_ns(tb.client, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM,
                                                      socket.IPPROTO_MPTCP))
        s.settimeout(2)
        # Nothing listens: the server's kernel answers with a RST, proving the SYN
        # was routed there (a timeout or unreachable would be another errno).
        with pytest.raises(ConnectionRefusedError):
            s.connect((tb.server_addr, 9))
        s.close()


def test_shell_task_opens_mininet_cli_on_the_topology():
    from conftest import run_tb
    script = "c ping -c1 -W2 10.100.0.2\npy sorted(n.name for n in net.hosts)\nexit\n"
    res = run_tb("shell", "--set", "wifi_delay_ms=1", input=script, timeout=60)
    assert res.returncode == 0, res.stderr
    out = res.stdout + res.stderr  # the CLI prints command output to stderr
    assert "1 received" in out
    assert "['c', 'r', 's', 'x1', 'x2']" in out


def test_server_signals_its_second_address_and_the_client_joins_it():
    """Multihomed server announcing (ADD_ADDR) its LTE address; the client has no
    endpoint of its own there, so the only way to a second subflow is the signal."""
    from testbed.core.topology import from_dict
    spec = load("wifi-lte-multihomed").model_dump()
    for p in spec["paths"]:
        p["delay_ms"] = 0
    spec["paths"][1]["client_endpoint"] = []
    spec["paths"][1]["server_endpoint"] = ["signal"]
    with Testbed(from_dict(spec), backend="bridge") as tb:
        server_eps = tb.describe()["hosts"]["server"]["endpoints"]
        assert [(e["addr"], e["flags"]) for e in server_eps] == [("10.2.0.2", ["signal"])]
        r = bulk_transfer(tb, seconds=4, warmup=1.5)
    assert r.subflows == 1 and r.path_goodput_mbit["lte"] > 5


def test_offloads_are_off_on_every_end_of_every_emulated_link():
    from testbed.core.emulation.offloads import offload_state

    with Testbed(no_delay_two_path(), backend="bridge") as tb:
        far = tb.router or tb.server
        for p in tb.paths:
            for ns, ifname in ((tb.client.pid, p.client_if), (far.pid, p.far_if),
                               (p.link.pid, p.link.port_a), (p.link.pid, p.link.port_b)):
                assert set(offload_state(ns, ifname).values()) == {"off"}, (p.name, ifname)
