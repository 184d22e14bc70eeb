"""General topologies: the graph model, its derived addresses and routes, the
refusals at load, and built graphs carrying traffic the way routing says."""
from __future__ import annotations

import re

import pytest

from conftest import IS_ROOT, assert_one_line_error, ping_ok, run_tb
from testbed.base.errors import TestbedError
from testbed.core.bulk import bulk_transfer
from testbed.core.topology import from_dict, load


def ring(costs: bool) -> dict:
    """c -> r1 -> {r2, r3} -> r4 -> s: two equally long ways unless costs differ."""
    links = [{"name": "acc", "a": "c", "b": "r1"},
             {"name": "top", "a": "r1", "b": "r2"}, {"name": "bot", "a": "r1", "b": "r3"},
             {"name": "top2", "a": "r2", "b": "r4"},
             {"name": "bot2", "a": "r3", "b": "r4", **({"cost": 5} if costs else {})},
             {"name": "srv", "a": "r4", "b": "s", "emulated": False}]
    nodes = [{"name": "c", "role": "client"}, {"name": "s", "role": "server"},
             *({"name": f"r{i}", "role": "router"} for i in range(1, 5))]
    return {"name": "ring", "nodes": nodes, "links": links}


def test_shorthand_topologies_keep_their_addresses_tables_and_paths():
    g = load("two-path").graph()
    assert g.server_addr == "10.100.0.2"
    assert [(p.name, p.client_if, p.addr.client, p.addr.far, p.addr.table) for p in g.paths] == [
        ("wifi", "c-wifi", "10.1.0.1", "10.1.0.2", 101), ("lte", "c-lte", "10.2.0.1", "10.2.0.2", 102)]
    assert [(r.src, r.table, r.priority) for r in g.rules["c"]] == [
        ("10.1.0.1", 101, 1001), ("10.2.0.1", 102, 1002)]
    assert [p.links for p in g.paths] == [("wifi", "bottleneck"), ("lte", "bottleneck")]
    assert [link.emulator for link in g.links] == ["x1", "x2", None]  # no bottleneck: plain veth
    assert load("shared-bottleneck").graph().link("bottleneck").emulator == "x3"
    multihomed = load("wifi-lte-multihomed").graph()
    assert multihomed.server_addr == "10.1.0.2" and [p.links for p in multihomed.paths] == [
        ("wifi",), ("lte",)]


def test_paths_follow_routing_through_shared_links():
    g = load("multihop").graph()
    assert {p.name: p.links for p in g.paths} == {
        "wifi": ("wifi", "am", "mid", "srv"), "lte": ("lte", "bh", "hm", "mid", "srv")}
    dumbbell = load("dumbbell", k=2, m=3).graph()
    assert {p.name: p.links for p in dumbbell.paths} == {
        n: (n, "bn", "srv") for n in ("m1a", "m1b", "m2a", "m2b")}
    disjoint = load("dumbbell", disjoint=True).graph()
    assert {p.name: p.links[1] for p in disjoint.paths} == {"m1a": "bna", "m1b": "bnb"}
    clients = load("multi-client", n=3).graph()
    assert [p.links[1] for p in clients.paths] == ["wifi", "lte"] * 3


