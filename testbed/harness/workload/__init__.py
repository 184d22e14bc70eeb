"""Traffic workloads, registered by name: see base.py. Part of the harness: may
use testbed.core (the bulk engine), testbed.mptcp and testbed.base.

Imported lazily: the app program (`python -m testbed.harness.workload.app`) runs in
the namespaces and must start fast; importing base.py would pull in pandas
(~5 s under the VM's software emulation, long enough to miss timed faults).
"""
from __future__ import annotations

from typing import Any

__all__ = ["Workload", "WorkloadParams", "WorkloadResult", "available", "get", "register"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from testbed.harness.workload import base

        return getattr(base, name)
    raise AttributeError(f"module 'testbed.harness.workload' has no attribute {name!r}")
