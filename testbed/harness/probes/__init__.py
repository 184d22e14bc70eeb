"""Probes (one small module each), registered by name: see base.py."""
from testbed.harness.probes.base import Probe, ProbeParams, available, frame, get, register

__all__ = ["Probe", "ProbeParams", "available", "frame", "get", "register"]