def test_a_path_is_composed_from_every_link_it_crosses_in_its_direction():
    g = load("multihop", delay_ms=5, wifi_mbit=20, lte_mbit=25, middle_mbit=15).graph()
    wifi, lte = (g.composed(p) for p in g.paths)
    assert wifi.links == ("wifi", "am", "mid", "srv") and lte.links[:3] == ("lte", "bh", "hm")
    assert (wifi.up.delay_ms, wifi.rtt_ms(), wifi.up.rate_mbit) == (10, 20, 15)
    assert wifi.slowest == lte.slowest == {"up": "mid", "down": "mid"}
    assert [p["composed"]["up"]["rate_mbit"] for p in g.describe()["paths"]] == [15, 15]
    # A link written server side first (a = s): its `up` is the path's down direction.
    nodes = [{"name": "c", "role": "client"}, {"name": "r", "role": "router"},
             {"name": "s", "role": "server"}]
    links = [{"name": "acc", "a": "c", "b": "r", "rate_mbit": 100, "delay_ms": 1},
             {"name": "back", "a": "s", "b": "r", "up": {"rate_mbit": 5, "delay_ms": 7},
              "down": {"rate_mbit": 50, "delay_ms": 2}}]
    c = from_dict({"name": "rev", "nodes": nodes, "links": links}).graph()
    path = c.composed(c.paths[0])
    assert (path.up.delay_ms, path.up.rate_mbit, path.down.delay_ms, path.down.rate_mbit) == (
        3, 50, 8, 5)
    assert path.slowest == {"up": "back", "down": "back"}


def test_a_loop_needs_a_routing_choice():
    with pytest.raises(TestbedError) as err:
        from_dict(ring(costs=False))
    msg = str(err.value)
    assert "\n" not in msg and "equally cheaply" in msg and "higher cost" in msg
    assert from_dict(ring(costs=True)).graph().paths[0].links == ("acc", "top", "top2", "srv")


@pytest.mark.parametrize("change, needle", [
    (lambda t: t["nodes"].append({"name": "c", "role": "host"}), "duplicate node name 'c'"),
    (lambda t: t["links"].append({"name": "acc", "a": "c", "b": "r1"}), "duplicate link name 'acc'"),
    (lambda t: t["nodes"].append({"name": "lone", "role": "host"}), "'lone' has no link"),
    (lambda t: t["links"].append({"name": "x", "a": "c", "b": "ghost"}), "no node 'ghost'"),
    (lambda t: t["nodes"].append({"name": "x1", "role": "router"}), "reserved for link emulators"),
    (lambda t: t.update(paths=[{"name": "wifi"}]), "either paths"),
    (lambda t: (t["nodes"].append({"name": "router", "role": "router"}),
                t["links"].append({"name": "verylongnm", "a": "router", "b": "r4"})), "longer than 15"),
])
def test_bad_graphs_are_one_line_errors_at_load(change, needle):
    topo = ring(costs=True)
    change(topo)
    with pytest.raises(TestbedError) as err:
        from_dict(topo)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_disconnected_part_is_refused():
    topo = ring(costs=True)
    topo["nodes"] += [{"name": "h1", "role": "host"}, {"name": "h2", "role": "host"}]
    topo["links"].append({"name": "hh", "a": "h1", "b": "h2"})
    with pytest.raises(TestbedError, match="'h1' is not connected to 'c'"):
        from_dict(topo)


