"""Cross traffic: TCP with its own congestion control, constant-rate and on/off
UDP, each started and stopped while the testbed runs."""
from __future__ import annotations

import time

import pytest

from testbed.base.errors import TestbedError
from testbed.core.cross import CrossFlow, CrossTraffic
from testbed.core.topology import load


def test_bad_cross_flows_are_refused_when_written():
    with pytest.raises(ValueError, match="needs rate_mbit"):
        CrossFlow(name="u", src="t1", kind="udp")
    with pytest.raises(ValueError, match="both on_s and off_s"):
        CrossFlow(name="u", src="t1", kind="udp", rate_mbit=1, on_s=1)
    with pytest.raises(ValueError, match="for udp"):
        CrossFlow(name="t", src="t1", kind="tcp", rate_mbit=1)


@pytest.mark.root
def test_cross_traffic_starts_stops_and_delivers_at_its_rate():
    from testbed.core.net import Testbed
    flows = [CrossFlow(name="bulk", src="t1", kind="tcp", cc="reno", port=5601),
             CrossFlow(name="cbr", src="t2", kind="udp", rate_mbit=2, port=5602),
             CrossFlow(name="onoff", src="t2", kind="udp", rate_mbit=4, on_s=0.5, off_s=0.5, port=5603)]
    with Testbed(load("dumbbell", m=2, bottleneck_mbit=20, delay_ms=2)) as tb:
        cross = CrossTraffic(tb, flows)
        with pytest.raises(TestbedError, match="no cross-traffic flow 'nope'"):
            cross.start("nope")
        for name in ("cbr", "onoff", "bulk"):
            cross.start(name)
        sender = cross._running["bulk"].sockets[1]
        assert sender.getsockopt(6, 13, 16).split(b"\0")[0] == b"reno"  # TCP_CONGESTION, per socket
        time.sleep(0.5)
        a, t0 = cross.delivered(), time.monotonic()
        time.sleep(4.0)
        b, t1 = cross.delivered(), time.monotonic()
        rate = {n: (b[n] - a[n]) * 8 / (t1 - t0) / 1e6 for n in b}
        assert 1.8 < rate["cbr"] < 2.2, rate
        assert 1.6 < rate["onoff"] < 2.4, rate  # 4 Mbit/s half of the time
        assert 10 < rate["bulk"] < 20, rate  # the rest of the 20 Mbit/s bottleneck
        cross.stop("bulk")
        cross.stop("cbr")
        time.sleep(0.3)
        c = cross.delivered()
        time.sleep(1.0)
        d = cross.delivered()
        assert d["bulk"] == c["bulk"] and d["cbr"] == c["cbr"] and d["onoff"] > c["onoff"]
        assert not cross.errors()


# ---- cross traffic in scenario files ------------------------------------------------
def scenario(cross: list[dict], events: list[dict] | None = None, **topology) -> dict:
    """A throughput scenario on the shipped topology with a WiFi neighbour `u`."""
    return {"experiment": "throughput", "calibrate": False,
            "topology": {"name": "wifi-lte-cross", **topology},
            "params": {"seconds": 4}, "cross": cross,
            "events": events if events is not None else [
                {"at_s": 0.5, "action": "cross_start", "flow": f["name"]} for f in cross]}


UDP = {"name": "nbr", "src": "u", "kind": "udp", "rate_mbit": 4}


@pytest.mark.parametrize("data, needle", [
    (scenario([{**UDP, "src": "ghost"}]), "cross.0.src: no node 'ghost'"),
    (scenario([{**UDP, "dst": "ghost"}]), "cross.0.dst: no node 'ghost'"),
    (scenario([{**UDP, "dst": "u"}]), "cross.0.dst: flow 'nbr' goes from 'u' to itself"),
    (scenario([{**UDP, "rate_mbit": 5000}]), "cross.0.rate_mbit: Input should be less than or equal to 1000"),
    (scenario([{**UDP, "rate_mbit": 0}]), "cross.0.rate_mbit: Input should be greater than or equal to 0.01"),
    (scenario([UDP, {**UDP, "name": "two", "port": 5600}], events=[
        {"at_s": 0, "action": "cross_start", "flow": "nbr"},
        {"at_s": 0, "action": "cross_start", "flow": "two"}]),
     "cross.1.port: udp port 5600 on 's' is also flow 'nbr''s"),
    (scenario([UDP, {**UDP}]), "cross.1.name: duplicate cross-traffic flow name 'nbr'"),
    (scenario([UDP], events=[{"at_s": 1, "action": "cross_start", "flow": "nope"}]),
     "events.0.flow: no cross-traffic flow 'nope' (flows: nbr)"),
    (scenario([UDP], events=[{"at_s": 1, "action": "cross_start"}]),
     "events.0: Value error, cross_start needs flow"),
    (scenario([UDP], events=[{"at_s": 1, "action": "cross_start", "flow": "nbr", "path": "wifi"}]),
     "events.0: Value error, cross_start takes flow, not path"),
    (scenario([UDP], events=[{"at_s": 1, "action": "link_down", "flow": "nbr", "path": "wifi"}]),
     "events.0: Value error, flow only goes with cross_start and cross_stop"),
    (scenario([UDP], events=[]), "cross.0: flow 'nbr' is never started"),
    # A flow between hosts with no path: a host behind the server (which does not forward).
    ({**scenario([{**UDP, "dst": "c"}]), "topology": {"spec": {
        "nodes": [{"name": "c", "role": "client"}, {"name": "r", "role": "router"},
                  {"name": "s", "role": "server"}, {"name": "u", "role": "host"}],
        "links": [{"name": "acc", "a": "c", "b": "r"}, {"name": "srv", "a": "r", "b": "s"},
                  {"name": "lan", "a": "u", "b": "s", "emulated": False}]}}},
     "cross.0: flow 'nbr': no path from 'u' to 'c': 'u' has no route to 10.1.0.1"),
])
def test_bad_cross_traffic_in_a_scenario_is_a_one_line_error_at_load(data, needle):
    from testbed.harness.scenario import validate
    with pytest.raises(TestbedError) as err:
        validate(data)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg, msg


