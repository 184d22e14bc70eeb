"""Host settings on kernels that lack newer MPTCP knobs (Debian 12: 6.1,
Ubuntu 24.04: 6.8): translated or skipped at the default, refused otherwise."""
from __future__ import annotations

import pytest

from testbed.base.errors import TestbedError
from testbed.core.model import HostSettings
from testbed.core import mptcp_config as config

LINUX_6_1 = ["net.mptcp." + k for k in (
    "enabled", "add_addr_timeout", "checksum_enabled", "allow_join_initial_addr_port",
    "pm_type", "stale_loss_cnt")]


@pytest.fixture
def old_kernel(monkeypatch):
    written: dict = {}
    monkeypatch.setattr(config, "run_in_netns", lambda pid, fn: LINUX_6_1)
    monkeypatch.setattr(config, "write_sysctl", lambda pid, values: written.update(values))
    return written


def test_path_manager_becomes_pm_type_and_absent_defaults_are_skipped(old_kernel):
    not_applied = config.apply_settings(1, HostSettings(path_manager="userspace"))
    assert "no fallback to plain TCP" in not_applied["net.mptcp.syn_retrans_before_tcp_fallback"]
    assert old_kernel["net.mptcp.pm_type"] == 1
    assert "net.mptcp.path_manager" not in old_kernel
    assert "net.mptcp.blackhole_timeout" not in old_kernel  # no blackhole detection there
    assert old_kernel["net.mptcp.stale_loss_cnt"] == 4


def test_non_default_value_for_an_absent_knob_is_an_error(old_kernel):
    with pytest.raises(TestbedError, match="net.mptcp.close_timeout = 5 is not supported"):
        config.apply_settings(1, HostSettings(close_timeout=5))


def test_linux_6_12_falls_back_without_the_knob(monkeypatch):
    # Debian 13's 6.12 (the VM): blackhole detection and the fixed fallback after
    # 2 MPTCP SYN retransmissions, but neither syn_retrans_before_tcp_fallback nor path_manager.
    linux_6_12 = LINUX_6_1 + ["net.mptcp." + k for k in (
        "blackhole_timeout", "close_timeout", "scheduler", "available_schedulers")]
    written: dict = {}
    monkeypatch.setattr(config, "run_in_netns", lambda pid, fn: linux_6_12)
    monkeypatch.setattr(config, "write_sysctl", lambda pid, values: written.update(values))
    not_applied = config.apply_settings(1, HostSettings())
    assert "net.mptcp.syn_retrans_before_tcp_fallback" not in not_applied  # same as the default
    assert "net.mptcp.syn_retrans_before_tcp_fallback" not in written
    assert written["net.mptcp.pm_type"] == 0 and written["net.mptcp.blackhole_timeout"] == 0
    with pytest.raises(TestbedError, match="syn_retrans_before_tcp_fallback = 5 is not supported"):
        config.apply_settings(1, HostSettings(syn_retrans_before_tcp_fallback=5))
