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
