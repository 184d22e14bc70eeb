"""The results store's format, owned in one place: the tables, their columns and
dtypes, the columns of the runs table, and the store's version.

The writer (testbed.harness.results), the probes and workloads that build
tables, and the reader (analysis.load) all take their columns from here, so
what is written is what is read. docs/results.md documents the same.

A manifest carries `schema_version`. The reader passes every manifest through
`upgrade()`: an older version is brought to the current one step by step
(`UPGRADES`), a newer or unknown one is refused with a one-line `SchemaError`.
A change of format adds a step here and raises `SCHEMA_VERSION`.
"""
from __future__ import annotations

from typing import Any, Callable

import pandas as pd

from testbed.base.errors import TestbedError

SCHEMA_VERSION = 6

# Where a run's wall time goes, in the order the runner goes through them
# (manifest `phases`: seconds per phase). Documented in docs/results.md.
PHASES: tuple[str, ...] = ("prepare", "build", "calibrate", "probes_up", "workload",
                           "collect", "teardown", "store")

# The table files of a run directory (<name>.parquet), without the experiment
# and run_id keys the reader adds to every row.
TABLES: dict[str, dict[str, str]] = {
    "events": {"t": "float64", "source": "string", "host": "string", "event": "string",
               "token": "Int64", "detail": "string"},
    "timeseries": {"t": "float64", "host": "string", "series": "string", "key": "string",
                   "value": "float64"},
    "subflows": {"t": "float64", "host": "string", "subflow": "string", "path": "string",
                 "cwnd": "Int64", "srtt_us": "Int64", "bytes_acked": "Int64",
                 "bytes_received": "Int64", "retrans": "Int64", "state": "string"},
    "packets": {"t": "float64", "path": "string", "src": "string", "dst": "string",
                "sport": "Int64", "dport": "Int64", "flags": "string", "subtype": "Int64",
                "token": "Int64", "dsn": "Int64", "data_ack": "Int64", "addr_id": "Int64",
                "mp_flags": "string",
                # the experimental options, decoded by the stack's codec (version 6 on):
                # ITO's timer, SRL's rate (kbit/s), ROBE_eSIM_EN set, MP_JOIN_CAP carried
                "ito_timer_s": "Int64", "srl_kbps": "float64", "esim_en": "boolean",
                "join_cap": "boolean"},
    # What a passive per-path observer learns per subflow (privacy experiment;
    # 64-bit keys and data-sequence bounds in two's complement); `connection` is
    # the ground truth from the client's sockets, never used by an attack.
    "observed_subflows": {"path": "string", "client": "string", "cport": "Int64",
                          "server": "string", "sport": "Int64", "first_t": "float64",
                          "last_t": "float64", "packets": "Int64", "kind": "string",
                          "key_client": "Int64", "key_server": "Int64", "join_token": "Int64",
                          "up_lo": "Int64", "up_hi": "Int64", "down_lo": "Int64",
                          "down_hi": "Int64", "dss": "Int64", "connection": "string"},
}
# What the reader puts in front of every table's rows.
KEYS: dict[str, str] = {"experiment": "string", "run_id": "string"}
# The runs table (one row per run): these first, then param.<name> and metric.<name>.
RUN_COLUMNS: dict[str, str] = {
    **KEYS, "status": "string", "reason": "string",
    "repetition": "Int64", "seed": "Int64", "backend": "string",
    "start": "string", "end": "string",
}


class SchemaError(TestbedError):
    """A run directory this code cannot read as the current schema."""


def keyed(name: str) -> dict[str, str]:
    """Columns of table `name` as the reader returns it: experiment, run_id, then the table's."""
    return {**KEYS, **TABLES[name]}


def conform(df: pd.DataFrame, schema: dict[str, str]) -> pd.DataFrame:
    """Documented columns first with their dtypes (missing ones as NA), extras kept."""
    out = df.copy()
    for col, dtype in schema.items():
        if col not in out.columns:
            out[col] = pd.Series(None, index=out.index, dtype=dtype)   # NA (NaN for float64)
        elif dtype == "Int64" and out[col].dtype == object:
            # Python ints, maybe with None: exactly (a float detour rounds above 2**53)
            out[col] = pd.array([None if v is None or v is pd.NA or v != v else int(v)
                                 for v in out[col]], dtype="Int64")
        elif dtype == "Int64":
            # float columns holding integers (after a NaN) must round-trip exactly
            out[col] = pd.to_numeric(out[col], errors="coerce").round().astype("Int64")
        elif dtype == "float64":
            out[col] = pd.to_numeric(out[col], errors="coerce").astype("float64")
        else:
            out[col] = out[col].astype(dtype)
    extras = [c for c in out.columns if c not in schema]
    return out[list(schema) + extras]


