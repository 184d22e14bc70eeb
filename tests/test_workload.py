"""Workloads: our MPTCP client/server app and iperf3, in real namespaces."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from testbed.harness import workload
from testbed.base.errors import TestbedError
from testbed.core.model import HostSettings
from testbed.core.net import Testbed
from testbed.harness.probes.base import SCHEMAS
from testbed.core.topology import load


def two_path():
    return load("two-path", wifi_delay_ms=0, lte_delay_ms=0)


def run(tb, tmp_path, name="app", timeout=60, **params):
    return workload.get(name, **params).run(tb, tmp_path, time.monotonic_ns(), timeout)


def assert_schema(df, table):
    assert list(df.columns) == list(SCHEMAS[table])
    assert {c: str(t) for c, t in df.dtypes.items()} == SCHEMAS[table]


def test_params_are_validated_with_one_line_errors():
    with pytest.raises(TestbedError, match=r"workload 'app': mdoe: unknown key"):
        workload.get("app", mdoe="rr")
    with pytest.raises(TestbedError, match="bytes or seconds"):
        workload.get("app", bytes=10, seconds=1)
    with pytest.raises(TestbedError, match="unknown workload 'nope'"):
        workload.get("nope")
    with pytest.raises(TestbedError, match="parallel"):
        workload.get("iperf", parallel=0)
    assert {"app", "iperf"} <= set(workload.available())


@pytest.mark.root
@pytest.mark.timeout(120)
def test_app_bulk_integrity_subflow_bytes_and_tables(tmp_path):
    with Testbed(two_path(), backend="bridge") as tb:
        down = run(tb, tmp_path / "down", bytes=8_000_000, direction="down")
        up = run(tb, tmp_path / "up", bytes=8_000_000, direction="up", port=5001)
        rr = run(tb, tmp_path / "rr", mode="rr", count=5, request_bytes=1000,
                 response_bytes=200_000, port=5002)
    for res in (down, up, rr):
        m = res.metrics
        assert m["outcome"] == "mptcp" and m["server_outcome"] == "mptcp", m
        assert m["sha256_match"] is True
        assert m["subflow_bytes_error"] < 0.01  # per-subflow bytes add up within 1 %
        assert m["subflows_max"] == 2 and m["second_subflow_s"] < 2
        assert m["cc"] == "cubic"
        assert_schema(res.tables["events"], "events")
        assert_schema(res.tables["timeseries"], "timeseries")
        assert all(f.exists() for f in res.raw_files)
    assert down.metrics["bytes"] == up.metrics["bytes"] == 8_000_000
    assert down.metrics["goodput_mbit"] > 25  # 2 x 20 Mbit/s
    assert rr.metrics["bytes_down"] == 1_000_000 and rr.metrics["ttfb_s"] < 0.5
    ts = down.tables["timeseries"]
    per_key = ts.groupby("key")["value"].sum()
    assert per_key["total"] == 8_000_000
    assert abs(per_key["wifi"] + per_key["lte"] - 8_000_000) < 80_000
    assert per_key["wifi"] > 1_000_000 and per_key["lte"] > 1_000_000
    ev = down.tables["events"]
    client = ev[ev.host == "client"].event.tolist()
    assert client.index("connect_start") < client.index("established") < client.index("first_byte")
    paths = [json.loads(d)["path"] for d in ev[ev.event == "subflow_seen"].detail]
    assert sorted(paths) == ["lte", "lte", "wifi", "wifi"]


@pytest.mark.root
@pytest.mark.timeout(90)
def test_app_fallback_plain_tcp_and_bind_path(tmp_path):
    with Testbed(two_path(), backend="bridge", server=HostSettings(enabled=0)) as tb:
        fb = run(tb, tmp_path / "fb", bytes=2_000_000, server_protocol="tcp")
        tcp = run(tb, tmp_path / "tcp", bytes=2_000_000, protocol="tcp", port=5001)
    assert fb.metrics["outcome"] == "fallback_tcp" and fb.metrics["server_outcome"] == "tcp"
    assert fb.metrics["sha256_match"] and fb.metrics["subflows_max"] == 1
    assert tcp.metrics["outcome"] == "tcp" and tcp.metrics["sha256_match"]
    with Testbed(two_path(), backend="bridge") as tb:
        lte = run(tb, tmp_path / "lte", bytes=1_000_000, bind_path="lte", bind_dev=True)
    first = lte.tables["events"].query("event == 'subflow_seen' and host == 'client'")
    assert json.loads(first.detail.iloc[0])["path"] == "lte"


@pytest.mark.root
@pytest.mark.timeout(60)
def test_app_client_reports_connect_failure_with_errno(tmp_path):
    out = tmp_path / "c.json"
    with Testbed(two_path(), backend="bridge") as tb:
        proc = tb.popen(tb.client, [sys.executable, "-m", "testbed.harness.workload.app", "client",
                                    "--server", tb.server_addr, "--port", "4999", "--bytes", "10",
                                    "--out", str(out)], stderr=subprocess.PIPE)
        proc.wait(30)
    res = json.loads(out.read_text())
    assert res["outcome"] == "failed" and res["errno_name"] == "ECONNREFUSED"


@pytest.mark.root
@pytest.mark.timeout(90)
def test_iperf_mptcp_uses_both_paths(tmp_path):
    with Testbed(two_path(), backend="bridge") as tb:
        res = run(tb, tmp_path, name="iperf", seconds=3)
        tcp = run(tb, tmp_path / "tcp", name="iperf", seconds=2, protocol="tcp", port=5202)
    m = res.metrics
    assert m["cc"] == "cubic" and m["goodput_mbit"] > 25
    total = m["path_wifi_bytes"] + m["path_lte_bytes"]
    assert min(m["path_wifi_bytes"], m["path_lte_bytes"]) > 0.3 * total
    assert tcp.metrics["path_lte_bytes"] < 0.01 * tcp.metrics["path_wifi_bytes"]
    assert_schema(res.tables["timeseries"], "timeseries")
    assert (tmp_path / "raw" / "iperf-client.json").exists()
