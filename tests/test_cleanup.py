"""Nothing leaks: after normal teardown, an exception, a failure mid-build,
SIGINT, SIGTERM, SIGHUP and SIGALRM (also when they arrive during teardown), a
failing teardown step, and after kill -9 followed by `invoke clean` (also when
a node's shell died, a namespace is held only by a descriptor, or a recorded
PID now belongs to someone else). Other people's processes survive."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT, assert_one_line_error, run_tb
from testbed.base.errors import TestbedError
from testbed.core import net as net_module
from testbed.core import state
from testbed.core.net import Testbed
from testbed.core.state import STATE_DIR, start_time
from testbed.core.topology import load

pytestmark = pytest.mark.root


def footprint() -> dict:
    """What exists outside our processes: namespaces in use (by a process or
    held by a descriptor), root-namespace interfaces, qdiscs and nft tables,
    state files."""
    netns = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                netns.add(os.readlink(f"/proc/{pid}/ns/net"))
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("net:["):
                        netns.add(target)
            except OSError:
                pass
    sh = lambda cmd: subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout
    return {"netns": netns, "links": sh("ip -o link show | cut -d: -f2"),
            "qdiscs": sh("tc qdisc show"), "nft": sh("nft list tables"),
            "state": sorted(p.name for p in STATE_DIR.glob("*")) if STATE_DIR.exists() else []}


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


def test_failure_during_build_leaves_nothing(monkeypatch):
    """A real failure half-way through the build (nodes, links and addresses
    exist, MPTCP not yet configured) tears down what was built."""
    before, built = footprint(), {}

    def fail_mid_build(self):
        built["netns"] = len(footprint()["netns"] - before["netns"])
        raise RuntimeError("injected: MPTCP configuration failed")

    monkeypatch.setattr(Testbed, "_configure_mptcp", fail_mid_build)
    with pytest.raises(RuntimeError, match="injected"):
        with Testbed(load("two-path", wifi_delay_ms=0, lte_delay_ms=0), backend="userspace"):
            pytest.fail("the build went through")
    assert built["netns"] >= 5, "the failure did not land mid-build"
    assert_no_leak(before)


class Timeout(Exception):
    """What the runner's SIGALRM handler raises."""


@pytest.mark.parametrize("sig, raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SystemExit),
                                         (signal.SIGHUP, SystemExit), (signal.SIGALRM, Timeout)])
def test_signal_arriving_during_teardown_is_delivered_after_it(monkeypatch, sig, raised):
    """Ctrl-C, kill, a closed terminal or the per-run timer landing in the
    middle of stop() (here: while the link emulation stops) must not leave a
    half-torn-down testbed; the signal takes effect once teardown is done."""
    def raise_(exc):
        def handler(signum, frame):
            raise exc
        return handler

    old = {s: signal.signal(s, raise_(e)) for s, e in
           [(signal.SIGALRM, Timeout()), (signal.SIGHUP, SystemExit(129))]}
    before = footprint()
    try:
        with pytest.raises(raised):
            with Testbed(load("two-path", wifi_delay_ms=1, lte_delay_ms=1), backend="userspace") as tb:
                real = tb.backend.stop_many

                def stop_many_interrupted(links):
                    os.kill(os.getpid(), sig)
                    time.sleep(0.05)  # an unheld signal has surely been handled by now
                    real(links)

                monkeypatch.setattr(tb.backend, "stop_many", stop_many_interrupted)
        assert_no_leak(before)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_a_failing_teardown_step_does_not_stop_the_others(monkeypatch):
    before = footprint()
    tb = Testbed(load("two-path", wifi_delay_ms=1, lte_delay_ms=1), backend="userspace")
    with pytest.raises(TestbedError, match="link emulation: RuntimeError: injected"):
        with tb:
            def broken(links):
                raise RuntimeError("injected")
            monkeypatch.setattr(tb.backend, "stop_many", broken)
    assert_no_leak(before)  # the forwarders went with the namespaces' other processes


