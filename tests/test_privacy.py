"""Privacy: per-path observers, what they learn per subflow, and the linking
attacks scored against the truth (analysis/privacy.py)."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from analysis import privacy as P
from testbed.harness.observers import from_i64, observed_subflows
from testbed.stack.crypto import token_of

SERVER = ("10.9.0.2", 5500)


def _pkt(path, t, src, sport, dst, dport, **kw):
    row = {"path": path, "t": t, "src": src, "dst": dst, "sport": sport, "dport": dport,
           "syn": False, "ack": True, "rst": False, "fin": False, "tcp_len": 0, "subtype": None,
           "sendkey": None, "recvkey": None, "token": None, "dsn": None, "dsn64": False,
           "data_len": None, "data_ack": None, "ack64": False}
    row.update(kw)
    return row


def _connection(i: int, t: float, key_c: int, key_s: int, idsn: int) -> list[dict]:
    """An MP_CAPABLE subflow on wifi and a join on lte, as the observers would see them."""
    c_w, c_l, port = f"10.1.{i}.1", f"10.2.{i}.1", 40000 + i
    s, sp = SERVER
    return [
        _pkt("wifi", t, c_w, port, s, sp, syn=True, ack=False, subtype=0),
        _pkt("wifi", t + .01, s, sp, c_w, port, syn=True, subtype=0, sendkey=key_s),
        _pkt("wifi", t + .02, c_w, port, s, sp, subtype=0, sendkey=key_c, recvkey=key_s),
        _pkt("wifi", t + .03, c_w, port, s, sp, subtype=2, dsn=idsn, dsn64=True, data_len=1400),
        _pkt("lte", t + .05, c_l, port + 1, s, sp, syn=True, ack=False, subtype=1,
             token=token_of(key_s)),
        _pkt("lte", t + .09, s, sp, c_l, port + 1, subtype=2, data_ack=idsn + 1400, ack64=True),
    ]


def _observed(n: int, t_step: float = 1.0) -> pd.DataFrame:
    rows = []
    for i in range(n):
        key_c, key_s = (0xF000_0000_0000_0000 + 7919 * i, 0x8000_0000_0000_0001 + 104729 * i)
        rows += _connection(i, i * t_step, key_c, key_s, idsn=(1 << 63) + (i << 50))
    packets = pd.DataFrame({c: pd.Series([r[c] for r in rows], dtype=object) for c in rows[0]})
    obs = observed_subflows(packets, {SERVER[1]})
    obs["connection"] = [str(int(c.split(".")[2])) for c in obs["client"]]
    return obs


def test_observer_features_keep_64_bit_keys_and_spans_exactly():
    obs = _observed(3)
    w = obs[(obs["path"] == "wifi") & (obs["client"] == "10.1.2.1")].iloc[0]
    assert w["kind"] == "capable" and w["sport"] == 5500
    assert from_i64(w["key_server"]) == 0x8000_0000_0000_0001 + 104729 * 2  # > 2**63, exact
    assert from_i64(w["up_lo"]) == (1 << 63) + (2 << 50)
    assert from_i64(w["up_hi"]) == (1 << 63) + (2 << 50) + 1400
    j = obs[(obs["path"] == "lte") & (obs["client"] == "10.2.2.1")].iloc[0]
    assert j["kind"] == "join" and j["join_token"] == token_of(0x8000_0000_0000_0001 + 104729 * 2)
    assert from_i64(j["up_lo"]) == (1 << 63) + (2 << 50) + 1400  # the server's DATA_ACK


def test_each_method_links_what_it_can_and_an_uninformative_one_scores_chance():
    obs = _observed(8)
    s = P.attack(obs, "wifi", "lte")
    for m in ("token", "dsn", "timing"):
        assert (s[m].tp, s[m].fp, s[m].positives) == (8, 0, 8), (m, s[m])
        assert s[m].credit == 8 and s[m].chance == pytest.approx(1.0)
    # Take away what each method reads: tokens, data-sequence spans, spacing in time.
    blind = obs.copy()
    blind[["key_client", "key_server", "join_token", "up_lo", "up_hi", "down_lo", "down_hi"]] = None
    blind["first_t"] = 0.0
    s = P.attack(blind, "wifi", "lte")
    for m in ("token", "dsn", "timing"):
        assert s[m].tp == 0 and s[m].fp == 0  # ties everywhere: no link decided
        assert s[m].credit == pytest.approx(s[m].chance) == pytest.approx(1.0)  # 8 x 1/8


def test_a_subflow_without_partner_linked_is_a_false_positive():
    obs = _observed(2)
    obs.loc[obs["path"] == "wifi", "connection"] = ["0", None]  # connection 1 fell back, say
    s = P.attack(obs, "wifi", "lte")["token"]
    assert (s.tp, s.fp, s.positives) == (1, 1, 1)


def test_wilson_interval():
    p, lo, hi = P.wilson(0, 10)
    assert p == 0 and lo == 0 and 0.27 < hi < 0.29  # the textbook 0.278
    p, lo, hi = P.wilson(50, 100)
    assert p == 0.5 and 0.40 < lo < 0.41 and 0.59 < hi < 0.60
    assert all(math.isnan(x) for x in P.wilson(0, 0))
    # The estimate always lies inside its interval, also where rounding put the
    # upper end a hair below 1 (123 of 123 linked: the full paper's report
    # refused to draw such an error bar).
    for n in range(1, 400):
        for k in (0, 1, n - 1, n):
            p, lo, hi = P.wilson(k, n)
            assert lo <= p <= hi, (k, n, lo, p, hi)


def test_bad_privacy_params_refused_at_load():
    from experiments.privacy import Params
    with pytest.raises(ValueError, match="connections"):
        Params(connections=0)
    with pytest.raises(ValueError, match="pattern"):
        Params(pattern="video")
    with pytest.raises(ValueError, match="observers"):
        Params(observers=["wifi"])
    with pytest.raises(ValueError, match="needs stack = 'user'"):
        Params(countermeasure="dsn-offset")
    # Staggered bulk connections must overlap for a goodput window of 1 s: the
    # last starts up to stagger_s after the first, which stops after `seconds`.
    # Its nearest samples (every 0.1 s) must lie 1 s apart: 1.2 s of window.
    with pytest.raises(ValueError, match=r"seconds 4 .*at least 4.7 \(start spread 3 s"):
        Params(pattern="bulk", start="staggered", seconds=4, stagger_s=3, connections=4)
    with pytest.raises(ValueError, match=r"seconds 4 .*at least 4.2"):
        Params(pattern="bulk", start="staggered", seconds=4, stagger_s=2.5, connections=4)
    Params(pattern="bulk", start="staggered", seconds=4.2, stagger_s=2.5, connections=4)
    Params(pattern="bulk", start="staggered", seconds=2, stagger_s=3, connections=1)  # one start: no spread
    with pytest.raises(ValueError, match=r"seconds 1.2 .*at least 1.7 \(start spread 0 s"):
        Params(pattern="bulk", start="together", seconds=1.2)
    Params(pattern="reqresp", start="staggered", seconds=2, stagger_s=1.5)  # no goodput window needed
    # Every grid point of the paper's privacy scenarios loads.
    from testbed.harness import scenario as sc
    for name in ("privacy.toml", "privacy-countermeasures.toml"):
        sc.expand(sc.load(Path(__file__).resolve().parents[1] / "experiments" / name))


@pytest.mark.root
def test_observers_see_only_their_path_and_the_attacks_score_a_real_run(tmp_path):
    """Four kernel MPTCP connections from two clients: each observer sees one
    subflow per connection and nothing of the other path; tokens and DSNs
    link all four."""
    from test_experiments import run
    [r] = run(tmp_path, {"experiment": "privacy", "calibrate": False, "probes": [],
                         "topology": {"name": "multi-client", "params": {
                             "n": 2, "wifi_delay_ms": 5, "lte_delay_ms": 10}},
                         "params": {"connections": 4, "seconds": 1.5, "pattern": "reqresp"}})
    assert r["connections_joined"] == 4 and r["observed_subflows"] == 8
    assert r["connections_seen.wifi"] == 4 and r["connections_seen.lte"] == 4
    import analysis
    res = analysis.load(tmp_path / "out")
    obs = res.observed_subflows
    wifi = obs[obs["path"] == "wifi"]
    assert set(wifi["kind"]) == {"capable"} and set(obs[obs["path"] == "lte"]["kind"]) == {"join"}
    assert wifi["client"].str.endswith(".1").all()
    lte_clients = set(obs[obs["path"] == "lte"]["client"])
    assert not lte_clients & set(wifi["client"])  # each observer only its own path's addresses
    sc = P.run_scores(res).set_index("method")
    assert sc.loc["token", "tp"] == 4 and sc.loc["dsn", "tp"] == 4
    assert sc.loc["token", "fp"] == 0 and sc.loc["dsn", "fp"] == 0


@pytest.mark.root
def test_dsn_offsets_on_the_user_stack_leave_the_dsn_attack_at_chance(tmp_path):
    """Three connections of the user-space stack with per-subflow DSN offsets:
    tokens still link every join (keys are in the clear), the DSN ranges link none."""
    from test_experiments import run
    [r] = run(tmp_path, {"experiment": "privacy", "calibrate": False, "probes": [],
                         "topology": {"name": "multi-client", "params": {
                             "n": 3, "wifi_delay_ms": 5, "lte_delay_ms": 10}},
                         "params": {"connections": 3, "seconds": 1.5, "pattern": "reqresp",
                                    "stack": "user", "countermeasure": "dsn-offset"}})
    assert r["connections_joined"] == 3 and r["countermeasure"] == "dsn-offset"
    import analysis
    sc = P.run_scores(analysis.load(tmp_path / "out")).set_index("method")
    assert sc.loc["token", "tp"] == 3
    assert sc.loc["dsn", "tp"] == 0 and sc.loc["dsn", "fp"] == 0


def test_an_observer_that_missed_a_packet_is_a_problem(monkeypatch):
    from testbed.harness.observers import PathObservers
    obs = object.__new__(PathObservers)  # as after start() and stop(), without namespaces
    obs._points = {"wifi": ("ap", "ap-wifi"), "lte": ("bs", "bs-lte")}
    obs._before, obs._after = {"wifi": 10, "lte": 5}, {"wifi": 110, "lte": 45}
    monkeypatch.setattr(obs, "captured", lambda: {"wifi": 99, "lte": 40})
    assert obs.problems() == ["observer wifi: captured 99 packets, interface ap-wifi moved 100 "
                              "(bound: all of them)"]
    obs._after = {}
    assert "could not be read" in obs.problems()[0]


def test_cost_table_takes_a_metric_no_run_has():
    """A store of request/response runs only has no goodput: the column loads
    as text and must not break the table (it broke ./tb paper --quick's report)."""
    from analysis.figures.privacy import cost_table
    runs = pd.DataFrame({"metric.stack": ["user", "user"], "metric.countermeasure": ["none", "tls-keys"],
                         "metric.pattern": ["reqresp"] * 2, "metric.connections": [4, 4],
                         "metric.setup_ms_median": [103.0, 150.0],
                         "metric.goodput_mbit": pd.array([None, None], dtype="string"),
                         "metric.answers_per_s": [32.0, 33.5]})
    t = cost_table(runs).set_index("countermeasure")
    assert t.loc["tls-keys", "setup ms (median of runs' medians)"] == 150.0
    assert t["bulk: goodput Mbit/s, all connections (median)"].isna().all()


def test_bulk_goodput_is_refused_unless_every_byte_sent_was_read():
    """The cost's bulk goodput counts only when the servers read every byte the
    clients sent and a goodput window was measured; otherwise the reason names both."""
    from experiments.privacy import _bulk_problem
    assert _bulk_problem(sent=1000, read=1000, goodput=12.5) is None
    assert _bulk_problem(sent=1000, read=990, goodput=12.5) == (
        "bulk: the servers read 990 bytes, the clients sent 1000 (bound: all of them)")
    assert "no goodput window" in _bulk_problem(sent=1000, read=1000, goodput=None)


def test_cost_table_gives_spread_and_cost_relative_to_no_countermeasure():
    """Per countermeasure: medians with the spread (connections' setup quartiles,
    runs' goodput range) and each against no countermeasure on the same stack, pattern and K."""
    from analysis.figures.privacy import cost_table
    runs = pd.DataFrame({"metric.stack": ["user"] * 4, "metric.pattern": ["bulk"] * 4,
                         "metric.countermeasure": ["none", "none", "tls-keys", "tls-keys"],
                         "metric.connections": [4] * 4,
                         "metric.setup_ms_median": [100.0, 104.0, 150.0, 154.0],
                         "metric.setup_ms_p25": [95.0, 97.0, 140.0, 142.0],
                         "metric.setup_ms_p75": [110.0, 112.0, 160.0, 162.0],
                         "metric.goodput_mbit": [28.0, 30.0, 27.0, 28.0]})
    t = cost_table(runs).set_index("countermeasure")
    assert t.loc["tls-keys", "setup ms (median of runs' medians)"] == 152.0
    assert t.loc["tls-keys", "setup ms, connections' quartiles"] == "141-161"
    assert t.loc["tls-keys", "setup vs none"] == "+50 ms (+49 %)"
    assert t.loc["tls-keys", "goodput, runs' range"] == "27.0-28.0"
    assert t.loc["tls-keys", "goodput vs none"] == "-5 %"
    assert t.loc["none", "goodput vs none"] == "+0 %"


def test_dsn_offsets_cost_row_judges_goodput_against_no_countermeasure():
    """The expectation 'DSN offsets cost no measurable throughput' holds when the
    offsets' median bulk goodput is within the bound of none's at every K."""
    def runs(offset_goodput):
        return pd.DataFrame({"metric.stack": ["user"] * 4, "metric.pattern": ["bulk"] * 4,
                             "metric.countermeasure": ["none", "dsn-offset"] * 2,
                             "metric.connections": [4, 4, 16, 16],
                             "metric.goodput_mbit": [28.0, offset_goodput, 29.0, 29.0]})
    [row] = P.cost_rows(runs(27.5))
    assert row[-1] is True and "K = 4: 0.98" in row[-2]
    [row] = P.cost_rows(runs(20.0))
    assert row[-1] is False and "K = 4: 0.71" in row[-2]
    [row] = P.cost_rows(pd.DataFrame({"metric.pattern": ["reqresp"]}))
    assert row[-1] is None
