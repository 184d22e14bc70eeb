"""path_manager = "mptcpd": the in-kernel path manager driven by Debian's mptcpd,
started inside the host's namespace with the testbed and stopped with it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from testbed.core import mptcp_config
from testbed.core.bulk import bulk_transfer
from testbed.core.model import HostSettings
from testbed.core.net import Testbed
from testbed.core.topology import load
from testbed.mptcp import pm

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def test_model_accepts_mptcpd_and_pins_the_in_kernel_pm():
    s = HostSettings(path_manager="mptcpd")
    assert s.sysctls()["net.mptcp.path_manager"] == "kernel"
    with pytest.raises(ValidationError):
        HostSettings(path_manager="mptcpd2")


def test_mptcpd_adds_the_client_endpoints_and_joins_then_goes_with_the_testbed():
    own = os.readlink("/proc/self/ns/net")
    host_endpoints = pm.endpoints(os.getpid())
    topo = load("two-path", wifi_delay_ms=0, lte_delay_ms=0, rate_mbit=20)
    with Testbed(topo, backend="bridge", client=HostSettings(path_manager="mptcpd")) as tb:
        daemons = tb.mptcpd_pids()
        assert list(daemons) == [tb.client.name]
        pid = daemons[tb.client.name]
        assert _alive(pid) and os.readlink(f"/proc/{pid}/ns/net") == os.readlink(f"/proc/{tb.client.pid}/ns/net") != own
        # mptcpd (not the testbed) made a subflow endpoint for each client address.
        eps = {e.addr: e.flags for e in pm.endpoints(tb.client.pid)}
        for p in tb.paths:
            assert "subflow" in eps.get(p.addr.client, ()), eps
        result = bulk_transfer(tb, seconds=3, warmup=1)
        assert result.subflows >= 1, result  # the join went through mptcpd's endpoint
        assert all(v > 0 for v in result.path_goodput_mbit.values()), result
        desc = tb.describe()["hosts"]["client"]
        assert desc["mptcpd"]["pid"] == pid and desc["mptcpd"]["version"]
    assert not _alive(pid), "mptcpd outlived its testbed"
    assert pm.endpoints(os.getpid()) == host_endpoints  # the host's own PM untouched


def test_missing_mptcpd_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(mptcp_config, "MPTCPD", "/nonexistent/mptcpd")
    topo = load("two-path", wifi_delay_ms=0, lte_delay_ms=0)
    with pytest.raises(Exception, match="mptcpd .*not installed") as info:
        with Testbed(topo, backend="bridge", client=HostSettings(path_manager="mptcpd")):
            pass
    assert len(str(info.value).splitlines()) == 1