def test_state_file_stays_while_a_recorded_process_survives(monkeypatch):
    tb = Testbed(load("two-path", wifi_delay_ms=0, lte_delay_ms=0), backend="bridge")
    tb.__enter__()
    path = tb._state.path
    # In the client's namespace, immune to the shell's SIGHUP; spared below
    # like a process stuck in the kernel.
    stuck = int(tb.client.cmd("nohup sleep 300 >/dev/null 2>&1 & echo $!").split()[-1])
    stuck_start = start_time(stuck)
    real = net_module.end_recorded

    def spare_stuck(pids, timeout=5.0):
        return real([p for p in pids if p[0] != stuck], timeout) + \
            [p for p, _ in pids if p == stuck and state.alive(p, start_time(p))]

    monkeypatch.setattr(net_module, "end_recorded", spare_stuck)
    with pytest.raises(TestbedError, match=f"still running: PIDs {stuck}.*kept"):
        tb.stop()
    assert path.exists(), "state file removed while a process of the testbed survives"
    monkeypatch.undo()
    tb.stop()  # the retry ends it and only then removes the record
    assert not path.exists() and not state.alive(stuck, stuck_start)


RUNNER = textwrap.dedent("""
    import json, sys, time
    from testbed.core.net import Testbed
    from testbed.core.topology import load
    with Testbed(load("two-path", wifi_delay_ms=0, lte_delay_ms=0), backend="bridge") as tb:
        tb.client.cmd("sleep 300 &")
        tb.client.cmd("nohup sleep 301 >/dev/null 2>&1 &")  # immune to the shell's hangup
        # Like an emulator or traffic process: its own session, outlives a kill -9.
        tb.popen(tb.server, ["sleep", "300"])
        print(json.dumps({"state": str(tb._state.path),
                          "nodes": {n.name: n.pid for n in tb.nodes.values()}}), flush=True)
        time.sleep(120)
""")


