"""Probes around a real two-path MPTCP transfer."""
from __future__ import annotations

import json
import time

import pytest

from testbed.harness import probes
from testbed.harness import workload
from testbed.base.errors import TestbedError
from testbed.core.net import Testbed
from testbed.harness.probes.base import SCHEMAS, frame
from testbed.core.topology import load


def assert_schema(df, table):
    assert {c: str(t) for c, t in df.dtypes.items()} == SCHEMAS[table]


def test_registry_and_params():
    assert {"pm_events", "nstat", "subflows", "ifstats", "pcap"} <= set(probes.available())
    with pytest.raises(TestbedError, match="unknown probe 'nope'"):
        probes.get("nope")
    with pytest.raises(TestbedError, match="interval_ms"):
        probes.get("subflows", interval_ms=-1)


def test_frame_keeps_large_integers_exact():
    df = frame("packets", [{"t": 0.5, "dsn": 2**62 + 1, "token": None}])
    assert_schema(df, "packets")
    assert df.dsn[0] == 2**62 + 1 and df.token.isna()[0]


@pytest.mark.root
@pytest.mark.timeout(120)
def test_all_probes_on_a_two_path_transfer(tmp_path):
    names = ["pm_events", "nstat", "subflows", "ifstats", "pcap"]
    with Testbed(load("two-path", wifi_delay_ms=0, lte_delay_ms=0), backend="bridge") as tb:
        t0 = time.monotonic_ns()
        ps = {n: probes.get(n, interval_ms=50) for n in names}
        for p in ps.values():
            p.start(tb, tmp_path, t0)
        res = workload.get("app", bytes=4_000_000).run(tb, tmp_path, t0, 60)
        time.sleep(0.3)  # the closed events follow the sockets' release
        for p in ps.values():
            p.stop()
        tables = {n: p.tables() for n, p in ps.items()}
    assert res.metrics["sha256_match"]
    # netlink events: created, established, one sub_established per extra path, closed
    ev = tables["pm_events"]["events"]
    assert_schema(ev, "events")
    for host in ("client", "server"):
        seq = [e for e in ev[ev.host == host].event if e not in ("listener_created", "listener_closed")]
        assert seq == ["created", "established", "sub_established", "closed"], (host, seq)
    sub = json.loads(ev[(ev.host == "client") & (ev.event == "sub_established")].detail.iloc[0])
    assert sub["saddr4"] == tb.path("lte").addr.client
    assert ps["pm_events"].metrics()["client.pm_sub_established"] == 1
    # nstat deltas
    n = ps["nstat"].summary()
    assert n["client"]["MPTcpExtMPCapableSYNTX"] == 1 and n["client"]["MPTcpExtMPJoinSynTx"] == 1
    assert n["server"]["MPTcpExtMPCapableSYNRX"] == 1 and n["server"]["MPTcpExtMPJoinSynRx"] == 1
    assert ps["nstat"].metrics()["client.MPTcpExtMPCapableSYNTX"] == 1
    assert (tmp_path / "raw" / "nstat-client-end.json").exists()
    # per-subflow samples on both hosts and both paths
    sf = tables["subflows"]["subflows"]
    assert_schema(sf, "subflows")
    app = sf[sf.subflow.str.contains(":5000")]
    assert set(zip(app.host, app.path)) == {(h, p) for h in ("client", "server") for p in ("wifi", "lte")}
    last = app[app.host == "server"].groupby("subflow").bytes_acked.max()
    # sampled every 50 ms: the last sample may precede the last few packets
    assert 0.8 * 4_000_000 < last.sum() <= 1.01 * 4_000_000
    # interface counters: both paths carried the download
    ts = tables["ifstats"]["timeseries"]
    assert_schema(ts, "timeseries")
    rx = ts[ts.series == "path_rx_bytes"].groupby("key").value.sum()
    assert rx["wifi"] > 1_000_000 and rx["lte"] > 1_000_000
    # pcap: MP_CAPABLE on the initial path, MP_JOIN (with the peer's token) on the other
    pk = tables["pcap"]["packets"]
    assert_schema(pk, "packets")
    assert (pk[pk.subtype == 0].path == "wifi").all() and (pk[pk.subtype == 1].path == "lte").all()
    assert pk[(pk.subtype == 1) & pk.token.notna()].shape[0] >= 1
    assert pk.dsn.notna().sum() > 100


