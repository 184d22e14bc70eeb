"""The inactivity experiment: parameters refused at load (no root), and a short real
sweep (root): make-after-break on kernel MPTCP and the user-space stack, N idle
connections' server state, and the analysis rows reading that store."""
from __future__ import annotations

import argparse

import pytest

from testbed.base.errors import TestbedError
from testbed.harness import scenario as sc

from tests.test_experiments import run

TOPOLOGY = {"spec": {"paths": [{"name": "wifi", "rate_mbit": 10, "delay_ms": 5},
                               {"name": "lte", "rate_mbit": 10, "delay_ms": 10, "client_endpoint": []}]}}


def scenario(params: dict, grid: dict | None = None) -> dict:
    return {"experiment": "inactivity", "calibrate": False, "topology": TOPOLOGY, "params": params,
            "grid": grid or {}}


@pytest.mark.parametrize("params, words", [
    ({"ito_server_s": 5}, "ito_server_s needs server_stack 'user'"),
    ({"outage_s": 0}, "outage_s"),
    ({"mode": "state", "connections": 1001}, "connections"),
    ({"mode": "resume", "connections": 2}, "connections > 1 only in mode 'state'"),
    ({"client_stack": "user", "server_stack": "user", "ito_client_s": 70_000}, "ito_client_s"),
])
def test_bad_params_refused_at_load(params, words):
    with pytest.raises(TestbedError) as exc:
        sc.validate({"seed": 1, **scenario(params)})
    assert words in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.root
def test_resume_and_idle_state(tmp_path):
    from analysis import inactivity, load

    base = {"outage_s": 1.5, "variant": "new_address", "resume_timeout_s": 8}
    runs = run(tmp_path, scenario(base, {"params": [base, {**base, "client_stack": "user",
                                                            "server_stack": "user"}]}))
    user = [r for r in runs if r["client_stack"] == "user"]
    assert len(runs) == 2 and len(user) == 1
    for r in runs:
        assert r["outage_measured_s"] >= 1.5
        assert r["returned_path"] == "lte"
    assert user[0]["resumed"] is True and user[0]["sha256_match"] is True
    assert 0 < user[0]["resume_s"] < 3
    # the kernel client resumes from the new address too, once it waits for its path
    # manager's join before closing (tests/test_inactivity_kernel_join.py says why)
    [kernel] = [r for r in runs if r["client_stack"] == "kernel"]
    assert kernel["resumed"] is True and kernel["sha256_match"] is True and kernel["join_error"] is None
    state = run(tmp_path / "state", scenario({"mode": "state", "connections": 20, "observe_s": 2, "p1_bytes": 1000,
                                              "sample_ms": 200}))
    [s] = state
    assert s["held_at_down"] == 20 and s["held_at_end"] == 20  # the kernel keeps idle connections
    assert s["memory_at_down_bytes"] > 0
    rows = inactivity.expectation_rows(load(tmp_path / "state" / "out"))
    kernel = [r for r in rows if r[1].startswith("kernel")]
    assert kernel and kernel[0][6] is True and "20 idle connections: 20 held" in kernel[0][5]


@pytest.mark.parametrize("argv, bounds", [
    (["--ito-s", "5", "--ito-max-s", "3"], (0, 3)),
    (["--ito-s", "5", "--ito-min-s", "7"], (7, 65_535)),
    (["--ito-s", "5", "--ito-min-s", "1", "--ito-max-s", "9"], (1, 9)),
])
def test_peer_defaults_a_missing_ito_bound(argv, bounds):
    """Only one bound given: the other is the option's own (0 or 65535), a pair the stack accepts."""
    from experiments import inactivity_peer as peer
    from testbed.stack import inactivity

    a = argparse.Namespace(ito_s=None, ito_min_s=None, ito_max_s=None)
    a.ito_s = int(argv[1])
    for flag, val in zip(argv[2::2], argv[3::2]):
        setattr(a, flag[2:].replace("-", "_"), int(val))
    opts = peer.stack_options(a)
    assert opts["inactivity_bounds_s"] == bounds
    inactivity.check_policy(opts["inactivity_s"], opts["inactivity_bounds_s"])


