"""The results store: one directory per run, complete or clearly not.

A run is written into results/<experiment>/.tmp-<run-id>/ and renamed into
place at the end, so a directory named <run-id> is never half-written. A
failed run is kept with status "failed" and its reason. A `.tmp-` directory
whose writer is gone (kill -9) is removed and the run redone on resume.
"""
from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from testbed.core.state import alive, start_time

SCHEMA_VERSION = 1
TABLES = ("events", "timeseries", "subflows", "packets")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class RunWriter:
    def __init__(self, root: Path, experiment: str, run_id: str):
        self.final = root / experiment / run_id
        self.tmp = root / experiment / f".tmp-{run_id}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        (self.tmp / "raw").mkdir(parents=True)
        # Who is writing: lets a resumed sweep tell a crashed writer from a live one.
        (self.tmp / ".writer").write_text(json.dumps([os.getpid(), start_time(os.getpid())]))

    @property
    def raw_dir(self) -> Path:
        return self.tmp / "raw"

    def write_tables(self, tables: dict[str, pd.DataFrame]) -> None:
        for name, frame in tables.items():
            if name not in TABLES:
                raise ValueError(f"unknown table {name!r}")
            if frame is not None and len(frame):
                frame.to_parquet(self.tmp / f"{name}.parquet", index=False)

    def finish(self, manifest: dict[str, Any], metrics: dict[str, Any]) -> Path:
        (self.tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, default=_jsonable))
        manifest = {"schema_version": SCHEMA_VERSION, **manifest}
        (self.tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=_jsonable))
        (self.tmp / ".writer").unlink(missing_ok=True)
        if self.final.exists():  # a retried failed run replaces the old one
            shutil.rmtree(self.final)
        os.rename(self.tmp, self.final)
        return self.final


def _jsonable(x: Any) -> Any:
    if hasattr(x, "model_dump"):
        return x.model_dump(mode="json")
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):  # numpy scalars
        return x.item()
    return str(x)


def run_status(root: Path, experiment: str, run_id: str) -> str | None:
    """'complete' / 'failed' / 'invalid' for a finished run, None if absent."""
    manifest = root / experiment / run_id / "manifest.json"
    try:
        return json.loads(manifest.read_text()).get("status")
    except (OSError, json.JSONDecodeError):
        return None


def remove_abandoned(root: Path, experiment: str) -> list[str]:
    """Delete .tmp- run directories whose writer process no longer exists."""
    removed = []
    for tmp in sorted((root / experiment).glob(".tmp-*")):
        try:
            pid, st = json.loads((tmp / ".writer").read_text())
            if alive(pid, st):
                continue
        except (OSError, json.JSONDecodeError, ValueError):
            pass
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp.name)
    return removed


def list_runs(root: Path) -> pd.DataFrame:
    rows = []
    for manifest in sorted(root.glob("*/*/manifest.json")):
        if manifest.parent.name.startswith(".tmp-"):
            continue
        try:
            m = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        rows.append({"experiment": m.get("experiment"), "run_id": m.get("run_id"),
                     "status": m.get("status"), "reason": m.get("reason", ""),
                     "params": json.dumps(m.get("params", {}), sort_keys=True),
                     "repetition": m.get("repetition"), "start": m.get("start"),
                     "duration_s": m.get("duration_s")})
    return pd.DataFrame(rows)


