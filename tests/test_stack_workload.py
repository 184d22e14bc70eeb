"""The user-space stack inside testbed topologies: the app workload's stack choice
per side (kernel <-> user in every combination) and failover with a user-stack side."""
from __future__ import annotations

import json
import time

import pytest

from test_experiments import run
from testbed.base.errors import TestbedError
from testbed.base.netns import run_command
from testbed.core.net import Testbed
from testbed.core.topology import load
from testbed.harness import scenario as sc
from testbed.harness import workload


def test_stack_choice_is_refused_at_load_in_one_line():
    with pytest.raises(TestbedError, match="client_stack: Input should be 'kernel' or 'user'"):
        workload.get("app", client_stack="usr")
    with pytest.raises(TestbedError, match="cc 'bbr' is not available in the user-space stack"):
        workload.get("app", server_stack="user", cc="bbr")
    with pytest.raises(TestbedError, match="TCP-only server needs server_stack 'kernel'"):
        workload.get("app", server_stack="user", server_protocol="tcp")
    with pytest.raises(TestbedError, match="bind_dev is for kernel sockets"):
        workload.get("app", client_stack="user", bind_path="wifi", bind_dev=True)
    base = {"seed": 1, "experiment": "throughput", "topology": {"name": "two-path"}}
    with pytest.raises(TestbedError, match="runs with tool 'app'"):
        sc.validate({**base, "params": {"client_stack": "user", "tool": "iperf3"}})
    assert workload.get("app", client_stack="user", server_stack="user").params.server_stack == "user"


@pytest.mark.root
@pytest.mark.timeout(120)
def test_app_workload_runs_every_stack_combination_on_a_topology(tmp_path):
    combos = [("user", "kernel", "up"), ("kernel", "user", "down"), ("user", "user", "up")]
    with Testbed(load("two-path", wifi_delay_ms=0, lte_delay_ms=0), backend="bridge") as tb:
        results = {c: workload.get("app", bytes=3_000_000, direction=c[2], client_stack=c[0],
                                   server_stack=c[1], port=5100 + i)
                   .run(tb, tmp_path / str(i), time.monotonic_ns(), 60)
                   for i, c in enumerate(combos)}
        for node in (tb.client, tb.server):  # the stacks went with their app processes
            tables = run_command(node.pid, ["nft", "list", "tables"]).stdout
            assert "mptb_stack" not in tables, tables
    for combo, res in results.items():
        m = res.metrics
        assert m["outcome"] == "mptcp" and m["server_outcome"] == "mptcp", (combo, m)
        assert (m["client_stack"], m["server_stack"]) == combo[:2]
        assert m["sha256_match"] is True and m["bytes"] == 3_000_000, (combo, m)
        assert m["subflows_max"] == 2 and m["second_subflow_s"] < 2, (combo, m)
        assert m["connect_s"] < 0.5 and m["goodput_mbit"] > 5, (combo, m)
        assert m["subflow_bytes_error"] < 0.02, (combo, m)
        ts = res.tables["timeseries"]
        per_key = ts.groupby("key")["value"].sum()
        assert per_key["total"] == 3_000_000
        assert per_key["wifi"] > 300_000 and per_key["lte"] > 300_000, (combo, per_key.to_dict())
        ev = res.tables["events"]
        paths = sorted(json.loads(d)["path"] for d in ev[ev.event == "subflow_seen"].detail)
        assert paths == ["lte", "lte", "wifi", "wifi"], (combo, paths)


@pytest.mark.root
@pytest.mark.timeout(120)
def test_failover_with_a_user_stack_client_reinjects_and_keeps_the_data_intact(tmp_path):
    # 10 Mbit/s and the experiments' run(): a clean-clone CI run saw the link emulator
    # 0.20 % late (bound 0.1 %) at 20 Mbit/s under the Python sender, which voids the run
    [m] = run(tmp_path, {"timeout_s": 90, "experiment": "failover", "calibrate": False,
                         "topology": {"name": "two-path",
                                      "params": {"rate_mbit": 10, "wifi_delay_ms": 5, "lte_delay_ms": 10}},
                         "params": {"seconds": 5, "client_stack": "user"},
                         "events": [{"at_s": 2.0, "action": "link_down", "path": "wifi"}]})
    assert m["client_stack"] == "user" and m["outcome"] == "mptcp"
    assert m["sha256_match"] is True  # what was in flight on wifi was reinjected on lte
    assert m["recovered"] is True and m["stall_s"] < 3.0, m