def start_runner() -> tuple[subprocess.Popen, dict]:
    """A process holding a testbed; returns it and its state file and node PIDs."""
    proc = subprocess.Popen([sys.executable, "-c", RUNNER], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    return proc, json.loads(proc.stdout.readline())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_unwinds_and_cleans(sig):
    before = footprint()
    proc, _ = start_runner()
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert_no_leak(before)


def clean_slate() -> dict:
    """Clean what earlier crashed runs left (a test's own count of crashed runs
    must not include them), then return the footprint."""
    res = run_tb("clean", timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    return footprint()


def kill9(proc: subprocess.Popen, before: dict) -> None:
    proc.kill()
    proc.wait(timeout=10)
    assert footprint()["netns"] - before["netns"], "the kill -9 left nothing to clean?"


def test_kill9_then_invoke_clean_spares_foreign_processes():
    before = clean_slate()
    # Someone else's process named like a Mininet shell: must survive `clean`.
    foreign = subprocess.Popen(["bash", "-c", "exec -a mininet:x sleep 600"])
    # And one that now has a PID the record names (the recorded process ended
    # and its PID was reused): same PID, another start time.
    reused = subprocess.Popen(["sleep", "600"])
    try:
        proc, info = start_runner()
        kill9(proc, before)
        record = json.loads(Path(info["state"]).read_text())
        record["pids"].append([reused.pid, start_time(reused.pid) - 1])
        Path(info["state"]).write_text(json.dumps(record))
        res = run_tb("clean", timeout=60)
        assert res.returncode == 0, res.stderr
        assert "removed 1 crashed run" in res.stdout
        assert_no_leak(before)
        assert foreign.poll() is None, "clean killed a process it did not start"
        assert reused.poll() is None, "clean killed a process that reused a recorded PID"
    finally:
        for p in (foreign, reused):
            p.kill()
            p.wait()


def test_clean_removes_a_state_record_its_writer_left_half_written():
    """A runner killed while writing its state record leaves the temporary file
    (empty, as found here); with no record beside it, nothing else names it."""
    clean_slate()
    old, fresh = STATE_DIR / "run-halfwritten-old.tmp", STATE_DIR / "run-halfwritten-now.tmp"
    try:
        for f in (old, fresh):
            f.write_text("")
        past = time.time() - 3600
        os.utime(old, (past, past))
        state.clean_stale()
        assert not old.exists()
        assert fresh.exists(), "a record being written right now was removed"
    finally:
        for f in (old, fresh):
            f.unlink(missing_ok=True)


def test_clean_reads_the_newer_record_a_killed_writer_left_unrenamed():
    """Killed between writing its next record and renaming it, a runner leaves
    the newer record (with the process it had just started) in the .tmp: clean
    ends that process too."""
    clean_slate()
    started = subprocess.Popen(["sleep", "600"])
    record = {"run_id": "run-unrenamed-1", "owner": [started.pid, 1],  # not that process: gone
              "created": time.time(), "pids": [], "netns": []}
    path = STATE_DIR / "run-unrenamed-1.json"
    try:
        state.state_dir()
        path.write_text(json.dumps(record))
        path.with_suffix(".tmp").write_text(json.dumps(
            {**record, "pids": [[started.pid, start_time(started.pid)]]}))
        report = state.clean_stale()
        assert report.removed == ["run-unrenamed-1"], report
        assert started.wait(timeout=10) == -signal.SIGKILL
        assert not path.exists() and not path.with_suffix(".tmp").exists()
    finally:
        started.kill()
        started.wait()
        path.unlink(missing_ok=True)
        path.with_suffix(".tmp").unlink(missing_ok=True)


def test_clean_finds_a_namespace_whose_shell_died():
    """The client's shell is gone but a command it started still runs in the
    client's namespace: no live recorded process leads there any more."""
    before = clean_slate()
    proc, info = start_runner()
    os.kill(info["nodes"]["c"], signal.SIGKILL)
    kill9(proc, before)
    res = run_tb("clean", timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "removed 1 crashed run" in res.stdout
    assert_no_leak(before)


def test_clean_finds_a_namespace_held_only_by_a_descriptor():
    """A process that is not ours keeps an emulator's namespace open: clean
    does not kill it, but empties the namespace (its bridge goes) and keeps the
    record until the namespace is gone."""
    before = clean_slate()
    proc, info = start_runner()
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time; "
                               "fd = os.open(sys.argv[1], os.O_RDONLY); print(fd, flush=True); time.sleep(600)",
                               f"/proc/{info['nodes']['x1']}/ns/net"], stdout=subprocess.PIPE, text=True)
    held = f"/proc/{holder.pid}/fd/{holder.stdout.readline().strip()}"
    try:
        kill9(proc, before)
        res = run_tb("clean", timeout=60)
        assert res.returncode == 1, res.stdout + res.stderr
        assert f"held open by PID {holder.pid}" in res.stdout, res.stdout
        links = subprocess.run(["nsenter", f"--net={held}", "ip", "-o", "link", "show"],
                               capture_output=True, text=True, check=True).stdout.splitlines()
        assert [line.split(":")[1].strip() for line in links] == ["lo"]
        assert holder.poll() is None, "clean killed a process it did not start"
        assert Path(info["state"]).exists(), "record removed while its namespace lives"
    finally:
        holder.kill()
        holder.wait()
    res = run_tb("clean", timeout=60)
    assert "removed 1 crashed run" in res.stdout, res.stdout + res.stderr
    assert_no_leak(before)


NEVER_HOST = textwrap.dedent("""
    import json, sys
    from testbed.core.state import namespace_members, start_time
    pid = int(sys.argv[1])
    print(json.dumps([p for p, _ in namespace_members([[pid, start_time(pid)]])]))
""")


def test_clean_never_takes_pid1s_namespace_for_ours():
    """Run from another namespace (a container, `ip netns exec`), a record that
    leads to a process in the host's namespace must not make every process of
    the host a member of "our" namespaces."""
    host_process = subprocess.Popen(["sleep", "600"])
    try:
        res = subprocess.run(["unshare", "--net", sys.executable, "-c", NEVER_HOST,
                              str(host_process.pid)], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        members = json.loads(res.stdout)
        assert members == [], f"{len(members)} processes of the host taken for ours"
    finally:
        host_process.kill()
        host_process.wait()


@pytest.mark.parametrize("mode", [0o777, 0o775])
def test_clean_and_testbed_refuse_a_state_directory_others_can_write(tmp_path, mode):
    unsafe = tmp_path / "state"
    unsafe.mkdir()
    unsafe.chmod(mode)
    env = {**os.environ, "MPTB_STATE_DIR": str(unsafe)}
    res = run_tb("clean", env=env, timeout=60)
    assert_one_line_error(res, str(unsafe), f"{mode:04o}", "owned by root")
    build = subprocess.run([sys.executable, "-c", "from testbed.core.net import Testbed; "
                            "from testbed.core.topology import load; Testbed(load('two-path')).start()"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert build.returncode != 0 and "owned by root" in build.stderr
    assert list(unsafe.iterdir()) == [], "a record was written into an unsafe directory"


def test_processes_are_signalled_through_pidfds(monkeypatch):
    """The PID checked is the process signalled: no os.kill by number."""
    victim = subprocess.Popen(["sleep", "600"])

    def no_kill(pid, sig):
        raise AssertionError("os.kill used where a pidfd exists")

    monkeypatch.setattr(state.os, "kill", no_kill)
    assert state.kill_recorded([[victim.pid, start_time(victim.pid)]]) == 1
    assert victim.wait(timeout=5) == -signal.SIGKILL
