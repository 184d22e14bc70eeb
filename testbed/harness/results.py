"""The results store: one directory per run, complete or clearly not.

A run is written into results/<experiment>/.tmp-<run-id>/ and renamed into
place at the end, so a directory named <run-id> is never half-written. A
failed run is kept with status "failed" and its reason. A `.tmp-` directory
whose writer is gone (kill -9) is removed and the run redone on resume.

Several processes may write one store: whoever writes a run holds its lock
(`RunLock`, flock on results/.locks/<experiment>/<run-id>), which the kernel
releases when the process dies, so a held lock means "being written" and a
free one over a `.tmp-` directory means "abandoned".
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from testbed.harness.schema import SCHEMA_VERSION, TABLES, conform


def now_iso() -> str:
    """The current UTC time in ISO 8601 with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class RunLock:
    """The one-writer lock of a run: exclusive, non-blocking, released by the
    kernel when its process dies (so it can never be left stale)."""

    def __init__(self, root: Path, experiment: str, run_id: str):
        # outside results/<experiment>/, which holds run directories only
        self.path = root / ".locks" / experiment / run_id
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> bool:
        """Take the lock if nobody holds it; False when another writer does."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        """Let the next writer in (the lock file stays: deleting it would race a new taker)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


class RunWriter:
    """Writes one run into its .tmp- directory and renames it into place; the
    caller holds the run's RunLock."""

    def __init__(self, root: Path, experiment: str, run_id: str):
        self.final = root / experiment / run_id
        self.tmp = root / experiment / f".tmp-{run_id}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        (self.tmp / "raw").mkdir(parents=True)

    @property
    def raw_dir(self) -> Path:
        """Where the run's raw tool outputs go."""
        return self.tmp / "raw"

    def write_tables(self, tables: dict[str, pd.DataFrame]) -> None:
        """Write the run's tables (known table names only) as Parquet."""
        for name, frame in tables.items():
            if name not in TABLES:
                raise ValueError(f"unknown table {name!r}")
            if frame is not None and len(frame):
                conform(frame, TABLES[name]).to_parquet(self.tmp / f"{name}.parquet", index=False)

    def write(self, manifest: dict[str, Any], metrics: dict[str, Any]) -> None:
        """Write metrics and manifest into the .tmp- directory (not stored yet)."""
        _write_synced(self.tmp / "metrics.json", json.dumps(metrics, indent=1, default=_jsonable))
        manifest = {"schema_version": SCHEMA_VERSION, **manifest}
        _write_synced(self.tmp / "manifest.json", json.dumps(manifest, indent=1, default=_jsonable))

    def finish(self, manifest: dict[str, Any], metrics: dict[str, Any]) -> Path:
        """Write metrics and manifest, then move the run into the store atomically."""
        self.write(manifest, metrics)
        return self.commit()

    def discard(self) -> None:
        """Drop what was written (an attempt that is not to be stored)."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def commit(self) -> Path:
        """Rename the written .tmp- directory into place (a run stored by another
        machine is written there by the caller, file by file, synced)."""
        old = self.final.parent / f".old-{self.final.name}"
        if self.final.exists():  # a retried failed run replaces the old one
            # Aside first: a crash between the renames leaves the run absent (run
            # again on resume), never a half-deleted run that counts as stored.
            shutil.rmtree(old, ignore_errors=True)
            os.rename(self.final, old)
        os.rename(self.tmp, self.final)
        _fsync_dir(self.final.parent)  # the rename itself survives a power cut
        shutil.rmtree(old, ignore_errors=True)
        return self.final


def _write_synced(path: Path, text: str) -> None:
    """Write and fsync: after a crash, a renamed run directory never holds an
    empty or truncated manifest."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def run_stamp(root: Path, experiment: str, run_id: str) -> tuple[str | None, int] | None:
    """(status, the manifest's inode) of a stored run, None if absent. Every store
    of a run renames a new directory into place, so an unchanged stamp means
    nobody stored the run again since it was taken."""
    manifest = root / experiment / run_id / "manifest.json"
    try:
        return run_status(root, experiment, run_id), manifest.stat().st_ino
    except OSError:
        return None


def remove_abandoned(root: Path, experiment: str) -> list[str]:
    """Delete .tmp- (being written) and .old- (being replaced) run directories
    nobody is writing (their run lock is free)."""
    removed = []
    for tmp in sorted([*(root / experiment).glob(".tmp-*"), *(root / experiment).glob(".old-*")]):
        lock = RunLock(root, experiment, tmp.name.removeprefix(".tmp-").removeprefix(".old-"))
        if not lock.acquire():
            continue  # another process is writing this run right now
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp.name)
        finally:
            lock.release()
    return removed


def list_runs(root: Path) -> pd.DataFrame:
    """One row per stored run: experiment, id, status and reason."""
    rows = []
    for manifest in sorted(root.glob("*/*/manifest.json")):
        if manifest.parent.name.startswith((".tmp-", ".old-")):
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


