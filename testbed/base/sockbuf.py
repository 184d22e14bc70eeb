"""Socket buffer sizes that do not depend on the host's limits.

net.core.rmem_max and wmem_max are host-wide (read-only inside a network
namespace), and the testbed leaves the host as it found it. A plain SO_RCVBUF
or SO_SNDBUF request is capped at the host's limit (212992 bytes on a fresh
machine), so the same code would get other buffers on a machine whose limits
someone raised. As root the FORCE variants ignore that cap.
"""
from __future__ import annotations

import socket

# Not exported by Python's socket module; values from <asm-generic/socket.h>.
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33


def force_buffers(sock: socket.socket, rcvbuf: int | None = None, sndbuf: int | None = None) -> None:
    """Set the socket's receive/send buffer sizes regardless of the host's *mem_max."""
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    if sndbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, sndbuf)
