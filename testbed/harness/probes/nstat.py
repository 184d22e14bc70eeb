"""nstat: MPTcpExt* and Tcp* counter deltas per host over the run.

`nstat -asz --json` (absolute values, zeros too, history file untouched) runs
inside each namespace at start and stop; both dumps are kept in raw/.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from testbed.base.errors import TestbedError
from testbed.harness.probes.base import Probe, ProbeParams, register

PREFIXES = ("MPTcpExt", "Tcp")


class NstatParams(ProbeParams):
    """Parameters of the nstat probe."""
    interval_ms: float | None = None  # accepted for uniformity; two snapshots only
    hosts: list[str] = ["client", "server"]


def snapshot(tb: Any, host: str) -> dict[str, int]:
    """The host's MPTcpExt* and Tcp* counters now (nstat -asz --json)."""
    node = getattr(tb, host)
    proc = tb.popen(node, ["nstat", "-asz", "--json"], stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise TestbedError(f"nstat in {host} did not answer within 10 s") from None
    if proc.returncode != 0:
        raise TestbedError(f"nstat in {host} failed: {err.strip().splitlines()[-1:] or 'no output'}")
    data = json.loads(out)
    return {k: int(v) for k, v in data.get("kernel", data).items() if k.startswith(PREFIXES)}


@register
class NstatProbe(Probe):
    """MPTcpExt*/Tcp* counter deltas per host over the run."""
    name = "nstat"
    description = "MPTcpExt*/Tcp* counter deltas per host (nstat)"
    Params = NstatParams

    def __init__(self, **params: Any):
        super().__init__(**params)
        self._tb: Any = None
        self._raw: Path | None = None
        self._start: dict[str, dict[str, int]] = {}
        self._delta: dict[str, dict[str, int]] = {}

    def start(self, tb: Any, run_dir: Path, t0_ns: int) -> None:
        self._tb, self._raw = tb, Path(run_dir) / "raw"
        self._raw.mkdir(parents=True, exist_ok=True)
        for host in self.params.hosts:  # type: ignore[attr-defined]
            self._start[host] = snapshot(tb, host)
            (self._raw / f"nstat-{host}-start.json").write_text(json.dumps(self._start[host]))

    def stop(self) -> None:
        if self._tb is None or self._delta:
            return
        for host, before in self._start.items():
            after = snapshot(self._tb, host)
            assert self._raw is not None
            (self._raw / f"nstat-{host}-end.json").write_text(json.dumps(after))
            self._delta[host] = {k: v - before.get(k, 0) for k, v in after.items()}

    def summary(self) -> dict[str, Any]:
        """The non-zero counter deltas per host."""
        return {host: {k: v for k, v in d.items() if v} for host, d in self._delta.items()}

    def metrics(self) -> dict[str, Any]:
        return {f"{host}.{k}": v for host, d in self.summary().items() for k, v in d.items()}
