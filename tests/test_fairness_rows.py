"""The fairness expectation rows per implementation (kernel MPTCP, the user-space stack's
LIA / OLIA / CUBIC), judged on hand-made runs (no namespaces)."""
from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path

import pandas as pd
import pytest

from analysis import Results
from analysis.expectations import FAILS, HOLDS, IMPLEMENTATIONS, NOT_MEASURED, _fairness_rows


def run(i, stack, cc, shared, ratio, mptcp, tcp_max, jain):
    """One complete fairness run's columns as the store loads them."""
    return {"experiment": "fairness", "run_id": f"r{i}", "status": "complete", "metric.stack": stack,
            "metric.cc": cc, "metric.shared_bottleneck": shared, "metric.mptcp_share_ratio": ratio,
            "metric.mptcp_goodput_mbit": mptcp, "metric.tcp_max_goodput_mbit": tcp_max, "metric.jain_index": jain}


def results(rows) -> Results:
    empty = pd.DataFrame()
    runs = pd.DataFrame(rows) if rows else pd.DataFrame(columns=["experiment", "run_id", "status"])
    tables = {f.name: empty for f in fields(Results)
              if f.name not in ("root", "runs") and f.default is MISSING and f.default_factory is MISSING}
    return Results(Path("."), runs, **tables)


def verdicts(rows) -> dict[tuple[str, str], str]:
    return {(r.subject, r.condition.split(" (")[0]): r.verdict for r in _fairness_rows(results(rows))}


def test_each_implementation_is_judged_on_its_own_runs():
    rows = [
        # kernel: uncoupled subflows take two shares at the shared bottleneck (harm)
        run(0, "kernel", "cubic", True, 1.4, 12, 8, 0.9), run(1, "kernel", "cubic", False, 1.3, 20, 10, 0.9),
        # LIA: one share at the shared bottleneck, balanced on disjoint paths
        run(2, "user", "lia", True, 0.95, 9, 10, 0.99), run(3, "user", "lia", False, 1.0, 10, 10, 0.98),
        # CUBIC on the user stack: the uncoupled control harms like the kernel
        run(4, "user", "cubic", True, 1.35, 12, 8, 0.9),
    ]
    v = verdicts(rows)
    assert v[("kernel MPTCP", "shared bottleneck")] == FAILS
    assert v[("user-space stack, LIA", "shared bottleneck")] == HOLDS
    assert v[("user-space stack, LIA", "disjoint paths")] == HOLDS
    assert v[("user-space stack, CUBIC (uncoupled control)", "shared bottleneck")] == FAILS
    # no OLIA runs, no disjoint CUBIC runs: said so, with which runs are missing
    by = {(r.subject, r.condition): r for r in _fairness_rows(results(rows))}
    olia = [r for (s, _c), r in by.items() if s == "user-space stack, OLIA"]
    assert len(olia) == 3 and all(r.verdict == NOT_MEASURED for r in olia)
    assert "stack user, cc olia" in olia[0].measured
    cubic_dj = by[("user-space stack, CUBIC (uncoupled control)", "disjoint paths (improve throughput)")]
    assert cubic_dj.verdict == NOT_MEASURED and "disjoint paths" in cubic_dj.measured


def test_runs_from_before_the_stack_choice_count_as_kernel_runs():
    old = run(0, None, "cubic", True, 0.9, 9, 10, 0.99)
    v = verdicts([old])
    assert v[("kernel MPTCP", "shared bottleneck")] == HOLDS
    assert v[("user-space stack, LIA", "shared bottleneck")] == NOT_MEASURED


@pytest.mark.parametrize("rows", [[], [{"experiment": "throughput", "run_id": "x", "status": "complete"}]])
def test_without_fairness_runs_every_row_says_not_measured(rows):
    out = _fairness_rows(results(rows))
    assert len(out) == 3 * len(IMPLEMENTATIONS)
    assert all(r.verdict == NOT_MEASURED and r.measured.startswith("not measured") for r in out)


def test_share_figure_tells_the_implementations_apart():
    from analysis.figures.fairness import implementation, share_figure
    rows = []
    for i, (stack, cc) in enumerate([("kernel", "cubic"), ("user", "lia"), ("user", "olia"), ("user", "cubic")]):
        for m, shared in ((1, True), (2, True), (1, False), (2, False)):
            r = run(10 * i + 2 * m + shared, stack, cc, shared, 1.0, 10, 10, 0.97)
            rows.append({**r, "metric.tcp_flows": m, "metric.mptcp_share": 0.3 + 0.1 * i})
    runs = pd.DataFrame(rows)
    assert list(implementation(runs).unique()) == ["kernel MPTCP (cubic)", "user stack, LIA", "user stack, OLIA",
                                                   "user stack, CUBIC"]
    fig = share_figure(runs)
    labels = [t.get_text() for t in fig.fig.legends[0].get_texts()]
    assert labels[:4] == ["kernel MPTCP (cubic)", "user stack, LIA", "user stack, OLIA", "user stack, CUBIC"]
    assert [a.get_title() for a in fig.fig.axes] == ["shared bottleneck"] * 2 + ["disjoint paths"] * 2
