"""Analysis package: loader schema, statistics, expectation table, report (no root needed).

Everything runs on a synthetic results store written through the real writer by
the test fixture tests/synthetic_store.py, never on committed binaries.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import RUN_COLUMNS, SCHEMAS, ResultsError, load, paths
from analysis.expectations import FAILS, HOLDS, NOT_MEASURED, table
from analysis.stats import bootstrap_ci, ecdf, summarize
from synthetic_store import generate

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("results"), reps=3, seed=2)


@pytest.fixture(scope="module")
def res(store):
    return load(store)


@pytest.fixture(scope="module")
def report(store, tmp_path_factory) -> Path:
    from analysis.report import build_report

    return build_report(store, tmp_path_factory.mktemp("report"))


# ---- loader --------------------------------------------------------------------
def test_tables_have_documented_columns_and_dtypes(res):
    for name, schema in SCHEMAS.items():
        df = getattr(res, name)
        assert list(df.columns[: len(schema)]) == list(schema), name
        for col, dtype in schema.items():
            assert str(df[col].dtype) == dtype, f"{name}.{col}: {df[col].dtype} != {dtype}"
    assert len(res.events) and len(res.timeseries) and len(res.subflows)
    assert res.packets.empty  # no pcaps in the synthetic store: empty but typed


def test_runs_table(res):
    r = res.runs
    for col, dtype in RUN_COLUMNS.items():
        assert str(r[col].dtype) == dtype, col
    assert {"param.condition", "param.strategy", "param.timeout_s", "param.topology.params.rates",
            "metric.setup_s", "metric.outcome", "metric.efficiency"} <= set(r.columns)
    assert str(r["metric.setup_s"].dtype) == "float64"
    assert str(r["metric.outcome"].dtype) == "string"
    assert str(r["metric.syns_sent"].dtype) == "Int64"
    assert str(r["param.topology.params.lte_backup"].dtype) == "boolean"
    assert r["run_id"].is_unique
    assert set(r["status"]) == {"complete", "failed", "invalid"}
    assert not r["run_id"].str.startswith(".tmp-").any()  # half-written runs are skipped
    assert res.problems == []
    # every table row belongs to a known run
    keys = set(zip(r["experiment"], r["run_id"]))
    assert set(zip(res.events["experiment"], res.events["run_id"])) <= keys


def test_loader_fills_missing_columns_and_reports_bad_files(store, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(store / "failover", root / "failover")
    run = sorted(p for p in (root / "failover").iterdir() if p.is_dir())[0]
    pd.DataFrame({"t": [0.5], "source": ["app"], "host": ["client"], "event": ["x"]}).to_parquet(
        run / "events.parquet")  # no token/detail columns
    (run / "subflows.parquet").write_bytes(b"not parquet")
    res = load(root)
    ev = res.events[res.events["run_id"] == run.name]
    assert str(ev["token"].dtype) == "Int64" and ev["token"].isna().all()
    assert any("subflows.parquet" in p for p in res.problems)


def test_load_single_run_and_missing_dir(store):
    run = next(p for p in (store / "throughput").iterdir() if p.is_dir())
    assert len(load(run).runs) == 1
    with pytest.raises(ResultsError):
        load(store / "does-not-exist")


def _establishment_manifest(res, condition: str) -> dict:
    return next(m for (e, _), m in res.manifests.items()
                if e == "establishment" and m["scenario"]["params"]["condition"] == condition)


def test_paths_are_what_the_run_recorded(res):
    ps = {p["name"]: p for p in paths(_establishment_manifest(res, "healthy"))}
    assert ps["wifi"]["default"] and ps["wifi"]["rtt_s"] == pytest.approx(0.020)
    assert ps["lte"]["rtt_s"] == pytest.approx(0.040)
    # the experiment slowed the default path during the run: its recorded end state says so
    slow = {p["name"]: p for p in paths(_establishment_manifest(res, "slow_default"))}
    assert slow["wifi"]["rtt_s"] == pytest.approx(0.200) and slow["lte"]["rtt_s"] == pytest.approx(0.040)
    assert {p["name"]: p["blackholed"] for p in paths(_establishment_manifest(res, "blackhole"))} == \
        {"wifi": ["up", "down"], "lte": []}
    # nothing recorded, nothing made up
    assert paths({"testbed": {"topology": {"paths": [{"name": "wifi", "delay_ms": 10}]}}}) == []


def test_analysis_computes_nothing_the_run_recorded():
    """No copy of an experiment default and no re-implementation of the model's
    per-direction link settings in analysis/."""
    src = "\n".join(f.read_text() for f in (ROOT / "analysis").rglob("*.py"))
    for needle in ("SLOW_DELAY_MS", "slow_delay_ms", '"up"), dict)', "one_way("):
        assert needle not in src, needle


# ---- statistics ----------------------------------------------------------------
def test_bootstrap_ci_sanity():
    rng = np.random.default_rng(0)
    x = rng.normal(10, 2, 50)
    ci = bootstrap_ci(x, "median")
    assert ci.low <= ci.estimate <= ci.high and ci.n == 50
    assert ci.low < 10 < ci.high
    assert bootstrap_ci(x, "median") == ci  # seeded: reproducible
    wide = bootstrap_ci(x[:8], "median")
    assert wide.high - wide.low > ci.high - ci.low  # fewer runs, wider interval
    # NaN means "not measured" and is ignored; one value has no interval
    assert bootstrap_ci([1.0, np.nan, 3.0], "mean").n == 2
    one = bootstrap_ci([2.5])
    assert one.estimate == 2.5 and np.isnan(one.low)
    assert bootstrap_ci([]).n == 0


def test_bootstrap_coverage():
    """The 95 % interval of the mean covers the true mean in roughly 95 % of samples."""
    rng = np.random.default_rng(1)
    hits = 0
    for i in range(200):
        c = bootstrap_ci(rng.exponential(1.0, 40), "mean", n_boot=1000, seed=i)
        hits += c.low <= 1.0 <= c.high
    assert 0.85 <= hits / 200 <= 0.99


def test_ecdf_and_summarize():
    x, y = ecdf([3.0, 1.0, np.nan, 2.0], n_total=5)
    assert list(x) == [1.0, 2.0, 3.0] and y[-1] == pytest.approx(0.6)  # 2 of 5 never got there
    df = pd.DataFrame({"g": ["a", "a", "b"], "v": [1.0, 3.0, np.nan]})
    s = summarize(df, ["g"], "v")
    assert list(s["n"]) == [2, 0] and s.loc[0, "median"] == 2.0


# ---- expectation table -------------------------------------------------------------
def _no_empty_cells(t: pd.DataFrame) -> None:
    assert not t.isna().any().any()
    assert not (t.astype(str).apply(lambda c: c.str.strip()) == "").any().any()
    assert set(t["verdict"]) <= {HOLDS, FAILS, NOT_MEASURED}


def test_expectations_complete_store(res):
    t = table(res)
    _no_empty_cells(t)
    assert {"draft-amend-tcpm-mptcp-robe-02, Table 1", "physical limit"} <= set(t["source"].str.split(" /").str[0])
    # the user reads the documents' and the project's words, never the tracker's
    allowed = ("draft-amend-tcpm-mptcp-robe-02", "RFC 8684", "RFC 6356", "physical limit",
               "this testbed's target", "draft-bagnulo-mptcp-privacy-00", "draft-hoang-mptcp-sub-rate-limit-00",
               "draft-hoang-mptcp-inactivity-time-00")
    for source in t["source"]:
        assert all(part.strip().startswith(allowed) for part in source.split(" / ")), source
    assert not t.apply(lambda c: c.astype(str).str.contains(r"\bissue|notes/", regex=True)).any().any()
    # the draft's eSIM column, from the user-space stack on both sides
    esim = t[t["subject"].str.startswith("eSIM") & t["source"].str.contains("Table 1")]
    assert len(esim) >= 7 and (esim["verdict"] != NOT_MEASURED).sum() >= 6
    # the synthetic store follows the mechanisms: these must come out right
    def verdict(subject: str, cond: str) -> str:
        return t[(t["subject"] == subject) & (t["condition"] == cond)]["verdict"].iloc[0]
    assert verdict("MPTCP", "broken (blackhole)") == HOLDS  # no connection
    assert verdict("SIM", "broken (blackhole)") == HOLDS
    assert verdict("MPTCP", "MPTCP SYNs dropped (mptcp_drop)") == HOLDS
    assert (t["verdict"] == HOLDS).sum() > len(t) / 2


def test_expectations_without_runs_say_not_measured(store, tmp_path):
    root = tmp_path / "only-failover"
    shutil.copytree(store / "failover", root / "failover")
    t = table(load(root))
    _no_empty_cells(t)
    est = t[t["source"].str.startswith("draft")]
    assert (est["verdict"] == NOT_MEASURED).all()
    assert est["measured"].str.startswith("not measured").all()


# ---- report --------------------------------------------------------------------
SECTIONS = ["provenance", "expectations", "establishment", "esim", "failover", "throughput", "emulation", "runs"]
FIGURES = ["establishment_setup_ecdf", "establishment_multipath", "establishment_outcomes", "esim_multipath",
           "failover_timeline", "failover_distributions", "throughput_efficiency",
           "throughput_shares", "emulation_benchmark", "emulation_calibration"]


def test_report_has_every_section_and_figure(report):
    html = report.read_text()
    out = report.parent
    for s in SECTIONS:
        assert f'id="{s}"' in html, s
    for f in FIGURES:
        assert f'<figure id="{f}">' in html, f
        for ext in ("png", "pdf"):
            assert (out / f"{f}.{ext}").stat().st_size > 1000, f"{f}.{ext}"
    assert html.count("data:image/png;base64,") == len(FIGURES)
    assert not re.search(r'src="(?!data:)', html)  # self-contained: nothing loaded from elsewhere
    for csv in ("expectations.csv", "runs.csv", "establishment_summary.csv", "failover_summary.csv",
                "esim_summary.csv", "robe_stacks.csv"):
        assert (out / csv).is_file(), csv
    assert "0123456789abcdef" in html  # provenance: the commit
    assert "ENOTCONN" in html and "calibration: wifi" in html  # failed/invalid runs with reasons


def test_report_skips_families_without_data(store, tmp_path):
    from analysis.report import build_report

    root = tmp_path / "only-throughput"
    shutil.copytree(store / "throughput", root / "throughput")
    html = build_report(root, tmp_path / "out").read_text()
    for s in SECTIONS:
        assert f'id="{s}"' in html
    assert "No complete runs of failover" in html and "No complete runs of establishment" in html
    assert '<figure id="throughput_efficiency">' in html


def test_report_task_errors_are_one_line(tmp_path):
    from conftest import assert_one_line_error, run_tb

    empty = tmp_path / "empty"
    empty.mkdir()
    for d in (tmp_path / "missing", empty):
        proc = run_tb("report", str(d), "--out", str(tmp_path / "o"))
        assert_one_line_error(proc, "error:")
        assert proc.returncode == 2  # the exit status of every user error, in every task


def test_notebook_is_valid_and_clean():
    nb = json.loads((ROOT / "analysis" / "notebooks" / "explore.ipynb").read_text())
    assert nb["nbformat"] == 4 and nb["cells"]
    for c in nb["cells"]:
        assert c["cell_type"] in ("markdown", "code") and "id" in c
        if c["cell_type"] == "code":
            assert c["outputs"] == [] and c["execution_count"] is None


def test_notebook_runs_against_the_test_store(store, monkeypatch):
    """Every cell of the shipped notebook executes (nbclient + ipykernel, pinned)
    against the test store and draws its figures."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "analysis" / "notebooks" / "explore.ipynb", as_version=4)
    monkeypatch.setenv("MPTB_RESULTS", str(store))
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "analysis" / "notebooks")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2, [o.output_type for o in outputs]


