"""The results store: one schema for writer and reader, versions upgraded or
refused, and several writers on one store (each run stored once)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT
from testbed.harness import schema
from testbed.harness.results import RunLock, RunWriter, remove_abandoned

# The cheapest real runs: plain TCP connects over a healthy path, no calibration.
TWO_WRITERS = textwrap.dedent("""
    experiment = "establishment"
    repetitions = 3
    seed = 21
    timeout_s = 60
    backend = "bridge"
    calibrate = false
    probes = ["nstat"]
    [topology]
    name = "two-path"
    params = { rate_mbit = 20, wifi_delay_ms = 0, lte_delay_ms = 0 }
    [params]
    timeout_s = 3
    [grid]
    "params.strategy" = ["tcp", "mptcp"]
""")

SWEEP = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from testbed.harness import scenario
    from testbed.harness.runner import sweep
    s = sweep(scenario.load(sys.argv[1]), Path(sys.argv[2]), progress=False)
    print(json.dumps({"planned": s.planned, "skipped": s.skipped, "done": s.done}))
""")


@pytest.mark.root
def test_two_sweeps_on_one_store_store_every_run_once(tmp_path):
    scenario = tmp_path / "s.toml"
    scenario.write_text(TWO_WRITERS)
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-c", SWEEP, str(scenario), str(store)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    planned = outs[0]["planned"]
    assert planned == 6
    # every run done by exactly one of the two processes...
    assert sum(o["done"].get("complete", 0) for o in outs) == planned, outs
    assert not any(set(o["done"]) - {"complete"} for o in outs), outs
    # ... and stored once, complete, with nothing half-written left over
    manifests = sorted((store / "establishment").glob("*/manifest.json"))
    assert len(manifests) == planned
    assert {json.loads(m.read_text())["status"] for m in manifests} == {"complete"}
    assert sorted(p.name for p in (store / "establishment").iterdir()) == \
        sorted(m.parent.name for m in manifests)  # runs only: no .tmp- left, locks kept elsewhere
    # two processes never share a testbed id (nor its state file): every testbed
    # built has an id of its own, named after the process that built it; a run
    # that reused its predecessor's testbed carries that testbed's id
    docs = [json.loads(m.read_text()) for m in manifests]
    ids = [d["testbed"]["run_id"] for d in docs]
    built = sum(1 for d in docs if not d["testbed_reuse"]["reused"])
    assert len(set(ids)) == built, ids
    assert {int(i.rsplit("-", 1)[1]) for i in ids} <= {p.pid for p in procs}, ids


def test_run_lock_is_exclusive_and_released_with_its_process(tmp_path):
    held = RunLock(tmp_path, "exp", "abc-r000")
    assert held.acquire()
    other = RunLock(tmp_path, "exp", "abc-r000")
    assert not other.acquire()  # flock is per open file: a second writer is refused
    held.release()
    assert other.acquire()
    other.release()
    # a lock held by a process that died is free again (the kernel drops it)
    code = (f"from testbed.harness.results import RunLock; from pathlib import Path\n"
            f"assert RunLock(Path({str(tmp_path)!r}), 'exp', 'abc-r000').acquire()\n"
            f"import os; os._exit(0)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    assert RunLock(tmp_path, "exp", "abc-r000").acquire()


def test_abandoned_tmp_is_removed_only_when_no_writer_holds_it(tmp_path):
    lock = RunLock(tmp_path, "exp", "live-r000")
    assert lock.acquire()
    live = RunWriter(tmp_path, "exp", "live-r000")
    dead = tmp_path / "exp" / ".tmp-dead-r000"
    (dead / "raw").mkdir(parents=True)
    assert remove_abandoned(tmp_path, "exp") == [".tmp-dead-r000"]
    assert live.tmp.is_dir()  # its writer holds the lock: left alone
    lock.release()


def test_manifest_is_flushed_before_the_rename(tmp_path, monkeypatch):
    import os

    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    w = RunWriter(tmp_path, "exp", "x-r000")
    final = w.finish({"experiment": "exp", "run_id": "x-r000", "status": "complete"}, {})
    assert any(p.endswith("/.tmp-x-r000/manifest.json") for p in synced), synced
    assert json.loads((final / "manifest.json").read_text())["schema_version"] == schema.SCHEMA_VERSION


def test_a_replaced_run_is_moved_aside_first_and_a_crash_between_leaves_it_absent(tmp_path, monkeypatch):
    from testbed.harness.results import remove_abandoned, run_stamp

    RunWriter(tmp_path, "exp", "x-r000").finish({"run_id": "x-r000", "status": "failed"}, {})
    renames, real_rename = [], os.rename

    def crash_after_the_first(src, dst):
        renames.append((Path(src).name, Path(dst).name))
        if len(renames) == 2:
            raise OSError("power cut")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_after_the_first)
    with pytest.raises(OSError, match="power cut"):
        RunWriter(tmp_path, "exp", "x-r000").finish({"run_id": "x-r000", "status": "complete"}, {})
    monkeypatch.undo()
    assert renames[0] == ("x-r000", ".old-x-r000")  # aside, not deleted file by file
    assert run_stamp(tmp_path, "exp", "x-r000") is None  # absent: a resume runs it again
    assert sorted(remove_abandoned(tmp_path, "exp")) == [".old-x-r000", ".tmp-x-r000"]
    final = RunWriter(tmp_path, "exp", "x-r000").finish({"run_id": "x-r000", "status": "complete"}, {})
    RunWriter(tmp_path, "exp", "x-r000").finish({"run_id": "x-r000", "status": "complete"}, {})
    assert sorted(p.name for p in (tmp_path / "exp").iterdir() if not p.name.startswith(".lock")) == \
        ["x-r000"], list((tmp_path / "exp").iterdir())
    assert json.loads((final / "manifest.json").read_text())["status"] == "complete"


