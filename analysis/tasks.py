"""invoke tasks of the analysis package; the root tasks.py mounts `ns`.

    ./tb report DIR [--out OUT]     rebuild the report from existing results (runs nothing)
"""
from __future__ import annotations

from pathlib import Path

from invoke import Collection, Exit, task


@task(help={"dir": "results directory (as written by ./tb run)",
            "out": "where to write report.html, figures and CSVs (default: build/report)"})
def report(c, dir, out="build/report"):
    """Rebuild the HTML report, figures (PNG, PDF) and CSVs from an existing results directory."""
    from analysis import ResultsError
    from analysis.report import build_report

    if not Path(dir).is_dir():
        raise Exit(f"error: results directory {dir} does not exist", code=1)
    try:
        path = build_report(dir, out)
    except ResultsError as exc:
        raise Exit(f"error: {exc}", code=1) from None
    except KeyboardInterrupt:
        raise Exit("interrupted", code=130) from None
    print(f"report: {path}")


ns = Collection(report)
