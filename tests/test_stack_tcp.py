"""User-space MPTCP stack: sequence arithmetic, congestion control and the scheduler, without a network."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from testbed.stack.cc import INITIAL_WINDOW_SEGMENTS, Cubic, NewReno, make_cc
from testbed.stack.connection import unwrap64
from testbed.stack.scheduler import LowestRttScheduler
from testbed.stack.subflow import unwrap32

MSS = 1420


def test_unwrap_picks_the_value_nearest_the_reference_across_wraps():
    assert unwrap32(5, 0xFFFFFFF0) == 0x100000005
    assert unwrap32(0xFFFFFFF0, 0x100000005) == 0xFFFFFFF0
    assert unwrap32(100, 50) == 100
    assert unwrap64(3, (1 << 64) - 2) == (1 << 64) + 3
    assert unwrap64((1 << 64) - 2, 5) == -2


@pytest.mark.parametrize("cls", [NewReno, Cubic])
def test_slow_start_then_multiplicative_decrease(cls):
    cc = cls(MSS)
    assert cc.cwnd == INITIAL_WINDOW_SEGMENTS * MSS
    for _ in range(20):
        cc.on_ack(MSS, 0.0, 0.01)
    assert cc.cwnd == (INITIAL_WINDOW_SEGMENTS + 20) * MSS   # one MSS per acked MSS
    before = cc.cwnd
    cc.on_loss(int(before), 0.0)
    expected = before / 2 if cls is NewReno else before * 0.7
    assert cc.cwnd == pytest.approx(expected)
    assert cc.ssthresh == pytest.approx(expected)
    cc.on_rto(int(cc.cwnd), 0.0)
    assert cc.cwnd == MSS


def test_reno_grows_one_mss_per_window_in_congestion_avoidance():
    cc = NewReno(MSS, cwnd=20 * MSS, ssthresh=10 * MSS)
    for _ in range(20):          # one window of ACKs
        cc.on_ack(MSS, 0.0, 0.01)
    assert 20.9 * MSS < cc.cwnd < 21.1 * MSS


def test_cubic_returns_to_w_max_after_k_and_grows_beyond():
    cc = Cubic(MSS, cwnd=100 * MSS, ssthresh=float("inf"))
    cc.on_loss(100 * MSS, 0.0)                     # w_max = 100, cwnd = 70
    assert cc.cwnd == pytest.approx(70 * MSS)
    k = ((100 - 70) / 0.4) ** (1 / 3)              # RFC 9438 eq. 2: ~4.2 s
    t, rtt = 0.0, 0.05
    while t < k + 2:
        for _ in range(int(cc.cwnd / MSS)):
            cc.on_ack(MSS, t, rtt)
        t += rtt
    assert cc.w_max == 100
    assert cc.cwnd > 100 * MSS                     # convex region beyond w_max
    cc2 = Cubic(MSS, cwnd=80 * MSS)
    cc2.w_max = 100
    cc2.on_loss(80 * MSS, 0.0)                     # fast convergence: below the last w_max
    assert cc2.w_max == pytest.approx(80 * (1 + 0.7) / 2)


def test_make_cc_refuses_unknown_names():
    assert make_cc("cubic", MSS).name == "cubic" and make_cc("reno", MSS).name == "reno"
    with pytest.raises(ValueError, match="unknown congestion control"):
        make_cc("bbr", MSS)


def fake_subflow(name, srtt, inflight=0, cwnd=100_000, backup=False, stale=False, usable=True, min_rtt=None):
    return SimpleNamespace(name=name, srtt=srtt, inflight=inflight, cc=SimpleNamespace(cwnd=cwnd), mss=MSS,
                           backup=backup, stale=stale, can_send_data=lambda: usable,
                           expected_rtt=lambda: (min_rtt if inflight == 0 and min_rtt else srtt))


def pick(*subflows, size=MSS, **kw):
    sf = LowestRttScheduler().pick(SimpleNamespace(subflows=list(subflows)), size, **kw)
    return sf.name if sf else None


def test_scheduler_lowest_rtt_with_room_first():
    assert pick(fake_subflow("slow", 0.05), fake_subflow("fast", 0.01)) == "fast"
    assert pick(fake_subflow("slow", 0.05), fake_subflow("fast", 0.01, inflight=100_000)) == "slow"
    assert pick(fake_subflow("a", 0.05, inflight=100_000), fake_subflow("b", 0.01, inflight=100_000)) is None
    assert pick(fake_subflow("a", 0.05, inflight=100_000), ignore_cwnd=True) == "a"


def test_scheduler_uses_backup_only_when_nothing_else_works():
    assert pick(fake_subflow("main", 0.05, inflight=100_000), fake_subflow("bk", 0.001, backup=True)) is None
    assert pick(fake_subflow("main", 0.05, usable=False), fake_subflow("bk", 0.001, backup=True)) == "bk"
    assert pick(fake_subflow("main", 0.05, stale=True), fake_subflow("bk", 0.01, backup=True)) == "bk"
    # reinjection never goes back to a stale subflow
    assert pick(fake_subflow("dead", 0.001, stale=True), exclude_stale=True) is None


def test_idle_subflow_is_judged_by_its_minimum_rtt():
    busy = fake_subflow("busy", 0.010, inflight=50_000, cwnd=10_000_000)
    idle = fake_subflow("idle", 0.012, inflight=0, min_rtt=0.0002)
    assert pick(busy, idle) == "idle"
