"""Reusing a built testbed: a reset undoes everything a run may change and is
checked against the spec, and what it cannot verify is named."""
from __future__ import annotations

import json
import os
import time

import pytest

from testbed.core import mptcp_config
from testbed.core.events import EventSpec
from testbed.core.net import Testbed
from testbed.base.netns import run_command
from testbed.core.state import STATE_DIR
from testbed.harness import scenario
from testbed.harness.runner import sweep
from testbed.core.topology import load
from testbed.mptcp import pm
from testbed.mptcp.sockopt import listener, mptcp_socket

pytestmark = pytest.mark.root   # every test here builds namespaces


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
    # a reset, not a build (a generous bound: with the bridge backend a build takes only
    # ~0.17 s, and a clean-clone CI run saw the reset at 0.093 s, 0.55 of it)
    assert second["phases"]["build"] < first["phases"]["build"]
    # the kept testbed went with the sweep (this process's state records only: other
    # testbed processes on the machine keep theirs)
    assert not list(STATE_DIR.glob(f"run-*-{os.getpid()}.json"))


def test_runs_that_differ_only_in_congestion_control_share_a_testbed(tmp_path):
    """Congestion control is set on each socket, not in the namespace: a kept
    testbed carries the next run's choice, and its sockets use it."""
    (tmp_path / "s.toml").write_text(FAST.replace("repetitions = 2", "repetitions = 1") + """
[grid]
"hosts.client.congestion_control" = ["cubic", "bbr"]
""")
    summary = sweep(scenario.load(tmp_path / "s.toml"), tmp_path / "store", progress=False)
    assert summary.done == {"complete": 2}
    runs = sorted(zip(summary.run_dirs, _manifests(summary)), key=lambda r: r[1]["testbed_reuse"]["reused"])
    assert [m["testbed_reuse"]["reused"] for _, m in runs] == [False, True]
    for run_dir, m in runs:
        wanted = m["scenario"]["hosts"]["client"]["congestion_control"]
        used = json.loads((run_dir / "raw/raw/app-client.json").read_text())["cc"]
        assert (used, m["testbed"]["congestion_control"]["client"]) == (wanted, wanted)
    assert {m["scenario"]["hosts"]["client"]["congestion_control"] for _, m in runs} == {"cubic", "bbr"}


def test_a_reset_cut_short_leaves_no_testbed(tmp_path, monkeypatch):
    """Ctrl-C (or the run's timer) while the kept testbed is being reset between
    two runs: the testbed is torn down, not lost between kept and in use."""
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Testbed, "reset", interrupted)
    (tmp_path / "s.toml").write_text(FAST)
    with pytest.raises(KeyboardInterrupt):
        sweep(scenario.load(tmp_path / "s.toml"), tmp_path / "store", progress=False)
    assert not list(STATE_DIR.glob(f"run-*-{os.getpid()}.json"))


def test_a_reset_that_does_not_verify_gets_a_fresh_testbed(tmp_path, monkeypatch):
    monkeypatch.setattr(Testbed, "reset", lambda self: ["link wifi up: delay 40 ms (spec 0 ms)"])
    (tmp_path / "s.toml").write_text(FAST)
    summary = sweep(scenario.load(tmp_path / "s.toml"), tmp_path / "store", progress=False)
    assert summary.done == {"complete": 2}
    second = _manifests(summary)[1]
    assert second["testbed_reuse"] == {
        "reused": False, "reason": "reset did not verify: link wifi up: delay 40 ms (spec 0 ms)"}


@pytest.fixture
def userspace_tb():
    from testbed.core.model import HostSettings

    with Testbed(load("two-path", wifi_delay_ms=2, lte_delay_ms=2),
                 client=HostSettings(path_manager="userspace")) as bed:
        yield bed