def test_toml_graph_topology_and_cli_refusal(tmp_path):
    good = tmp_path / "line.toml"
    good.write_text("""
description = "client - router - server"
[[nodes]]
name = "c"
role = "client"
[[nodes]]
name = "r"
role = "router"
[[nodes]]
name = "s"
role = "server"
[[links]]
name = "acc"
a = "c"
b = "r"
rate_mbit = 10
delay_ms = 5
[links.down]
rate_mbit = 20
[[links]]
name = "srv"
a = "r"
b = "s"
emulated = false
""")
    topo = load(str(good))
    assert topo.path("acc").direction("down").rate_mbit == 20
    assert topo.graph().server_addr == "10.2.0.2"
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace('b = "s"', 'b = "ghost"'))
    proc = run_tb("shell", "--topology", str(bad), timeout=60)
    assert_one_line_error(proc, "no node 'ghost'")


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="needs root")
def test_multihop_paths_cross_their_hops_and_share_the_middle_link():
    """Replies come back the way the path went: the server's TTL 64 arrives
    less one per router (3 on wifi, 4 on lte); both subflows carry data and
    together stay under the shared middle link's rate."""
    from testbed.core.net import Testbed
    with Testbed(load("multihop", delay_ms=1, wifi_mbit=20, lte_mbit=20, middle_mbit=20)) as tb:
        for name, routers in (("wifi", 3), ("lte", 4)):
            out = tb.client.cmd(f"ping -n -c 1 -W 2 -I {tb.path(name).addr.client} {tb.server_addr}")
            ttl = re.search(r"ttl=(\d+)", out)
            assert ttl and int(ttl.group(1)) == 64 - routers, (name, out)
        assert [p["links"] for p in tb.describe()["paths"]] == [
            ["wifi", "am", "mid", "srv"], ["lte", "bh", "hm", "mid", "srv"]]
        r = bulk_transfer(tb, seconds=5, warmup=2)
    assert r.subflows == 1 and all(m > 1 for m in r.path_goodput_mbit.values()), r
    assert 14 < r.goodput_mbit < 20 * 1.05, r


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="needs root")
def test_every_client_of_multi_client_reaches_the_server_on_both_paths():
    from testbed.core.net import Testbed
    with Testbed(load("multi-client", n=2, wifi_delay_ms=1, lte_delay_ms=2)) as tb:
        assert [p.name for p in tb.paths] == ["c1w", "c1l"]  # the first client's
        for p in tb.all_paths:
            assert ping_ok(tb.node(p.graph.client), p.addr.client, tb.server_addr), p.name
        assert {p.name: p.link.name for p in tb.all_paths} == {
            "c1w": "wifi", "c1l": "lte", "c2w": "wifi", "c2l": "lte"}


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="needs root")
def test_calibration_checks_a_multihop_path_against_all_of_its_links():
    """The expected path is the composition of its links: the middle link (15
    Mbit/s) sets both paths' rate, every emulated link's delay adds up. A middle
    link changed behind the harness's back fails calibration, naming it."""
    from testbed.core.emulation.calibrate import calibrate
    from testbed.core.net import Testbed
    with Testbed(load("multihop", delay_ms=2, wifi_mbit=20, lte_mbit=20, middle_mbit=15)) as tb:
        good = calibrate(tb, pings=30, flow_s=1.5)
        assert good["valid"], good["reason"]
        wifi = good["paths"]["wifi"]
        assert wifi["links"] == ["wifi", "am", "mid", "srv"] and wifi["rtt_configured_ms"] == 8
        assert wifi["rate_up"]["configured_mbit"] == 15 and wifi["composed"]["slowest"]["up"] == "mid"
        mid = tb.link("mid")
        tb.backend.update(mid, "up", mid.up.model_copy(update={"delay_ms": 12}))  # tb still says 2
        bad = calibrate(tb, pings=30, measure_rate=False)
    assert not bad["valid"]
    for name in ("wifi", "lte"):
        assert re.search(rf"{name} \(emulated links {name}, mid\): RTT 1[78]\.\d+ ms, configured 8 ms",
                         bad["reason"]), bad["reason"]


@pytest.mark.parametrize("name, params, expected", [
    ("two-path", {"rate_mbit": 20}, {"wifi": 20, "lte": 20}),
    ("shared-bottleneck", {"bottleneck_mbit": 20}, {"a": 10, "b": 10}),  # the shared link caps
    ("wifi-lte-cross", {}, {"wifi": 20, "lte": 20}),  # plain access links: the cells' rates
    ("multihop", {"wifi_mbit": 20, "lte_mbit": 20, "middle_mbit": 30}, {"wifi": 15, "lte": 15}),
])
def test_throughputs_configured_rates_are_the_composed_paths(name, params, expected):
    from types import SimpleNamespace

    from experiments.throughput import configured_rates
    g = load(name, **params).graph()
    tb = SimpleNamespace(graph=g, paths=[SimpleNamespace(name=p.name, graph=p) for p in g.paths])
    assert configured_rates(tb, "up") == pytest.approx(expected)
