"""RobE — Robust Session Establishment for MPTCP (draft-amend-tcpm-mptcp-robe-02),
in user space over unmodified kernel MPTCP: TIMER, SIM, IPS and combinations.
A library of its own: may use testbed.mptcp and testbed.base only (its testbed
adapter lives with the establishment experiment)."""
from testbed.robe.history import History
from testbed.robe.report import Report
from testbed.robe.sockets import LocalPath
from testbed.robe.strategies import STRATEGIES, Options, RobeError, Strategy, connect, register
from testbed.robe.timer import TimerPolicy

__all__ = ["connect", "Options", "Report", "RobeError", "LocalPath", "History", "TimerPolicy",
           "Strategy", "STRATEGIES", "register"]