# ---- one schema -----------------------------------------------------------------
def test_writer_stores_the_schema_columns_and_dtypes(tmp_path):
    w = RunWriter(tmp_path, "exp", "x-r000")
    w.write_tables({"events": pd.DataFrame({"t": [0.5], "source": ["app"], "host": ["client"],
                                            "event": ["first_byte"]})})
    final = w.finish({"experiment": "exp", "run_id": "x-r000", "status": "complete"}, {})
    df = pd.read_parquet(final / "events.parquet")
    assert {c: str(t) for c, t in df.dtypes.items()} == schema.TABLES["events"]


def test_reader_and_writer_share_one_schema():
    import analysis
    from testbed.harness.probes import base

    assert analysis.RUN_COLUMNS is schema.RUN_COLUMNS
    assert base.SCHEMAS is schema.TABLES
    for name, cols in schema.TABLES.items():
        assert analysis.SCHEMAS[name] == {**schema.KEYS, **cols}


V1_LINK = {"rate_mbit": 20.0, "delay_ms": 100.0, "jitter_ms": 0.0, "loss_pct": 0.0}


def _store_in_old_format(tmp_path: Path, version: int) -> Path:
    """A run directory as version-1 code wrote it: links_at_end held each link's
    parameters only, and no record of the changes applied during the run."""
    run = tmp_path / "store" / "throughput" / "aaaa-r000"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({
        "schema_version": version, "experiment": "throughput", "run_id": "aaaa-r000",
        "params": {}, "repetition": 0, "seed": 1, "status": "complete", "reason": "",
        "links_at_end": {"wifi": {"up": V1_LINK, "down": V1_LINK}}}))
    (run / "metrics.json").write_text("{}")
    return tmp_path / "store"


def test_reader_upgrades_a_version_1_store(tmp_path):
    from analysis import load

    res = load(_store_in_old_format(tmp_path, 1))
    man = res.manifests[("throughput", "aaaa-r000")]
    assert man["schema_version"] == schema.SCHEMA_VERSION
    assert man["links_at_end"]["wifi"]["up"] == V1_LINK  # what version 1 recorded stays
    # what it did not record is "not recorded", never a guess
    assert man["links_at_end"]["wifi"]["blackholed"] is None
    assert man["applied_events"] is None
    assert res.problems == [] and list(res.runs["status"]) == ["complete"]


