"""Probes (one small module each), registered by name: see base.py. Part of the
harness: may use testbed.core, testbed.mptcp and testbed.base."""
from testbed.harness.probes.base import Probe, ProbeParams, available, frame, get, register

__all__ = ["Probe", "ProbeParams", "available", "frame", "get", "register"]