# ---- probes never lie by omission ------------------------------------------------------
@pytest.mark.root
@pytest.mark.timeout(120)
def test_pcap_is_capturing_when_start_returns_and_counts_every_packet(tmp_path):
    """The first packet of a connection opened the moment start() returned is in
    the capture, and the capture holds every packet the interfaces moved."""
    import socket

    from testbed.mptcp.sockopt import listener

    with Testbed(load("two-path", wifi_delay_ms=1, lte_delay_ms=1), backend="userspace") as tb:
        ls = tb.in_ns(tb.server, lambda: listener(5730, backlog=8))
        for i in range(3):
            probe = probes.get("pcap")
            probe.start(tb, tmp_path / str(i), time.monotonic_ns())
            c = tb.in_ns(tb.client, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM,
                                                          socket.IPPROTO_MPTCP))
            c.settimeout(5)
            c.connect((tb.server_addr, 5730))
            s, _ = ls.accept()
            c.sendall(b"x" * 20000)
            assert len(s.recv(1)) == 1
            c.close()
            s.close()
            probe.stop()
            pk = probe.tables()["packets"]
            first = pk.sort_values("t").iloc[0]
            assert first["path"] == "wifi" and first["subtype"] == 0 and first["flags"] == "0x0002", pk.head()
            assert probe.problems() == [], probe.summary()
            counted = probe.counted()
            assert counted["wifi"] >= 10 and probe.captured()["wifi"] >= counted["wifi"]
        ls.close()


def test_pcap_reports_a_capture_with_fewer_packets_than_the_interface(monkeypatch):
    from testbed.harness.probes.pcap import PcapProbe

    probe = PcapProbe()
    probe._procs = {"wifi": None, "lte": None}  # as after start()
    probe._ifnames = {"wifi": "c-wifi", "lte": "c-lte"}
    monkeypatch.setattr(probe, "captured", lambda: {"wifi": 90, "lte": 40})
    monkeypatch.setattr(probe, "counted", lambda: {"wifi": 100, "lte": 40})
    assert probe.problems() == ["wifi: captured 90 packets, interface c-wifi moved 100 "
                                "(bound: all of them)"]
    monkeypatch.setattr(probe, "counted", lambda: {})
    assert "could not be read" in probe.problems()[0]


@pytest.mark.root
@pytest.mark.timeout(120)
def test_runner_stores_a_run_whose_probe_missed_packets_as_invalid(tmp_path, monkeypatch):
    from test_runner import FAST, write

    from testbed.harness import scenario as sc
    from testbed.harness.probes.pcap import PcapProbe
    from testbed.harness.runner import sweep

    monkeypatch.setattr(PcapProbe, "problems",
                        lambda self: ["lte: captured 0 packets, interface c-lte moved 57 (bound: all of them)"])
    body = FAST.format(reps=1).replace('probes = ["pm_events", "nstat"]', 'probes = ["pcap"]')
    body = body.replace('"params.direction" = ["up", "down"]', "")
    summary = sweep(sc.load(write(tmp_path, body)), tmp_path / "out", progress=False)
    manifest = json.loads((summary.run_dirs[0] / "manifest.json").read_text())
    assert manifest["status"] == "invalid"
    assert manifest["reason"] == "probe pcap: lte: captured 0 packets, interface c-lte moved 57 (bound: all of them)"


@pytest.mark.root
@pytest.mark.timeout(120)
def test_runner_stores_a_run_whose_emulator_fell_behind_as_invalid(tmp_path, monkeypatch):
    from test_runner import FAST, write

    from testbed.harness import runner
    from testbed.harness import scenario as sc

    reason = "wifi up: 412 of 9000 packets (4.58%) left more than 1 ms late (max 8.1 ms), bound 0.1%"
    monkeypatch.setattr(runner, "judge_run", lambda before, after: {"valid": False, "reason": reason})
    body = FAST.format(reps=1).replace('"params.direction" = ["up", "down"]', "")
    summary = runner.sweep(sc.load(write(tmp_path, body)), tmp_path / "out", progress=False)
    manifest = json.loads((summary.run_dirs[0] / "manifest.json").read_text())
    assert manifest["status"] == "invalid"
    assert manifest["reason"] == f"emulation during the run: {reason}"