def test_grid_points_are_labelled_in_words(res):
    from analysis.figures import variant_label

    failover = set(variant_label(res.of("failover")))
    assert {"WiFi blackholed, LTE backup", "WiFi link down, LTE regular", "WiFi 100 % loss, LTE backup",
            "WiFi blackholed, LTE backup flag cleared (MP_PRIO), LTE backup"} <= failover
    throughput = set(variant_label(res.of("throughput")))
    assert "10/10 Mbit/s, 0/0 ms one way, cubic" in throughput
    for label in failover | throughput:
        assert "=" not in label and "events." not in label and "params." not in label, label


def test_figure_texts_never_overlap(res):
    """Panel titles, fault annotations and tick labels of every report figure
    keep clear of each other (what a reader would see as overprinted text)."""
    from analysis.figures import esim, establishment, failover, throughput

    for family in (establishment, esim, failover, throughput):
        for fig in family.build(res).figures:
            fig.fig.canvas.draw()
            r = fig.fig.canvas.get_renderer()
            for ax in fig.fig.axes:
                texts = [t for t in [ax.title, *ax.texts] if t.get_text()]
                boxes = [t.get_window_extent(r) for t in texts]
                for i in range(len(boxes)):
                    for j in range(i + 1, len(boxes)):
                        assert not boxes[i].overlaps(boxes[j]), \
                            (fig.name, texts[i].get_text(), texts[j].get_text())
            titles = [(ax.title.get_window_extent(r), ax.title.get_text()) for ax in fig.fig.axes
                      if ax.title.get_text()]
            for i in range(len(titles)):
                for j in range(i + 1, len(titles)):
                    assert not titles[i][0].overlaps(titles[j][0]), (fig.name, titles[i][1], titles[j][1])