def test_cross_flows_route_through_the_graph_and_events_name_them():
    from testbed.harness.scenario import expand, validate
    s = validate(scenario([UDP, {"name": "bulk", "src": "u", "cc": "reno"}], events=[
        {"at_s": 0.5, "action": "cross_start", "flow": "nbr"},
        {"at_s": 1.0, "action": "cross_start", "flow": "bulk"},
        {"at_s": 3.0, "action": "cross_stop", "flow": "nbr"}]))
    assert [e.describe() for e in s.events] == ["cross_start nbr", "cross_start bulk", "cross_stop nbr"]
    graph = s.topology.resolve().graph()
    assert graph.route("u", "s") == ("nbr", "wlan", "srv")  # shares the WiFi cell with path wifi
    assert [p.links for p in graph.paths] == [("wifi", "wlan", "srv"), ("lte", "ran", "srv")]
    # Scenarios without cross traffic keep their run ids: the new keys are left out of the dump.
    plain = validate({"experiment": "throughput", "topology": {"name": "two-path"},
                      "events": [{"at_s": 1, "action": "link_down", "path": "wifi"}]})
    dumped = plain.model_dump(mode="json")
    assert "flow" not in dumped["events"][0] and dumped["events"][0]["path"] == "wifi"
    assert expand(plain)[0].point_id == "719344d92b"  # as before cross traffic existed


@pytest.mark.root
def test_a_scenario_runs_cross_traffic_by_events_and_stores_what_each_flow_achieved(tmp_path):
    """The shipped example shape: MPTCP over WiFi + LTE while the WiFi neighbour
    sends 4 Mbit/s CBR from 0.5 s to 3 s and a reno TCP flow from 1 s to the end.
    Calibrated: the client's access links are plain, so only the composed paths
    (wifi + wlan + srv) match what the links say."""
    import json

    import pandas as pd

    from test_experiments import run
    data = scenario([UDP, {"name": "bulk", "src": "u", "cc": "reno"}], events=[
        {"at_s": 0.5, "action": "cross_start", "flow": "nbr"},
        {"at_s": 1.0, "action": "cross_start", "flow": "bulk"},
        {"at_s": 3.0, "action": "cross_stop", "flow": "nbr"}])
    [r] = run(tmp_path, {**data, "calibrate": True})
    m = r["_manifest"]
    assert m["emulation"]["calibration"]["paths"]["wifi"]["links"] == ["wifi", "wlan", "srv"]
    flows = m["probes"]["cross"]["flows"]
    assert flows["nbr"]["route"] == ["nbr", "wlan", "srv"] and flows["bulk"]["cc"] == "reno"
    assert flows["nbr"]["active_s"] == pytest.approx(2.5, abs=0.1)
    assert 3.0 < r["cross.nbr.mbit"] < 4.4, r  # drop-tail losses next to MPTCP, at most
    assert r["cross.bulk.mbit"] > 0.5 and r["cross.bulk.active_s"] > 2.5, r
    assert [(e["event"], e["ok"]) for e in m["applied_events"]] == [
        ("cross_start nbr", True), ("cross_start bulk", True), ("cross_stop nbr", True)]
    run_dir = next((tmp_path / "out" / "throughput").glob("*-r000"))
    ts = pd.read_parquet(run_dir / "timeseries.parquet")
    nbr = ts[(ts.series == "cross_mbit") & (ts.key == "nbr")]
    on = nbr[(nbr.t > 1.0) & (nbr.t < 2.9)].value.mean()
    assert 3.0 < on < 4.6 and nbr[nbr.t < 0.45].value.max() == 0 and nbr[nbr.t > 3.3].value.max() == 0
    assert json.loads((run_dir / "metrics.json").read_text())["goodput_mbit"] > 5
