"""Traffic workloads, registered by name: see base.py."""
from testbed.workload.base import Workload, WorkloadParams, WorkloadResult, available, get, register

__all__ = ["Workload", "WorkloadParams", "WorkloadResult", "available", "get", "register"]
