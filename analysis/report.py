"""Build the report: one self-contained HTML page, every figure as PNG and PDF,
and the raw numbers as CSV.

    from analysis.report import build_report
    build_report("results", "build/report")   # -> build/report/report.html

Sections: provenance, expectation table, one per figure family (with a note
instead of a figure when there is no data), runs overview. Nothing here runs
an experiment; the report can be rebuilt from a results directory at any time.
"""
from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path
from typing import Any, Iterable

import matplotlib.pyplot as plt
import pandas as pd
from jinja2 import Environment, select_autoescape
from markupsafe import Markup

from analysis import Results, ResultsError, load
from analysis import expectations
from analysis.figures import (Section, emulation, esim, establishment, failover, fairness, inactivity, privacy,
                              rate_limit, save, throughput)
from testbed.base.safefs import open_for_write, write_file

FAMILIES = (establishment, esim, failover, throughput, fairness, privacy, rate_limit, inactivity)


def _distinct(values: Iterable[Any]) -> str:
    vals = sorted({str(v) for v in values if v not in (None, "")})
    return ", ".join(vals) if vals else "unknown"


def _kernels(releases: Iterable[Any]) -> str:
    """The kernel(s) the runs ran on; runs pooled from machines with different
    kernels are flagged, since MPTCP's behaviour differs between releases."""
    counts: dict[str, int] = {}
    for r in releases:
        if r not in (None, ""):
            counts[str(r)] = counts.get(str(r), 0) + 1
    if len(counts) <= 1:
        return next(iter(counts), "unknown")
    per = ", ".join(f"{k} ({n} runs)" for k, n in sorted(counts.items()))
    return f"MIXED: results from machines with different kernels are pooled: {per}"


def _voided(mans: list[dict]) -> str:
    """How many stored runs replaced attempts the testbed voided (calibration,
    drift check or the link emulator out of tolerance), and the first reason."""
    attempts = [a for m in mans for a in (m.get("voided_attempts") or []) if isinstance(a, dict)]
    if not attempts:
        return "none"
    runs = sum(1 for m in mans if m.get("voided_attempts"))
    return (f"{runs} of {len(mans)} runs, {len(attempts)} voided attempts "
            f"(e.g. {attempts[0].get('reason') or 'no reason stored'})")


