"""The one way to run a program in a network namespace (testbed.base.netns)."""
from __future__ import annotations

import os
import subprocess
import threading

import pytest

from testbed.base.netns import ScratchNetns, realtime_thread, run_command, run_in_netns, start_command

pytestmark = pytest.mark.root


def _links(out: str) -> list[str]:
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def test_commands_run_in_the_namespace_named_by_file_or_by_pid():
    with ScratchNetns() as scratch:
        res = run_command(scratch.path, ["ip", "-o", "link", "show"])
        assert res.returncode == 0, res.stderr
        assert _links(res.stdout) == ["lo"]  # a fresh namespace, not the host's
        # Its PID names the namespace only once nsenter has entered it: wait for
        # the line the shell prints there (read at once, the host's was seen).
        holder = start_command(scratch.path, ["sh", "-c", "echo in; exec sleep 30"],
                               stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline() == "in\n"
            res = run_command(holder.pid, ["ip", "-o", "link", "show"])
            assert _links(res.stdout) == ["lo"], res.stdout
            made = run_command(holder.pid, ["ip", "link", "add", "tn0", "type", "veth", "peer", "name", "tn1"])
            assert made.returncode == 0, made.stderr
            assert "tn0" in _links(run_command(scratch.path, ["ip", "-o", "link", "show"]).stdout)
        finally:
            holder.kill()
            holder.wait()


def test_offloads_are_turned_off_and_read_back():
    from testbed.core.emulation.offloads import disable_offloads, offload_state

    with ScratchNetns() as scratch:
        assert run_command(scratch.path, ["ip", "link", "add", "of0", "type", "veth",
                                          "peer", "name", "of1"]).returncode == 0
        assert set(offload_state(scratch.path, "of0").values()) != {"off"}  # veth starts with them on
        disable_offloads(scratch.path, ["of0", "of1"])
        assert set(offload_state(scratch.path, "of0").values()) == {"off"}
        assert set(offload_state(scratch.path, "of1").values()) == {"off"}


RESET_ON_FORK = getattr(os, "SCHED_RESET_ON_FORK", 0)


def _in_a_real_time_thread(fn) -> dict:
    """fn(seen) in a new thread made SCHED_FIFO by realtime_thread(); skips the
    test where that is not permitted (not root, or no CAP_SYS_NICE)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (CAP_SYS_NICE)")
    seen: dict[str, object] = {}

    def body() -> None:
        seen["realtime"] = realtime_thread()
        fn(seen)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if not seen["realtime"]:
        pytest.skip("SCHED_FIFO not permitted here (no CAP_SYS_NICE)")
    return seen


def test_a_real_time_thread_starts_its_children_at_normal_priority():
    """A command the events thread starts (ip, nft, tc) must not inherit its
    SCHED_FIFO: a child busy at real-time priority would hold off the runner
    and every other process that is not real-time."""
    def child_policy(seen: dict) -> None:
        # Field 41 of /proc/PID/stat is the scheduling policy (0 normal, 1 FIFO).
        stat = subprocess.run(["cat", "/proc/self/stat"], capture_output=True, text=True).stdout
        seen["child"] = int(stat.rsplit(")", 1)[1].split()[38])
        seen["thread"] = os.sched_getscheduler(0) & ~RESET_ON_FORK

    seen = _in_a_real_time_thread(child_policy)
    assert seen["thread"] == os.SCHED_FIFO, seen
    assert seen["child"] == os.SCHED_OTHER, seen


def test_a_real_time_thread_does_its_namespace_work_at_its_own_priority():
    """The events thread's netlink work in a namespace (the backup flag, a second
    client's link) runs in a helper thread: it keeps the caller's SCHED_FIFO,
    though a new thread, like a child, would start at normal priority."""
    def caller(seen: dict) -> None:
        seen["helper"] = run_in_netns(os.getpid(), lambda: os.sched_getscheduler(0) & ~RESET_ON_FORK)

    seen = _in_a_real_time_thread(caller)
    assert seen["helper"] == os.SCHED_FIFO, seen