def test_reader_upgrades_a_version_2_establishment_run(tmp_path):
    """Version 2 called the establishment condition `scenario`; the reader
    presents it as `condition`, as version 3 writes it."""
    from analysis import load

    run = tmp_path / "store" / "establishment" / "bbbb-r000"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({
        "schema_version": 2, "experiment": "establishment", "run_id": "bbbb-r000",
        "scenario": {"experiment": "establishment", "params": {"timeout_s": 8, "scenario": "blackhole"},
                     "grid": {}},
        "params": {"params.scenario": "blackhole", "params.strategy": "sim"},
        "repetition": 0, "seed": 1, "status": "complete", "reason": "",
        "links_at_end": {}, "applied_events": []}))
    (run / "metrics.json").write_text(json.dumps({"setup_s": 0.041}))
    res = load(tmp_path / "store")
    row = res.runs.iloc[0]
    assert row["param.condition"] == "blackhole" and row["param.strategy"] == "sim"
    assert "param.scenario" not in res.runs.columns
    assert res.manifests[("establishment", "bbbb-r000")]["schema_version"] == schema.SCHEMA_VERSION


def test_reader_upgrades_a_version_3_run_without_phases(tmp_path):
    """Version 3 did not time a run's phases: they read as not recorded (None)."""
    from analysis import load

    man = load(_store_in_old_format(tmp_path, 3)).manifests[("throughput", "aaaa-r000")]
    assert man["schema_version"] == schema.SCHEMA_VERSION and man["phases"] is None


@pytest.mark.parametrize("version, needle", [
    (schema.SCHEMA_VERSION + 1, "newer than this code reads"),
    ("1", "is not a version number"),
    (0, "cannot be upgraded"),
])
def test_reader_refuses_a_store_it_cannot_read(tmp_path, version, needle):
    from analysis import ResultsError, load

    with pytest.raises(ResultsError) as exc:
        load(_store_in_old_format(tmp_path, version))
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_report_of_a_newer_store_is_one_line_and_exit_2(tmp_path):
    from conftest import run_tb

    store = _store_in_old_format(tmp_path, schema.SCHEMA_VERSION + 1)
    proc = run_tb("report", str(store), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "newer than this code reads" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_reader_upgrades_a_version_4_calibration_and_events(tmp_path):
    """Version 4 calibrated a path against its access link only and had no
    cross-traffic events: links, composed spec and flow read as not recorded."""
    from analysis import load

    store = _store_in_old_format(tmp_path, 4)
    path = store / "throughput" / "aaaa-r000" / "manifest.json"
    old = json.loads(path.read_text())
    old["emulation"] = {"backend": "userspace", "calibration": {"valid": True, "paths": {
        "wifi": {"rtt_configured_ms": 200.0, "rtt_ok": True}}}}
    old["applied_events"] = [{"action": "link_down", "path": "wifi", "ok": True}]
    path.write_text(json.dumps(old))
    man = load(store).manifests[("throughput", "aaaa-r000")]
    assert man["schema_version"] == schema.SCHEMA_VERSION
    assert man["emulation"]["calibration"]["paths"]["wifi"] == {
        "links": None, "composed": None, "rtt_configured_ms": 200.0, "rtt_ok": True}
    assert man["applied_events"] == [{"flow": None, "action": "link_down", "path": "wifi", "ok": True}]


def test_reader_upgrades_a_version_5_packets_table_with_the_draft_options_not_recorded(tmp_path):
    """Version 5's packets table had no decoded experimental options: they read as NA
    (not recorded), where a version-6 table says False for a flag not carried."""
    from analysis import load

    store = _store_in_old_format(tmp_path, 5)
    old_columns = {c: d for c, d in schema.TABLES["packets"].items()
                   if c not in ("ito_timer_s", "srl_kbps", "esim_en", "join_cap")}
    pd.DataFrame({"t": [0.1], "path": ["wifi"], "subtype": [2]}).pipe(schema.conform, old_columns) \
        .to_parquet(store / "throughput" / "aaaa-r000" / "packets.parquet")
    res = load(store)
    assert res.manifests[("throughput", "aaaa-r000")]["schema_version"] == schema.SCHEMA_VERSION == 6
    row = res.packets.iloc[0]
    assert row["subtype"] == 2
    for col in ("ito_timer_s", "srl_kbps", "esim_en", "join_cap"):
        assert pd.isna(row[col]), col
    assert str(res.packets["esim_en"].dtype) == "boolean"
