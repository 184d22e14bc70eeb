"""Conformance mode: a scripted peer built on the user-space stack's codec sends
chosen packets to a kernel MPTCP peer in private namespaces and judges what
comes back (on the wire, in MIB counters, in path-manager events) against RFC
8684. `./tb conformance` runs the cases; docs/conformance.md lists them.

Tool layer: uses testbed.stack (codec, scripted peer), testbed.mptcp (events,
MPTCP_INFO) and testbed.base.
"""
from testbed.tools.conformance.case import (CASES, CONFORMS, DEVIATES, ERROR, INCONCLUSIVE, Case, Observation,
                                            Result, all_cases, case, get_case, render_json, render_table,
                                            run_case)

__all__ = ["CASES", "CONFORMS", "DEVIATES", "ERROR", "INCONCLUSIVE", "Case", "Observation", "Result", "all_cases",
           "case", "get_case", "render_json", "render_table", "run_case"]
