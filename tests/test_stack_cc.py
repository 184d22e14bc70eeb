"""Coupled congestion control of the user-space stack (LIA, RFC 6356; OLIA, Khalili et al.), without a network.

The increase rules are checked against their formulas, and a seeded round-based
loss model checks what the coupling is for: two coupled subflows seeing the same
loss rate take about what one Reno flow takes there, two uncoupled ones twice that.
"""
from __future__ import annotations

import random

import pytest

from testbed.stack.cc import Coupling, Lia, NewReno, Olia, make_cc

MSS = 1400


def ca_pair(cls, windows, rtts):
    """Controllers of one connection, all in congestion avoidance with the given windows (segments) and RTTs."""
    coupling = Coupling()
    ccs = []
    for w, rtt in zip(windows, rtts):
        cc = make_cc(cls, MSS, coupling)
        cc.cwnd, cc.ssthresh, cc.rtt = w * MSS, 1.0, rtt
        ccs.append(cc)
    return coupling, ccs


def test_make_cc_knows_the_coupled_controllers_and_shares_one_coupling():
    coupling = Coupling()
    a, b = make_cc("lia", MSS, coupling), make_cc("olia", MSS, coupling)
    assert isinstance(a, Lia) and isinstance(b, Olia) and coupling.members == [a, b]
    assert coupling.active() == []            # no RTT yet: a subflow in its handshake does not count
    a.detach()
    assert coupling.members == [b]
    assert make_cc("newreno", MSS).name == "reno"
    with pytest.raises(ValueError, match="unknown congestion control 'bbr' .*lia, olia"):
        make_cc("bbr", MSS)


def test_reno_counts_acked_bytes_so_stretch_acks_do_not_slow_it():
    one, two = NewReno(MSS, cwnd=20 * MSS, ssthresh=1), NewReno(MSS, cwnd=20 * MSS, ssthresh=1)
    for _ in range(20):
        one.on_ack(MSS, 0, 0.01)
    for _ in range(10):
        two.on_ack(2 * MSS, 0, 0.01)          # delayed ACKs: one per two segments
    assert one.cwnd == pytest.approx(two.cwnd, rel=0.01) == pytest.approx(21 * MSS, rel=0.01)


@pytest.mark.parametrize("name", ["lia", "olia"])
def test_a_single_coupled_subflow_is_reno(name):
    _, [cc] = ca_pair(name, [20], [0.05])
    reno = NewReno(MSS, cwnd=20 * MSS, ssthresh=1)
    for _ in range(20):
        cc.on_ack(MSS, 0, 0.05)
        reno.on_ack(MSS, 0, 0.05)
    assert cc.cwnd == pytest.approx(reno.cwnd)


def test_lia_alpha_is_rfc6356_formula():
    _, (a, b) = ca_pair("lia", [30, 10], [0.02, 0.08])
    wa, wb = 30 * MSS, 10 * MSS
    expected = (wa + wb) * max(wa / 0.02 ** 2, wb / 0.08 ** 2) / (wa / 0.02 + wb / 0.08) ** 2
    assert a.alpha() == pytest.approx(expected) and b.alpha() == pytest.approx(expected)
    _, (c, d) = ca_pair("lia", [20, 20], [0.05, 0.05])
    assert c.alpha() == pytest.approx(0.5)    # n equal subflows: 1/n


def test_lia_increase_is_capped_by_reno_on_the_subflow():
    # The larger window on the longer RTT: alpha (set by the short-RTT path) would let it
    # grow faster than a Reno flow with its window; the cap holds it at Reno's increase.
    _, (fast, slow) = ca_pair("lia", [10, 100], [0.01, 0.1])
    inc = slow.increase(MSS)
    assert inc == pytest.approx(MSS * MSS / slow.cwnd)
    assert slow.alpha() * MSS * MSS / (fast.cwnd + slow.cwnd) > 2 * inc
    assert fast.increase(MSS) < MSS * MSS / fast.cwnd


