"""Conformance mode: every case against this machine's kernel in private namespaces.

Each case must come out as recorded (the outcome observed on Linux 6.18): a
kernel that behaves differently fails its case here, so a change shows up as
a named difference. The verdict logic and the CLI are checked as well.
"""
from __future__ import annotations

import json
import subprocess

import pytest

from testbed.stack.scripted import ScriptError
from testbed.stack.trace import dissect
from testbed.tools.conformance import (CONFORMS, DEVIATES, ERROR, INCONCLUSIVE, Case, Observation, all_cases,
                                       get_case, run_case)
from testbed.tools.conformance.lab import KERNEL_ADDR
from tests.conftest import assert_one_line_error, run_tb

CASE_NAMES = [c.name for c in all_cases()]


def test_at_least_fifteen_cases_each_saying_what_the_rfc_says_and_what_it_sends():
    assert len(CASE_NAMES) >= 15
    for c in all_cases():
        assert c.section and len(c.rfc_says) > 30 and c.description, c.name
        assert c.recorded and c.conforming, c.name


def test_verdict_follows_the_outcome():
    c = get_case("join-wrong-hmac")
    assert c.verdict("RST with MP_TCPRST reason 1") == CONFORMS
    assert c.verdict("no answer") == DEVIATES
    assert c.verdict(INCONCLUSIVE) == INCONCLUSIVE


@pytest.mark.root
@pytest.mark.parametrize("name", CASE_NAMES)
def test_kernel_behaves_as_recorded(name):
    c = get_case(name)
    r = run_case(c)
    assert r.verdict != ERROR, r.detail
    assert r.as_recorded, f"{name}: {'; '.join(r.differences())} ({r.detail})"
    assert r.seconds < 5, f"{name} took {r.seconds:.1f} s"


def _case(script, counters=None) -> Case:
    return Case("scratch", "3.1", "test only", frozenset({"fine"}), "fine", script, counters=counters or {})


@pytest.mark.root
def test_a_deviation_an_unfinished_script_and_a_crash_get_their_own_verdicts():
    assert run_case(_case(lambda lab: Observation("odd", "x"))).verdict == DEVIATES
    # A counter recorded as moving that did not move is a difference, even with the same outcome.
    r = run_case(_case(lambda lab: Observation("fine", "x"), {"MPTcpExtMPCapableSYNRX": 1}))
    assert r.verdict == CONFORMS and r.differences() == ["MPTcpExtMPCapableSYNRX +0, recorded +1"]
    def stuck(lab):
        raise ScriptError("no SYN/ACK")
    r = run_case(_case(stuck))
    assert (r.verdict, r.detail) == (INCONCLUSIVE, "no SYN/ACK")
    def crash(lab):
        raise ValueError("boom")
    r = run_case(_case(crash))
    assert r.verdict == ERROR and "boom" in r.detail


@pytest.mark.root
def test_a_lab_leaves_nothing_in_the_host():
    def host_state() -> tuple[str, str]:
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
        return links, tables
    before = host_state()
    r = run_case(get_case("mp-prio-backup"))
    assert r.verdict != ERROR, r.detail
    assert host_state() == before


@pytest.mark.root
def test_cli_json_and_a_pcap_that_tshark_reads_the_same(tmp_path):
    proc = run_tb("conformance", "--case", "join-wrong-hmac", "--case", "mp-capable-version-0", "--json",
                  "--pcap", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["kernel"] and [c["case"] for c in doc["cases"]] == ["join-wrong-hmac", "mp-capable-version-0"]
    assert {c["verdict"] for c in doc["cases"]} <= {CONFORMS, DEVIATES}
    # tshark, not our codec, reads the kernel's answer: a RST carrying MP_TCPRST reason 1.
    rows = dissect(tmp_path / "join-wrong-hmac.pcap", ["ip.src", "tcp.flags.reset", "tcp.options.mptcp.rst_reason"])
    assert rows and not any(r.malformed for r in rows)
    resets = [r for r in rows if r.get("ip.src") == [KERNEL_ADDR] and r.get("tcp.flags.reset") == ["1"]]
    assert [int(r.get("tcp.options.mptcp.rst_reason")[0], 0) for r in resets] == [1]


@pytest.mark.root
def test_cli_refuses_an_unknown_case_before_running_any():
    proc = run_tb("conformance", "--case", "mp-capable-version-0", "--case", "no-such-case")
    assert_one_line_error(proc, "no-such-case")
    assert "kernel" not in proc.stdout