def test_a_userspace_pm_testbed_resets_what_a_run_leaves_in_the_kernel(userspace_tb):
    tb = userspace_tb
    assert tb.reset_problems() == []
    router, wifi = tb.router, tb.path("wifi")
    # What an establishment run (or anything behind the testbed's back) may leave:
    pm.add_endpoints(tb.client.pid, [pm.Endpoint(wifi.addr.client, wifi.client_if,
                                                 ("subflow",), id=9)])  # RobE's join=kernel
    run_command(tb.client.pid, ["ip", "link", "set", wifi.client_if, "down"])  # drops static ARP
    run_command(tb.client.pid, ["ip", "link", "set", wifi.client_if, "up"])
    run_command(tb.client.pid, ["ip", "route", "replace", "default", "via", wifi.addr.far])
    run_command(tb.client.pid, ["ip", "route", "replace", "default", "via", wifi.addr.far,
                                "table", str(wifi.addr.table)])
    run_command(tb.client.pid, ["ip", "neigh", "add", "10.250.0.9", "lladdr", "02:00:00:00:00:09",
                                "dev", wifi.client_if, "nud", "stale"])
    nft = ("table inet behind_back {\n chain f {\n  type filter hook forward priority 0;\n"
           "  ct state new counter\n }\n}\n")
    assert run_command(router.pid, ["nft", "-f", "-"], input=nft).returncode == 0
    assert run_command(tb.client.pid, ["ping", "-c1", "-W2", tb.server_addr]).returncode == 0
    held = tb.in_ns(tb.client, mptcp_socket)  # a connection a leaking thread still holds
    ls = tb.in_ns(tb.server, lambda: listener(7103))
    held.connect((tb.server_addr, 7103))
    accepted, _ = ls.accept()
    problems = "\n".join(tb.reset_problems())
    for expected in ("c: endpoints", "static neighbours missing: 10.1.0.2 on c-wifi", "10.250.0.9 (a fresh",
                     "nftables rules", "conntrack entries", "c: connections still open"):
        assert expected in problems, expected

    run_command(router.pid, ["nft", "delete", "table", "inet", "behind_back"])  # conntrack stays
    left = tb.reset()  # the held MPTCP connection survives at both ends: it cannot verify
    assert [line.split(" (")[0] for line in left] == [
        "c: connections still open: mptcp ESTAB", "s: connections still open: mptcp ESTAB"], left
    for s in (held, accepted, ls):
        s.close()
    assert tb.reset() == []
    assert _connects(tb, 7104)


CALIBRATED = """
experiment = "throughput"
repetitions = 3
seed = 4
timeout_s = 90
backend = "userspace"
calibrate = true
calibrate_every = 10
void_retries = {retries}
[topology]
name = "two-path"
params = { rate_mbit = 10, wifi_delay_ms = 5, lte_delay_ms = 5 }
[params]
seconds = 1.5
"""


@pytest.mark.parametrize("retries", [0, 1])
def test_calibrated_runs_between_calibrations_get_a_drift_check_that_catches_drift(
        tmp_path, monkeypatch, retries):
    resets = []
    original = Testbed.reset

    def reset_then_perturb(self):
        problems = original(self)
        resets.append(self)
        if len(resets) == 2:  # before the third run: wifi's emulator slower, its record not
            link = self.link("wifi")
            self.backend.update(link, "up", link.up.model_copy(update={"delay_ms": 15}))
        return problems

    monkeypatch.setattr(Testbed, "reset", reset_then_perturb)
    (tmp_path / "s.toml").write_text(CALIBRATED.replace("{retries}", str(retries)))
    summary = sweep(scenario.load(tmp_path / "s.toml"), tmp_path / "store", progress=False)
    runs = _manifests(summary)
    # A voided run is run again on a testbed built afresh.
    assert [m["testbed_reuse"]["reused"] for m in runs] == [False, True, not retries]
    cals = [m["emulation"]["calibration"] for m in runs]
    if retries:  # the voided run is run again on a new testbed (without the drift), calibrated fully
        [voided] = runs[2]["voided_attempts"]
        assert voided["reason"].startswith("drift check (2 runs after the calibration): wifi: RTT ")
        assert (cals[2]["kind"], runs[2]["status"]) == ("full", "complete"), runs[2]["reason"]
        return
    assert [(c["kind"], c["runs_since_full"], c["every"]) for c in cals] == [
        ("full", 0, 10), ("drift_check", 1, 10), ("drift_check", 2, 10)]
    assert [m["status"] for m in runs] == ["complete", "complete", "invalid"], runs[2]["reason"]
    assert runs[1]["phases"]["calibrate"] < 0.25 * runs[0]["phases"]["calibrate"]
    reason = runs[2]["reason"]
    assert reason.startswith("drift check (2 runs after the calibration): wifi: RTT ")
    assert "configured 10 ms (bound +-" in reason and "lte" not in reason
    assert cals[2]["paths"]["wifi"]["rtt_mean_ms"] > 18  # 10 ms more one way
