"""Reusing a built testbed: a reset undoes everything a run may change and is
checked against the spec, and what it cannot verify is named."""
from __future__ import annotations

import json
import time

import pytest

from testbed.core import mptcp_config
from testbed.core.events import EventSpec
from testbed.core.net import Testbed
from testbed.core.state import STATE_DIR
from testbed.harness import scenario
from testbed.harness.runner import sweep
from testbed.core.topology import load
from testbed.mptcp import pm
from testbed.mptcp.sockopt import listener, mptcp_socket


@pytest.fixture
def tb():
    with Testbed(load("two-path", wifi_delay_ms=2, lte_delay_ms=2)) as bed:
        yield bed


def _kernel_view(tb: Testbed) -> dict:
    """What a run can change, read from the kernel and the emulator's settings."""
    hosts = {role: mptcp_config.snapshot(node.pid) for role, node in
             (("client", tb.client), ("server", tb.server))}
    return {"hosts": {role: {"subflows": h["subflows"], "add_addr_accepted": h["add_addr_accepted"],
                             "endpoints": sorted((e["addr"], e["id"], tuple(e["flags"]))
                                                 for e in h["endpoints"])}
                      for role, h in hosts.items()},
            "links": {name: state.model_dump(mode="json") for name, state in tb.link_states().items()}}


def _connects(tb: Testbed, port: int, timeout: float = 1.5) -> bool:
    ls = tb.in_ns(tb.server, lambda: listener(port))
    try:
        def attempt() -> bool:
            s = mptcp_socket()
            s.settimeout(timeout)
            try:
                s.connect((tb.server_addr, port))
                return True
            except OSError:
                return False
            finally:
                s.close()
        return tb.in_ns(tb.client, attempt)
    finally:
        ls.close()


def test_reset_undoes_every_change_a_run_makes(tb):
    built = _kernel_view(tb)
    assert tb.reset_problems() == []
    for event in [EventSpec(at_s=0, action="set_link", path="wifi", changes={"delay_ms": 40}),
                  EventSpec(at_s=0, action="set_link", path="lte", direction="up",
                            changes={"loss_pct": 5}),
                  EventSpec(at_s=0, action="blackhole", path="lte", direction="down"),
                  EventSpec(at_s=0, action="link_down", path="lte"),
                  EventSpec(at_s=0, action="backup_on", path="lte"),
                  EventSpec(at_s=0, action="syn_drop", path="wifi")]:
        tb.apply_event(event)
    pm.delete_endpoint(tb.client.pid, built["hosts"]["client"]["endpoints"][0][1])  # as RobE may
    mptcp_config.set_limits(tb.server.pid, subflows=1, add_addr_accepted=0)
    assert _kernel_view(tb) != built
    assert not _connects(tb, 7101)  # the SYN-dropping middlebox is in force

    assert tb.reset() == []
    assert _kernel_view(tb) == built  # read back, not taken from the reset's word
    assert tb.applied_events == []
    assert _connects(tb, 7102)  # middlebox gone, path up


def test_a_change_the_reset_did_not_undo_is_named(tb):
    ep = pm.endpoints(tb.client.pid)[0]
    pm.delete_endpoint(tb.client.pid, ep.id)  # behind the testbed's back
    problems = tb.reset_problems()
    assert len(problems) == 1 and "endpoints" in problems[0] and ep.addr in problems[0]
    assert tb.reset() == []  # the reset restores it
    started = time.monotonic()
    tb.reset()
    assert time.monotonic() - started < 1.0  # generous: a reset is far cheaper than a build


FAST = """
experiment = "throughput"
repetitions = 2
seed = 4
timeout_s = 60
backend = "bridge"
calibrate = false
[topology]
name = "two-path"
params = { rate_mbit = 20, wifi_delay_ms = 0, lte_delay_ms = 0 }
[params]
seconds = 1.5
"""


def _manifests(summary) -> list[dict]:
    return [json.loads((d / "manifest.json").read_text()) for d in summary.run_dirs]


def test_a_sweep_reuses_its_testbed_and_says_so(tmp_path):
    (tmp_path / "s.toml").write_text(FAST)
    summary = sweep(scenario.load(tmp_path / "s.toml"), tmp_path / "store", progress=False)
    assert summary.done == {"complete": 2}
    first, second = _manifests(summary)
    assert first["testbed_reuse"]["reused"] is False
    assert second["testbed_reuse"] == {"reused": True, "reason": "reset verified against the spec"}
    assert second["phases"]["build"] < 0.5 * first["phases"]["build"]  # a reset, not a build
    assert not list(STATE_DIR.glob("run-*.json"))  # the kept testbed went with the sweep


def test_a_reset_that_does_not_verify_gets_a_fresh_testbed(tmp_path, monkeypatch):
    monkeypatch.setattr(Testbed, "reset", lambda self: ["link wifi up: delay 40 ms (spec 0 ms)"])
    (tmp_path / "s.toml").write_text(FAST)
    summary = sweep(scenario.load(tmp_path / "s.toml"), tmp_path / "store", progress=False)
    assert summary.done == {"complete": 2}
    second = _manifests(summary)[1]
    assert second["testbed_reuse"] == {
        "reused": False, "reason": "reset did not verify: link wifi up: delay 40 ms (spec 0 ms)"}
