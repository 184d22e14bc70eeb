"""Make-after-break on kernel MPTCP from an address the connection never had (root).

Pins why the kernel client used to reset its own join: it shut its write side down
while the path manager's MP_JOIN was still in SYN_SENT, and the kernel drops a
SYN_SENT subflow once the DATA_FIN is due (mptcp_subflow_shutdown), so the server's
SYN/ACK met no socket (MPJoinSynTx 1, no MPJoinSynAckRx, a bare RST). The experiment's
kernel client now waits for that subflow before it closes, and the connection resumes."""
from __future__ import annotations

import pytest

from tests.test_experiments import run
from tests.test_inactivity import scenario


@pytest.mark.root
def test_kernel_client_resumes_from_a_new_address(tmp_path):
    [r] = run(tmp_path, scenario({"outage_s": 1, "variant": "new_address", "resume_timeout_s": 6}))
    assert r["returned_path"] == "lte" and r["join_error"] is None
    assert r["resumed"] is True and r["sha256_match"] is True
    nstat = r["_manifest"]["probes"]["nstat"]["client"]
    # the join completed at the client: its SYN/ACK was received, not answered with a reset
    assert nstat.get("MPTcpExtMPJoinSynAckRx") == 1 and not nstat.get("TcpOutRsts")