def provenance(res: Results) -> list[tuple[str, str]]:
    """What the numbers were measured on; several values mean mixed provenance (shown as such)."""
    mans = list(res.manifests.values())
    if not mans:
        return [("runs", "none")]

    def get(m: dict, *keys: str) -> Any:
        for k in keys:
            m = m.get(k) if isinstance(m, dict) else None
        return m
    starts = [m.get("start") for m in mans if m.get("start")]
    ends = [m.get("end") for m in mans if m.get("end")]
    dirty = {bool(get(m, "git", "dirty")) for m in mans if get(m, "git", "dirty") is not None}
    backends = [get(m, "emulation", "backend") or get(m, "emulation", "calibration", "backend") for m in mans]
    cpus = _distinct(get(m, "host", "cpus") for m in mans)
    return [
        ("results directory", str(res.root.resolve())),
        ("commit", _distinct(get(m, "git", "commit") for m in mans)),
        ("describe", _distinct(get(m, "git", "describe") for m in mans)),
        ("working tree dirty", "yes (results may not match the commit)" if True in dirty
         else "no" if dirty else "unknown"),
        ("kernel", _kernels(get(m, "kernel", "release") for m in mans)),
        ("link-emulation backend", _distinct(backends)),
        ("machine", f"{_distinct(get(m, 'host', 'hostname') for m in mans)} "
                    f"({_distinct(get(m, 'host', 'machine') for m in mans)}, {cpus} CPUs, "
                    f"virtualisation: {_distinct(get(m, 'host', 'virtualisation') for m in mans)})"),
        ("python", _distinct(get(m, "host", "python") or get(m, "tools", "python") for m in mans)),
        ("experiments", _distinct(m.get("experiment") for m in mans)),
        ("runs the testbed voided and ran again", _voided(mans)),
        ("first run started", min(starts) if starts else "unknown"),
        ("last run ended", max(ends) if ends else "unknown"),
        ("report built", dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")),
    ]


def overview(res: Results) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Runs per experiment and status, and the reasons of the failed and invalid ones."""
    r = res.runs
    if r.empty:
        return pd.DataFrame(), pd.DataFrame()
    counts = r.groupby(["experiment", "status"], observed=True).size().unstack(fill_value=0)
    counts["total"] = counts.sum(axis=1)
    counts.columns.name = None  # else to_html prints a stray "status" header cell
    bad = r[r["status"] != "complete"][["experiment", "run_id", "status", "reason"]]
    params = [c for c in r.columns if c.startswith("param.") and r.loc[bad.index, c].notna().any()]
    if params and not bad.empty:  # which grid point failed matters more than its hash
        bad = bad.assign(params=r.loc[bad.index, params].apply(
            lambda row: ", ".join(f"{k[6:]}={v}" for k, v in row.items() if pd.notna(v)), axis=1))
    return counts.reset_index(), bad.fillna("").reset_index(drop=True)


TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>MPTCP testbed report</title>
<style>
 body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1250px; color: #222; padding: 0 1em; }
 h1 { font-size: 1.6em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
 table { border-collapse: collapse; margin: .8em 0; font-size: 13px; }
 th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
 th { background: #f3f3f3; } tr:nth-child(even) td { background: #fafafa; }
 td.v-holds { background: #d9f2e3 !important; font-weight: 600; }
 td.v-does-not-hold { background: #fbdcd4 !important; font-weight: 600; }
 td.v-not-measured { background: #eee !important; color: #555; }
 figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
 figcaption { font-size: 13px; color: #444; max-width: 1000px; }
 .note { background: #fff6d6; border-left: 4px solid #e0b400; padding: .4em .8em; margin: .6em 0; }
 nav a { margin-right: 1em; } .small { font-size: 12px; color: #666; }
</style></head><body>
<h1>MPTCP testbed report</h1>
<nav>{% for id, title in toc %}<a href="#{{ id }}">{{ title }}</a>{% endfor %}</nav>

<h2 id="provenance">Provenance</h2>
<table>{% for k, v in prov %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}</table>
{% for p in problems %}<div class="note">{{ p }}</div>{% endfor %}

<h2 id="expectations">Expected vs measured</h2>
<p>Draft Table 1 (draft-amend-tcpm-mptcp-robe-02), the physical limits and the targets of
the establishment, throughput and failover experiments. Measured values are over complete
runs: median [95 % bootstrap CI] (n = runs) unless stated. Verdicts:
{% for v, n in verdict_counts %}<b>{{ v }}</b> {{ n }}{% if not loop.last %}, {% endif %}{% endfor %}.
CSV: <a href="expectations.csv">expectations.csv</a>.</p>
<table><tr>{% for c in exp_cols %}<th>{{ c }}</th>{% endfor %}</tr>
{% for row in exp_rows %}<tr>{% for c in exp_cols %}
<td{% if c == 'verdict' %} class="v-{{ row[c]|replace(' ', '-') }}"{% endif %}>{{ row[c] }}</td>{% endfor %}</tr>
{% endfor %}</table>

{% for s in sections %}
<h2 id="{{ s.key }}">{{ s.title }}</h2>
<p>{{ s.intro }}</p>
{% for n in s.notes %}<div class="note">{{ n }}</div>{% endfor %}
{% for f in s.figures %}
<figure id="{{ f.name }}"><img alt="{{ f.title }}" src="data:image/png;base64,{{ f.png }}">
<figcaption><b>{{ f.title }}.</b> {{ f.caption }}
<span class="small">Files: <a href="{{ f.name }}.png">PNG</a>, <a href="{{ f.name }}.pdf">PDF</a>.</span></figcaption></figure>
{% endfor %}
{% for t in s.inline %}{{ t }}{% endfor %}
{% if s.csvs %}<p class="small">Raw numbers: {% for c in s.csvs %}<a href="{{ c }}">{{ c }}</a> {% endfor %}</p>{% endif %}
{% endfor %}

<h2 id="runs">Runs overview</h2>
{% if counts_html %}{{ counts_html|safe }}{% else %}<div class="note">No runs found.</div>{% endif %}
{% if bad_html %}<h3>Failed and invalid runs (excluded from every figure and statistic)</h3>{{ bad_html|safe }}
{% else %}<p>No failed or invalid runs.</p>{% endif %}
<p class="small">All runs: <a href="runs.csv">runs.csv</a> (one row per run, param.* and metric.* columns).</p>
</body></html>
"""


def build_report(results_dir: str | Path, out_dir: str | Path,
                 bench_csv: Iterable[Path] | None = None) -> Path:
    """Write report.html, <figure>.png/.pdf and *.csv into out_dir; returns the HTML path.

    Raises ResultsError when results_dir is missing or holds no run.
    """
    res = load(results_dir)
    if res.runs.empty:
        raise ResultsError(f"{results_dir}: no runs (no <experiment>/<run-id>/manifest.json below it)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    exp = expectations.table(res)
    # Root writes here, maybe in a directory others can write to: never through a link.
    with open_for_write(out / "expectations.csv") as f:
        exp.to_csv(f, index=False)
    with open_for_write(out / "runs.csv") as f:
        res.runs.to_csv(f, index=False)

    sections: list[dict[str, Any]] = []
    built: list[Section] = [m.build(res) for m in FAMILIES]
    built.append(emulation.build(res, bench_csv=bench_csv))
    for sec in built:
        figs = []
        for f in sec.figures:
            png = next(p for p in save(f, out) if p.suffix == ".png")
            # embed the very file written: the page and the PNG can never disagree
            figs.append({"name": f.name, "title": f.title, "caption": f.caption,
                         "png": base64.b64encode(png.read_bytes()).decode("ascii")})
            plt.close(f.fig)  # a full report has ~10 large figures: free them as we go
        csvs = []
        for name, df in sec.tables.items():
            with open_for_write(out / f"{name}.csv") as f:
                df.to_csv(f, index=False)
            csvs.append(f"{name}.csv")
        inline = [Markup(df.to_html(index=False, border=0)) for name, df in sec.tables.items()
                  if name in sec.inline]  # pandas escapes the cells
        sections.append({"key": sec.key, "title": sec.title, "intro": sec.intro, "notes": sec.notes,
                         "figures": figs, "csvs": csvs, "inline": inline})

    counts, bad = overview(res)
    toc = [("provenance", "Provenance"), ("expectations", "Expected vs measured"),
           *[(s["key"], s["title"]) for s in sections], ("runs", "Runs")]
    html = Environment(autoescape=select_autoescape(default=True)).from_string(TEMPLATE).render(
        toc=toc, prov=provenance(res), problems=res.problems,
        verdict_counts=list(exp["verdict"].value_counts().items()),
        exp_cols=list(exp.columns), exp_rows=exp.to_dict("records"), sections=sections,
        counts_html=counts.to_html(index=False, border=0) if not counts.empty else "",
        bad_html=bad.to_html(index=False, border=0) if not bad.empty else "",
    )
    path = out / "report.html"
    write_file(path, html)
    return path
