"""Forged RobE_eSIM MP_JOIN_CAP on the wire (testbed.tools.bench.esim_forgery):
an observer of the losing path of a real eSIM connection sends forged half-open
attempts to the user-stack server; none is accepted, each is refused with
RST + MP_TCPRST (tshark), a wrong HMAC with the right hint too. The table's
judgement (analysis.esim_security) is checked without root."""
from __future__ import annotations

import copy

import pytest

from analysis.esim_security import VARIANTS, forgery_table, markdown, predicted_hint
from testbed.stack import esim


def _doc(n: int = 100) -> dict:
    """A measurement as the benchmark stores it, every bound held."""
    def variant(passed_hint: int, no_conn: int) -> dict:
        return {"attempts": n, "synacks": n, "no_synack": 0, "no_echo": 0, "rst_mptcprst_peer": n,
                "acked_peer": 0, "other_answer": 0, "victim_subflows_gained": 0,
                "server": {"no-connection": no_conn, "hint": n - passed_hint - no_conn, "hmac": passed_hint,
                           "accepted": 0},
                "wire": {"join_caps_sent": n, "rst_mptcprst": n, "server_acks_after_join_cap": 0}}
    return {"variants": {"random-tag": variant(0, 0), "right-hint": variant(n, 0), "replay": variant(n, 0),
                         "unknown-key": variant(0, n)},
            "victim_after": {"bytes_sent": 20000, "bytes_intact": True, "subflows": 2}}


def test_the_table_holds_only_when_nothing_is_accepted_and_every_refusal_is_on_the_wire():
    table = forgery_table(_doc())
    assert table.holds.all() and list(table.variant) == list(VARIANTS)
    assert "| right-hint | 100 | 100 (100) | 0 | 100 |" in markdown(table)
    for path, value in ((("random-tag", "server", "accepted"), 1), (("right-hint", "wire", "rst_mptcprst"), 99),
                        (("replay", "victim_subflows_gained"), 1), (("right-hint", "server", "hmac"), 0),
                        (("random-tag", "server", "no-connection"), 100)):
        doc = copy.deepcopy(_doc())
        node = doc["variants"]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        held = dict(zip(forgery_table(doc).variant, forgery_table(doc).holds))
        assert not held[path[0]], path


def test_predicted_hint_passes():
    lo, hi = predicted_hint("random-tag", 5000)
    assert lo <= 5000 / 1024 <= hi and hi <= 15
    assert predicted_hint("replay", 7) == (7, 7) and predicted_hint("unknown-key", 7) == (0, 0)


def test_forged_tags_of_each_variant():
    from testbed.tools.bench.esim_forgery import Observed, forged_tag
    seen = Observed("10.0.0.1", "eth1", 1, key_a=0x1122334455667788, tag=0xAABBCCDDEEFF0123, loser_key_b=5)
    mask = (1 << esim.CRC_BITS) - 1
    assert forged_tag("replay", seen) == (seen.key_a, seen.tag)
    key_a, tag = forged_tag("right-hint", seen)
    assert key_a == seen.key_a and tag & mask == seen.tag & mask and tag != seen.tag
    assert forged_tag("unknown-key", seen)[0] != seen.key_a


@pytest.mark.root
def test_forged_join_caps_from_the_losing_path_are_all_refused_on_the_wire():
    from testbed.tools.bench.esim_forgery import run_forgery
    doc = run_forgery(50)
    assert not doc.get("invalid"), doc["invalid"]
    table = forgery_table(doc)
    assert table.holds.all(), table.to_string()
    assert (table.accepted == 0).all() and (table.subflows_gained == 0).all()
    assert (table.refused_on_wire == 50).all()
    # the right hint with a wrong HMAC (and the replayed tag) pass the CRC and are refused at the HMAC
    by = table.set_index("variant")
    assert by.loc["right-hint", "passed_hint"] == 50 and by.loc["replay", "passed_hint"] == 50
    assert doc["victim_after"] == {"bytes_sent": 20000, "bytes_intact": True, "subflows": 2}
    assert doc["seconds"] < 60, doc["seconds"]


def test_the_report_shows_the_measurement_found_in_the_results_directory(tmp_path):
    import json

    from synthetic_store import generate

    from analysis import load
    from analysis.esim_security import FORGERY_FILE
    from analysis.figures import esim as esim_section

    store = generate(tmp_path / "results", reps=1, seed=3)
    assert "esim_forgery" not in esim_section.build(load(store)).tables
    (store / FORGERY_FILE).write_text(json.dumps(_doc(200)))
    sec = esim_section.build(load(store))
    assert sec.tables["esim_forgery"].holds.all() and "esim_forgery" in sec.inline
    assert list(sec.tables["esim_forgery"].synacks) == [200] * 4
    assert any("2 subflow(s) and carried 20000 bytes intact" in n for n in sec.notes)
    # an invalid measurement is no table, and the report says why
    (store / FORGERY_FILE).write_text(json.dumps({**_doc(200), "invalid": "random-tag: capture lost 3 packets"}))
    sec = esim_section.build(load(store))
    assert "esim_forgery" not in sec.tables
    assert any("is invalid: random-tag: capture lost 3 packets" in n for n in sec.notes)


@pytest.mark.root
def test_bad_input_is_refused_in_one_line_before_anything_is_built():
    from tests.conftest import assert_one_line_error, run_tb
    assert_one_line_error(run_tb("bench.esim-forgery", "--variants", "random-tag,nope"), "variants", "nope")
    assert_one_line_error(run_tb("bench.esim-forgery", "--attempts", "6000"), "attempts", "5000")
    assert_one_line_error(run_tb("bench.esim-forgery", "--attempts", "many"), "--attempts", "many")
