"""Shared test helpers. Root tests are skipped only outside CI: in CI (root)
they must run, and a non-root CI run fails loudly instead of skipping."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0
IN_CI = os.environ.get("CI") == "true"


def pytest_collection_modifyitems(config, items):
    if IS_ROOT:
        return
    if IN_CI:
        raise pytest.UsageError("CI must run the integration tests as root")
    skip = pytest.mark.skip(reason="needs root (network namespaces)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def default_sigint() -> None:
    """preexec_fn for a child a test stops with SIGINT: SIGINT at its default there.
    A test run started in the background (a CI job, `cmd &`) inherits SIGINT
    ignored, and a Python child then never gets its KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_tb(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run an invoke task the way a user does (without re-running bootstrap)."""
    invoke = Path(sys.executable).parent / "invoke"
    return subprocess.run([str(invoke), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, **kw)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def ping_ok(node, src: str, dst: str, count: int = 1) -> bool:
    out = node.cmd(f"ping -n -q -c {count} -W 2 -I {src} {dst}")
    return f"{count} received" in out


def assert_connectivity(tb) -> None:
    """Every path reaches the server from its own source address."""
    for p in tb.paths:
        assert ping_ok(tb.client, p.addr.client, tb.server_addr), f"path {p.name} has no connectivity"


def establishment_sweep(*, calibrate: bool, trial_timeout_s: float, strategies: list[str],
                        repetitions: int = 1) -> str:
    """A small establishment scenario (strategies x healthy/blackhole on two-path) as TOML text."""
    names = ", ".join(f'"{s}"' for s in strategies)
    return f"""\
experiment = "establishment"
repetitions = {repetitions}
seed = 5
timeout_s = 60
calibrate = {str(calibrate).lower()}

[topology]
name = "two-path"
params = {{ rate_mbit = 20, wifi_delay_ms = 10, lte_delay_ms = 20 }}

[hosts.client]
path_manager = "userspace"

[params]
timeout_s = {trial_timeout_s:g}

[grid]
"params.strategy" = [{names}]
"params.condition" = ["healthy", "blackhole"]
"""

