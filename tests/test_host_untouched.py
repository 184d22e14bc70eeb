"""The host stays byte-for-byte unchanged: building and running a testbed,
`doctor` and `clean` change no sysctl outside the project's own namespaces.

Two views: the real host namespace (a snapshot of every readable file under
/proc/sys/net plus kernel.pty.max, before and after), and a stand-in host: a
fresh namespace whose buffer sysctls are set to values nothing in the project
writes, so that a write there cannot hide behind a value the host already has.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, run_tb
from testbed.core.net import NAMESPACE_SYSCTLS, Testbed
from testbed.core.topology import load

pytestmark = pytest.mark.root

SNAPSHOT = textwrap.dedent('''
    import os

    def snapshot() -> dict:
        """Every readable sysctl under /proc/sys/net of this namespace, and kernel.pty.max."""
        out = {}
        for d, _, files in os.walk("/proc/sys/net"):
            for f in files:
                p = os.path.join(d, f)
                if not os.stat(p).st_mode & 0o222:
                    continue  # read-only: a counter (nf_conntrack_count), not a setting
                try:
                    with open(p) as fh:
                        out[p] = fh.read()
                except OSError:  # write-only or unreadable (e.g. stable_secret unset)
                    pass
        with open("/proc/sys/kernel/pty/max") as fh:
            out["/proc/sys/kernel/pty/max"] = fh.read()
        return out

    def changed(before: dict, after: dict) -> dict:
        return {k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after))
                if before.get(k) != after.get(k)}
''')
exec(SNAPSHOT)  # the same snapshot here and in the stand-in host below


def host_links() -> str:
    return subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout


def test_testbed_run_doctor_and_clean_leave_host_sysctls_unchanged():
    before, links = snapshot(), host_links()  # noqa: F821 - defined by exec above
    with Testbed(load("two-path", wifi_delay_ms=1, lte_delay_ms=1), backend="userspace") as tb:
        out = tb.client.cmd(f"ping -n -q -c 2 -W 2 {tb.server_addr}")
        assert "2 received" in out
    assert changed(before, snapshot()) == {}, "a testbed run changed host sysctls"  # noqa: F821
    res = run_tb("doctor", timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert changed(before, snapshot()) == {}, "doctor changed host sysctls"  # noqa: F821
    res = run_tb("clean", timeout=60)
    assert res.returncode == 0, res.stderr
    assert changed(before, snapshot()) == {}, "clean changed host sysctls"  # noqa: F821
    assert host_links() == links


STANDIN = SNAPSHOT + textwrap.dedent('''
    import json, sys
    # Values nothing in the project writes (a stock kernel's), so any write shows.
    # (net.core.rmem_max/wmem_max are host-wide and read-only in a namespace.)
    STOCK = {"net/ipv4/tcp_rmem": "4096 131072 6291456", "net/ipv4/tcp_wmem": "4096 16384 4194304",
             "net/mptcp/enabled": "0"}
    for name, value in STOCK.items():
        with open("/proc/sys/" + name, "w") as f:
            f.write(value)
    before = snapshot()
    result = {}
    if sys.argv[1] == "testbed":
        from testbed.base.netns import read_sysctl
        from testbed.core.net import Testbed
        from testbed.core.topology import load
        with Testbed(load("two-path", wifi_delay_ms=0, lte_delay_ms=0), backend="bridge") as tb:
            result["inside"] = {n.name: read_sysctl(n.pid, ["net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"])
                                for n in tb.nodes.values()}
    else:
        from testbed.tools.doctor import run_checks
        result["checks"] = {c.name: c.ok for c in run_checks()}
    result["changed"] = changed(before, snapshot())
    import subprocess
    result["links"] = subprocess.run(["ip", "-o", "link", "show"], capture_output=True,
                                     text=True).stdout.splitlines()
    print(json.dumps(result))
''')


def in_standin_host(what: str, env: dict | None = None) -> dict:
    """Run STANDIN (a testbed or doctor) in a fresh namespace standing in for the host."""
    res = subprocess.run(["unshare", "--net", sys.executable, "-c", STANDIN, what], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_testbed_writes_sysctls_only_in_its_own_namespaces():
    """Mininet's init() overwrote tcp_rmem/tcp_wmem (and raised host-wide limits)
    in the namespace it was started from; the nodes now get the project's values
    in their own namespaces, whatever the starting namespace has."""
    result = in_standin_host("testbed")
    assert result["changed"] == {}, result["changed"]
    assert len(result["links"]) == 1, result["links"]  # lo only: nothing left behind
    for node, values in result["inside"].items():
        assert values["net.ipv4.tcp_rmem"].split() == NAMESPACE_SYSCTLS["net.ipv4.tcp_rmem"].split(), node
        assert values["net.ipv4.tcp_wmem"].split() == NAMESPACE_SYSCTLS["net.ipv4.tcp_wmem"].split(), node


def test_doctor_probes_in_a_namespace_that_is_certainly_new(tmp_path: Path):
    """An `unshare` slow to switch namespaces (a loaded machine) must not turn
    doctor's probes (net.mptcp.enabled=1, veths dr0/dr1) onto the namespace doctor
    runs in."""
    slow = tmp_path / "unshare"
    slow.write_text(f"#!/bin/sh\nsleep 0.5\nexec {subprocess.check_output(['which', 'unshare'], text=True).strip()} \"$@\"\n")
    slow.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    result = in_standin_host("doctor", env=env)
    assert result["changed"] == {}, result["changed"]
    assert len(result["links"]) == 1, result["links"]  # lo only: no dr0/dr1
    assert result["checks"]["per-namespace MPTCP sysctls + socket"]
    assert result["checks"]["offloads can be turned off on veth"]
