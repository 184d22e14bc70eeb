"""RobE — Robust Session Establishment for MPTCP (draft-amend-tcpm-mptcp-robe-02):
TIMER, SIM, IPS and combinations, decided in user space. One implementation of
the strategies drives its attempts through a backend (backends.py): kernel
sockets over unmodified kernel MPTCP, or the user-space stack (testbed.stack).
A library of its own: may use testbed.base, testbed.mptcp and testbed.stack
only (its testbed adapter lives with the establishment experiment)."""
from testbed.robe.backends import Backend, KernelBackend, UserStackBackend
from testbed.robe.history import History
from testbed.robe.report import Report
from testbed.robe.sockets import LocalPath
from testbed.robe.strategies import STRATEGIES, Options, RobeError, Strategy, connect, register
from testbed.robe.timer import TimerPolicy

__all__ = ["connect", "Options", "Report", "RobeError", "LocalPath", "History", "TimerPolicy",
           "Strategy", "STRATEGIES", "register", "Backend", "KernelBackend", "UserStackBackend"]
