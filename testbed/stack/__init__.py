"""A user-space MPTCP v1 (RFC 8684) endpoint that interoperates with Linux kernel MPTCP.

Layers, bottom up: crypto (keys, HMAC, checksums), options (the kind-30 codec),
packet (IPv4/TCP codec), attach (getting packets in and out of a namespace
without the kernel's TCP answering), tcp (one subflow), mptcp (the connection
and the stack's API). Imports the standard library and testbed.base (entering a namespace) only.
"""

from testbed.stack import rate_limit  # noqa: F401  registers its private-use option with the codec
from testbed.stack.attach import AttachError
from testbed.stack.connection import Connection, ConnectionInfo, Event, StackError, SubflowInfo
from testbed.stack.stack import Listener, Stack

__all__ = ["Stack", "Listener", "Connection", "ConnectionInfo", "SubflowInfo", "Event", "StackError",
           "AttachError"]
