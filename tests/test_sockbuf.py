"""Socket buffers are as large as asked for, whatever the host's rmem_max/wmem_max."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from testbed.base.sockbuf import force_buffers

pytestmark = pytest.mark.root


def test_buffers_exceed_the_hosts_limit():
    if os.geteuid() != 0:
        pytest.skip("the FORCE options need CAP_NET_ADMIN")
    rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
    wmem_max = int(Path("/proc/sys/net/core/wmem_max").read_text())
    want_rcv, want_snd = 2 * rmem_max, 2 * wmem_max  # what a plain request could never get
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        force_buffers(s, rcvbuf=want_rcv, sndbuf=want_snd)
        # The kernel doubles the request for its bookkeeping; a capped request
        # would read back as 2 * rmem_max at most.
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * want_rcv
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * want_snd
