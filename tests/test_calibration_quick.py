"""The quick full calibration: paths that share no emulated link measured at once,
pings until the verdict is statistically decided, short rate windows - and it
still fails a testbed whose emulator does not do what the record says."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from testbed.core.emulation.calibrate import calibrate, disjoint_groups, rate_window_s, rtt_decided
from testbed.core.topology import load

root = pytest.mark.root


def _shape(name: str, **params) -> SimpleNamespace:
    """What disjoint_groups reads of a testbed, from the topology's graph (nothing built)."""
    g = load(name, **params).graph()
    return SimpleNamespace(graph=g, links=[SimpleNamespace(name=l.name) for l in g.links if l.emulator],
                           paths=[SimpleNamespace(name=p.name, graph=p) for p in g.paths])


def test_the_rate_window_holds_enough_segments_and_round_trips():
    assert rate_window_s(20, 40) == 0.5                    # 833 segments, 12 RTTs: the floor
    assert rate_window_s(1, 10) == pytest.approx(1.2)      # 100 segments of 1500 bytes at 1 Mbit/s
    assert rate_window_s(100, 400) == pytest.approx(1.6)   # 4 round trips of a 400 ms path


def test_paths_sharing_an_emulated_link_are_not_measured_at_once():
    # two-path: the paths meet only on a plain (not emulated) link
    assert [[p.name for p in grp] for grp in disjoint_groups(_shape("two-path"))] == [["wifi", "lte"]]
    # dumbbell: both paths cross the emulated bottleneck
    assert [[p.name for p in grp] for grp in disjoint_groups(_shape("dumbbell"))] == [["m1a"], ["m1b"]]


def test_the_rtt_verdict_needs_the_mean_clear_of_the_bound():
    rng = random.Random(1)
    tight = [20 + rng.gauss(0, 0.05) for _ in range(16)]
    assert rtt_decided(tight, configured=20, tol=1.0)          # clearly inside
    assert rtt_decided([x + 3 for x in tight], configured=20, tol=1.0)  # clearly outside
    near = [20.9 + rng.gauss(0, 0.5) for _ in range(16)]      # the mean near the bound, wide spread
    assert not rtt_decided(near, configured=20, tol=1.0)
    assert not rtt_decided(tight[:4], configured=20, tol=1.0)  # too few samples to say


@root
@pytest.mark.timeout(120)
def test_quick_calibration_passes_honest_paths_and_catches_a_wrong_delay_and_rate():
    from testbed.core.net import Testbed

    with Testbed(load("two-path", wifi_delay_ms=10, lte_delay_ms=20, rate_mbit=20),
                 backend="userspace") as tb:
        honest = calibrate(tb)
        assert honest["valid"], honest["reason"]
        assert honest["quick"] and honest["groups"] == [["wifi", "lte"]]
        assert honest["emulation"]["judged"] and honest["emulation"]["valid"]
        for name in ("wifi", "lte"):
            assert 0.9 <= honest["paths"][name]["rate_up"]["ratio"] <= 1.01
        assert honest["duration_s"] <= 3.0, honest["duration_s"]  # measured ~1.3 s; the old one ~5 s
        link = tb.path("wifi").link
        record = link.up
        tol = honest["paths"]["wifi"]["rtt_tolerance_ms"]
        # The emulator lies: 1.5 tolerances more delay than the record says.
        tb.backend.update(link, "up", record.model_copy(update={"delay_ms": record.delay_ms + 1.5 * tol}))
        late = calibrate(tb, measure_rate=False)
        assert not late["valid"] and "wifi" in late["reason"] and "RTT" in late["reason"], late["reason"]
        tb.backend.update(link, "up", record)  # the forwarder's delay back to the record
        # ... and now 0.8 of the recorded rate (HTB changed behind the record's back).
        tb.backend.update(link, "up", record.model_copy(update={"rate_mbit": 0.8 * record.rate_mbit}))
        slow = calibrate(tb)
        assert not slow["valid"] and "wifi up: goodput" in slow["reason"], slow["reason"]
        assert "lte" not in slow["reason"], slow["reason"]