@pytest.mark.parametrize("outage_s, measured_s, bad", [
    (5, 5.08, False), (5, 5.34, False), (5, 5.36, True), (5, 4.6, True), (1.5, 1.6, False), (1.5, 1.7, True),
])
def test_outage_off_its_setting_voids_the_run(outage_s, measured_s, bad):
    """A measured outage off outage_s by more than 0.1 s + 5 % is a reason naming both values and the bound."""
    from experiments.inactivity import outage_mismatch

    why = outage_mismatch(outage_s, measured_s)
    assert (why is not None) == bad
    if bad:
        assert f"{measured_s:.3f}" in why and f"outage_s {outage_s:g} s" in why and "0.1 s + 5 %" in why


def _ito_store(outages: list[tuple[float, float, bool]]):
    """A store of user-stack ITO resume runs (X = 5 s both sides): (outage_s, measured, resumed) each."""
    from tests.test_fairness_rows import results

    rows = [{"experiment": "inactivity", "run_id": f"r{i}", "status": "complete", "metric.mode": "resume",
             "metric.client_stack": "user", "metric.server_stack": "user", "metric.variant": "same_address",
             "metric.ito_client_s": 5, "metric.ito_server_s": 5, "metric.ito_server_effective_s": 5,
             "metric.ito_client_effective_s": 5, "metric.outage_s": t, "metric.outage_measured_s": m,
             "metric.resumed": ok} for i, (t, m, ok) in enumerate(outages)]
    return results(rows)


def _resume_row(outages):
    from analysis import inactivity

    [row] = [r for r in inactivity.expectation_rows(_ito_store(outages)) if "resume" in r[3] and "X = 5" in r[3]]
    return row


@pytest.mark.parametrize("outages, holds", [
    ([(2, 2.0, True), (4, 4.0, True), (8, 8.0, False), (12, 12.0, False)], True),
    ([(2, 2.0, True), (4, 4.0, False)], False),                  # a short outage did not resume (no long run)
    ([(2, 2.0, True), (8, 8.0, True)], False),                   # a long outage resumed: no timer at work
    ([(5.5, 5.5, True), (5.8, 5.8, False)], None),               # only between X and X + 1 s: not judged
    ([(2, 2.0, True), (4, 6.5, True)], False),                   # measured 6.5 s (> X + 1) resumed
])
def test_ito_resume_row_judges_both_sides(outages, holds):
    """Outages (as measured) shorter than X resume and longer than X + 1 s do not; else it fails."""
    row = _resume_row(outages)
    assert row[6] is holds, row
    assert "longer than X + 1 s do not" in row[3]


def test_ito_resume_row_one_side_only_is_not_judged():
    """Short outages that all resumed but no long one: the row says so and is not judged."""
    row = _resume_row([(2, 2.0, True), (4, 4.0, True)])
    assert row[6] is None and "not judged: no run longer than X + 1 s" in row[5]


@pytest.mark.root
def test_kernel_server_view_drops_a_connection_that_is_gone():
    """The kernel server's sample says held 0 once the connection is gone (the client aborted),
    though the application still has its socket and MPTCP_INFO still answers."""
    import socket
    import struct
    import time

    from experiments.inactivity_peer import ServerView
    from testbed.base.netns import ScratchNetns, run_command
    from testbed.mptcp import sockopt as so

    with ScratchNetns() as scratch:
        assert run_command(scratch.path, ["ip", "link", "set", "lo", "up"]).returncode == 0

        def pair():
            lst = so.listener(5000, "127.0.0.1", "mptcp", "cubic")
            cli = so.mptcp_socket("cubic")
            cli.connect(("127.0.0.1", 5000))
            return lst, cli, lst.accept()[0]

        lst, cli, srv = scratch.run(pair)
        try:
            view = ServerView(srv, None)
            view.sample()
            cli.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            cli.close()  # an abort: the server's connection is reset
            time.sleep(0.3)
            so.mptcp_info(srv)  # still answers: not a sign the connection is held
            view.sample()
            assert [h for _t, h, _n in view.samples] == [1, 0]
            assert view.samples[-1][2] == 0
        finally:
            srv.close()
            lst.close()