def empty(schema: dict[str, str]) -> pd.DataFrame:
    """A frame with no rows and the schema's columns and dtypes."""
    return pd.DataFrame({c: pd.Series([], dtype=d) for c, d in schema.items()})


# ---- versions ------------------------------------------------------------------
def _v1_to_v2(manifest: dict[str, Any]) -> dict[str, Any]:
    """Version 2 records every change made during a run (`applied_events`) and
    the faults in force per link (`links_at_end` entries gained `carrier`,
    `blackholed`, `middlebox`, `backup`). Version 1 recorded only each link's
    parameters: what it did not record becomes None ("not recorded"), never a
    guess, so a reader can tell "no event" from "not known"."""
    out = dict(manifest)
    links = out.get("links_at_end")
    out["links_at_end"] = {name: {"carrier": None, "blackholed": None, "middlebox": None,
                                  "backup": None, **state}
                           for name, state in links.items()} if isinstance(links, dict) else {}
    out.setdefault("applied_events", None)
    out["schema_version"] = 2
    return out


ESTABLISHMENT = ("establishment", "robe_establishment")


def _v2_to_v3(manifest: dict[str, Any]) -> dict[str, Any]:
    """Version 3 calls the establishment experiment's default-path condition
    `condition` (version 2: `scenario`, a word that also names the TOML file), in
    the scenario's params and in the grid point."""
    out = dict(manifest)
    if out.get("experiment") in ESTABLISHMENT:
        scenario = out.get("scenario")
        if isinstance(scenario, dict) and isinstance(scenario.get("params"), dict) \
                and "scenario" in scenario["params"]:
            params = {("condition" if k == "scenario" else k): v for k, v in scenario["params"].items()}
            grid = scenario.get("grid")
            out["scenario"] = {**scenario, "params": params}
            if isinstance(grid, dict):
                out["scenario"]["grid"] = {("params.condition" if k == "params.scenario" else k): v
                                           for k, v in grid.items()}
        if isinstance(out.get("params"), dict):
            out["params"] = {("params.condition" if k == "params.scenario" else k): v
                             for k, v in out["params"].items()}
    out["schema_version"] = 3
    return out


def _v3_to_v4(manifest: dict[str, Any]) -> dict[str, Any]:
    """Version 4 records each run's wall time by phase (`phases`); version 3 did
    not, so it becomes None ("not recorded")."""
    out = dict(manifest)
    out.setdefault("phases", None)
    out["schema_version"] = 4
    return out


def _v4_to_v5(manifest: dict[str, Any]) -> dict[str, Any]:
    """Version 5 calibrates each path against all of its links composed (version
    4: against its access link only, even on a multi-link path) and records each
    calibrated path's `links` and `composed` spec; `applied_events` entries carry
    `flow` (the cross-traffic events). Upgrading sets those to None ("not
    recorded"): a version-4 `rtt_configured_ms` is the access link's."""
    out = dict(manifest)
    emulation = out.get("emulation")
    calibration = emulation.get("calibration") if isinstance(emulation, dict) else None
    if isinstance(calibration, dict) and isinstance(calibration.get("paths"), dict):
        paths = {name: {"links": None, "composed": None, **entry} if isinstance(entry, dict) else entry
                 for name, entry in calibration["paths"].items()}
        out["emulation"] = {**emulation, "calibration": {**calibration, "paths": paths}}
    events = out.get("applied_events")
    if isinstance(events, list):
        out["applied_events"] = [{"flow": None, **e} if isinstance(e, dict) else e for e in events]
    out["schema_version"] = 5
    return out


def _v5_to_v6(manifest: dict[str, Any]) -> dict[str, Any]:
    """Version 6's packets table decodes the experimental options (ito_timer_s,
    srl_kbps, esim_en, join_cap); a version-5 table has no such columns, and the
    reader fills them with NA ("not recorded", not "absent": a version-6 table says
    False for a flag that was not carried). The manifest itself is unchanged."""
    return {**manifest, "schema_version": 6}


# version -> the step that turns a manifest of that version into the next one
UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {
    1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4, 4: _v4_to_v5, 5: _v5_to_v6}


def upgrade(manifest: dict[str, Any], where: str) -> dict[str, Any]:
    """The manifest in the current schema; SchemaError (one line) when it cannot be."""
    version = manifest.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SchemaError(f"{where}: schema_version {version!r} is not a version number")
    if version > SCHEMA_VERSION:
        raise SchemaError(f"{where}: schema_version {version} is newer than this code reads "
                          f"({SCHEMA_VERSION}); update the testbed to read it")
    while version < SCHEMA_VERSION:
        step = UPGRADES.get(version)
        if step is None:
            raise SchemaError(f"{where}: schema_version {version} cannot be upgraded "
                              f"(oldest readable: {min(UPGRADES)})")
        manifest = step(manifest)
        version = manifest["schema_version"]
    return manifest