@pytest.mark.parametrize("name", ["lia", "olia"])
def test_equal_subflows_grow_together_no_faster_than_one_reno_flow(name):
    """One window of ACKs on each of two equal subflows adds at most the one MSS that a
    single Reno flow adds per RTT (RFC 6356 goal 1, in increase terms)."""
    _, ccs = ca_pair(name, [20, 20], [0.05, 0.05])
    before = sum(c.cwnd for c in ccs)
    for c in ccs:
        for _ in range(20):
            c.on_ack(MSS, 0, 0.05)
    grown = sum(c.cwnd for c in ccs) - before
    assert 0.3 * MSS < grown <= 1.01 * MSS


def test_losses_halve_only_the_subflow_that_saw_them_and_fast_recovery_inflation_is_not_counted():
    _, (a, b) = ca_pair("lia", [40, 20], [0.05, 0.05])
    a.on_loss(40 * MSS, 0)
    assert a.cwnd == pytest.approx(20 * MSS) and b.cwnd == 20 * MSS
    a.cwnd += 3 * MSS                          # what the subflow does in fast recovery
    assert a.window() == pytest.approx(20 * MSS)
    a.on_ack(MSS, 0, 0.05)                     # recovery over: the real window counts again
    assert not a.recovering


def test_olia_inter_loss_distance():
    _, [cc] = ca_pair("olia", [20], [0.05])
    cc.on_ack(100 * MSS, 0, 0.05)
    cc.on_loss(20 * MSS, 0)
    cc.on_ack(30 * MSS, 0, 0.05)
    assert cc.inter_loss() == 100 * MSS        # bytes between the last two losses
    cc.on_ack(200 * MSS, 0, 0.05)
    assert cc.inter_loss() == 230 * MSS        # since the last loss, now larger


def test_olia_alpha_moves_window_from_the_largest_to_the_best_path():
    _, (big, best) = ca_pair("olia", [40, 10], [0.05, 0.05])
    big.acked_total, big.loss_last, big.loss_prev = 1000 * MSS, 900 * MSS, 800 * MSS   # l = 100 segments
    best.acked_total, best.loss_last = 1000 * MSS, 200 * MSS                            # l = 800 segments
    assert best.alpha() == pytest.approx(1 / 2) and big.alpha() == pytest.approx(-1 / 2)
    # alpha enters as alpha / w per acked segment: the best path grows faster than its coupled share
    assert best.increase(MSS) > (best.cwnd / MSS / 0.05 ** 2) / (50 / 0.05) ** 2 * MSS
    # when the best path already has the largest window, nobody is pushed
    best.cwnd = 50 * MSS
    assert best.alpha() == 0 and big.alpha() == 0


def simulate(names, p=0.005, rounds=20000, seed=7):
    """Round-based model, equal RTTs: every round each subflow sends its window; each
    segment is lost with probability p; a loss halves the window (one reaction per round).
    Returns the mean total window in segments."""
    rng = random.Random(seed)
    coupling = Coupling()
    ccs = [make_cc(n, MSS, coupling) for n in names]
    for c in ccs:
        c.ssthresh = c.cwnd
    total = 0.0
    for _ in range(rounds):
        for c in ccs:
            for _seg in range(int(c.cwnd // MSS)):
                if rng.random() < p:
                    c.on_loss(int(c.cwnd), 0)
                    break
                c.on_ack(MSS, 0, 0.05)
        total += sum(c.cwnd for c in ccs) / MSS
    return total / rounds


@pytest.mark.parametrize("name", ["lia", "olia"])
def test_two_coupled_subflows_take_one_flows_share_where_uncoupled_take_two(name):
    single = simulate(["reno"])
    coupled = simulate([name, name])
    uncoupled = simulate(["reno", "reno"])
    assert 0.7 < coupled / single < 1.3, (coupled, single)
    assert 1.7 < uncoupled / single < 2.3, (uncoupled, single)
