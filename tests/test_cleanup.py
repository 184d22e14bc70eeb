"""Nothing leaks: after normal teardown, an exception, SIGINT, SIGTERM, and
after kill -9 followed by `invoke clean`. Other people's processes named like
Mininet's survive."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT, run_tb
from testbed.core.net import Testbed
from testbed.core.state import STATE_DIR
from testbed.core.topology import load

pytestmark = pytest.mark.root


def footprint() -> dict:
    """What exists outside our processes: namespaces in use, root-namespace
    interfaces, qdiscs and nft tables, state files."""
    netns = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                netns.add(os.readlink(f"/proc/{pid}/ns/net"))
            except OSError:
                pass
    sh = lambda cmd: subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout
    return {"netns": netns, "links": sh("ip -o link show | cut -d: -f2"),
            "qdiscs": sh("tc qdisc show"), "nft": sh("nft list tables"),
            "state": sorted(p.name for p in STATE_DIR.glob("*.json")) if STATE_DIR.exists() else []}


def assert_no_leak(before: dict) -> None:
    deadline = time.time() + 5
    while time.time() < deadline and footprint()["netns"] - before["netns"]:
        time.sleep(0.1)
    after = footprint()
    assert after["netns"] - before["netns"] == set(), "network namespaces left behind"
    for key in ("links", "qdiscs", "nft", "state"):
        assert after[key] == before[key], f"{key} changed"


def test_normal_teardown_leaves_nothing():
    before = footprint()
    with Testbed(load("two-path", wifi_delay_ms=0, lte_delay_ms=0), backend="bridge") as tb:
        tb.client.cmd("sleep 300 &")  # a stray process started inside the namespace
        assert len(footprint()["netns"] - before["netns"]) >= 5
    assert_no_leak(before)


def test_exception_inside_with_block_leaves_nothing():
    before = footprint()
    with pytest.raises(RuntimeError):
        with Testbed(load("n-path", n=3, delay_ms=0), backend="bridge"):
            raise RuntimeError("experiment bug")
    assert_no_leak(before)


def test_failure_during_build_leaves_nothing():
    before = footprint()
    with pytest.raises(Exception):
        with Testbed(load("two-path", wifi_delay_ms=0, lte_delay_ms=0), backend="bridge") as tb:
            pass
        tb.set_path_state("nope", False)
    assert_no_leak(before)


RUNNER = textwrap.dedent("""
    import sys, time
    from testbed.core.net import Testbed
    from testbed.core.topology import load
    with Testbed(load("two-path", wifi_delay_ms=0, lte_delay_ms=0), backend="bridge") as tb:
        tb.client.cmd("sleep 300 &")
        # Like an emulator or traffic process: its own session, outlives a kill -9.
        tb.popen(tb.server, ["sleep", "300"])
        print("up", flush=True)
        time.sleep(120)
""")


def start_runner() -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", RUNNER], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up"
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_unwinds_and_cleans(sig):
    before = footprint()
    proc = start_runner()
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert_no_leak(before)


def test_kill9_then_invoke_clean_spares_foreign_processes():
    before = footprint()
    # Someone else's process named like a Mininet shell: must survive `clean`.
    foreign = subprocess.Popen(["bash", "-c", "exec -a mininet:x sleep 600"])
    try:
        proc = start_runner()
        proc.kill()
        proc.wait(timeout=10)
        assert footprint()["netns"] - before["netns"], "the kill -9 left nothing to clean?"
        res = run_tb("clean", timeout=60)
        assert res.returncode == 0, res.stderr
        assert "removed 1 crashed run" in res.stdout
        assert_no_leak(before)
        assert foreign.poll() is None, "clean killed a process it did not start"
    finally:
        foreign.kill()
        foreign.wait()
