"""The one way to run a program in a network namespace (testbed.base.netns)."""
from __future__ import annotations

import pytest

from testbed.base.netns import ScratchNetns, run_command, start_command

pytestmark = pytest.mark.root


def _links(out: str) -> list[str]:
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def test_commands_run_in_the_namespace_named_by_file_or_by_pid():
    with ScratchNetns() as scratch:
        res = run_command(scratch.path, ["ip", "-o", "link", "show"])
        assert res.returncode == 0, res.stderr
        assert _links(res.stdout) == ["lo"]  # a fresh namespace, not the host's
        holder = start_command(scratch.path, ["sleep", "30"])
        try:
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
