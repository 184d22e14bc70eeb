"""The topology model rejects bad input with one line naming the field."""
from __future__ import annotations

import pytest

from conftest import assert_one_line_error, run_tb
from testbed.base.errors import TestbedError
from testbed.core.model import LinkParams, PathSpec
from testbed.core.topology import from_dict, load


def two_paths(**over):
    paths = [{"name": "wifi", "rate_mbit": 20, "delay_ms": 10}, {"name": "lte", "rate_mbit": 10}]
    paths[0].update(over)
    return {"name": "t", "paths": paths}


@pytest.mark.parametrize("over, field", [
    ({"delay_ms": -1}, "paths.0.delay_ms"),
    ({"loss_pct": 101}, "paths.0.loss_pct"),
    ({"rate_mbit": 0}, "paths.0.rate_mbit"),
    ({"name": "Wi Fi"}, "paths.0.name"),
    ({"colour": "red"}, "paths.0.colour"),
    ({"mtu": 100}, "paths.0.mtu"),
])
def test_invalid_path_fields_name_the_field(over, field):
    with pytest.raises(TestbedError) as err:
        from_dict(two_paths(**over))
    msg = str(err.value)
    assert field in msg and "\n" not in msg


def test_unknown_key_is_reported_as_such():
    with pytest.raises(TestbedError, match=r"paths\.0\.colour: unknown key"):
        from_dict(two_paths(colour="red"))


def test_path_count_bounds():
    with pytest.raises(TestbedError, match="paths: .*at least 1"):
        from_dict({"name": "t", "paths": []})
    with pytest.raises(TestbedError, match="paths: .*at most 8"):
        load("n-path", n=9)
    assert len(load("n-path", n=8).paths) == 8


def test_unknown_topology_lists_known_ones():
    with pytest.raises(TestbedError, match=r"unknown topology 'nope' \(known: .*two-path"):
        load("nope")


def test_malformed_toml(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[paths]\nname = 'x'\n")
    with pytest.raises(TestbedError, match="malformed TOML"):
        load(str(bad))


def test_toml_topology_and_direction_overrides():
    topo = load("wifi-lte-multihomed")
    lte = topo.path("lte")
    assert lte.direction("up").rate_mbit == 10 and lte.direction("down").rate_mbit == 20
    assert lte.rtt_ms() == 60


def test_duplicate_names_and_bad_default_path():
    data = two_paths()
    data["paths"][1]["name"] = "wifi"
    with pytest.raises(TestbedError, match="unique"):
        from_dict(data)
    with pytest.raises(TestbedError, match="default_path"):
        from_dict({**two_paths(), "default_path": "dsl"})


def test_queue_defaults_to_one_bdp_with_a_floor():
    p = PathSpec(name="w", rate_mbit=100, delay_ms=20)  # BDP = 100 Mbit * 40 ms = 333 pkts
    assert p.direction("up").queue_limit_pkts(p.rtt_ms()) == 333
    assert LinkParams(rate_mbit=1).queue_limit_pkts(1.0) == 20
    with pytest.raises(ValueError):
        LinkParams(queue_pkts=10, queue_bdp=2)


@pytest.mark.root
@pytest.mark.parametrize("args, needle", [
    (["demo", "--topology", "nope"], "unknown topology 'nope'"),
    (["demo", "--set", "wifi_delay_ms=-5"], "paths.0.delay_ms"),
    (["demo", "--topology", "n-path", "--set", "n=9"], "paths"),
    (["demo", "--set", "novalue"], "key=value"),
    (["demo", "--set", "paths=3"], "topology 'two-path'"),
])
def test_cli_bad_input_is_one_line_and_nonzero(args, needle):
    assert_one_line_error(run_tb(*args), needle)


@pytest.mark.parametrize("field, bad", [("rate_mbit", 0.001), ("delay_ms", -1), ("jitter_ms", 10_001),
                                        ("loss_pct", 500), ("queue_pkts", 0), ("queue_bdp", 101)])
def test_set_link_changes_have_the_link_models_ranges(field, bad):
    from pydantic import ValidationError

    from testbed.core.events import LinkChanges

    assert set(LinkChanges.model_fields) == set(LinkParams.model_fields)
    for model in (LinkParams, LinkChanges):
        with pytest.raises(ValidationError) as err:
            model(**{field: bad})
        assert err.value.errors()[0]["loc"] == (field,)


def test_queue_and_rate_bounds_are_refused_in_the_model():
    with pytest.raises(TestbedError, match=r"paths\.0: .*more than 1000000 packets"):
        from_dict(two_paths(rate_mbit=100_000, delay_ms=10_000, queue_bdp=100))
    with pytest.raises(TestbedError, match=r"paths\.0\.rate_mbit: .*0\.01"):
        from_dict(two_paths(rate_mbit=0.0001))
    assert from_dict(two_paths(rate_mbit=0.01, queue_bdp=100)).paths[0].rate_mbit == 0.01


# ---- a path's characteristics from its links -------------------------------------
def test_a_path_composes_its_links_per_direction():
    from testbed.core.model import Hop, compose_path
    hops = [Hop("wifi", LinkParams(rate_mbit=20, delay_ms=5, loss_pct=1),
                LinkParams(rate_mbit=20, delay_ms=5), 1500),
            Hop("plain", LinkParams(), LinkParams(), 1500),
            Hop("mid", LinkParams(rate_mbit=30, delay_ms=10, jitter_ms=1, loss_pct=2, queue_pkts=50),
                LinkParams(rate_mbit=8, delay_ms=3, jitter_ms=0.5), 1400)]
    c = compose_path(hops)
    assert c.links == ("wifi", "plain", "mid") and c.mtu == 1400
    assert (c.up.delay_ms, c.down.delay_ms, c.rtt_ms()) == (15, 8, 23)  # one-way delays add
    assert (c.up.rate_mbit, c.down.rate_mbit) == (20, 8)  # the slowest link's
    assert c.slowest == {"up": "wifi", "down": "mid"}
    assert c.up.loss_pct == pytest.approx(100 * (1 - 0.99 * 0.98))  # 1 - prod(1 - p)
    assert (c.up.jitter_ms, c.down.jitter_ms) == (1, 0.5)  # the widest deviation: jitters add
    # The queue is the slowest link's, in packets as built (wifi: one BDP of its own RTT, at least 20).
    assert c.up.queue_pkts == LinkParams(rate_mbit=20).queue_limit_pkts(10, 1500) == 20
    assert c.down.queue_pkts == LinkParams(rate_mbit=8).queue_limit_pkts(13, 1400)


def test_composed_loss_keeps_a_lone_gilbert_chain_and_averages_mixed_loss():
    from testbed.core.model import GilbertElliott, Hop, compose_path
    ge = GilbertElliott(p_pct=1, r_pct=20)
    lone = compose_path([Hop("a", LinkParams(gilbert=ge), LinkParams(), 1500),
                         Hop("b", LinkParams(delay_ms=1), LinkParams(), 1500)])
    assert lone.up.gilbert == ge and lone.up.loss_pct == 0 and lone.up.rate_mbit is None
    mixed = compose_path([Hop("a", LinkParams(gilbert=ge), LinkParams(), 1500),
                          Hop("b", LinkParams(loss_pct=10), LinkParams(), 1500)])
    mean = ge.mean_loss_pct() / 100
    assert mixed.up.gilbert is None
    assert mixed.up.loss_pct == pytest.approx(100 * (1 - (1 - mean) * 0.9))
