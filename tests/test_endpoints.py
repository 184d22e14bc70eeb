"""In-kernel path-manager endpoints: one API (testbed.mptcp.pm) for the testbed's
build, the backup flag and RobE's temporary endpoints."""
from __future__ import annotations

import pytest

from testbed.base.netns import ScratchNetns, run_command
from testbed.mptcp import pm

pytestmark = pytest.mark.root


def test_flag_names_and_bits_round_trip():
    assert pm.flag_bits(["subflow", "backup"]) == 0x6
    assert pm.flag_names(0x6) == ("subflow", "backup")
    assert pm.flag_names(pm.flag_bits(pm.ADDR_FLAGS)) == tuple(pm.ADDR_FLAGS)


def test_endpoints_added_listed_reflagged_and_deleted_in_a_namespace_by_file():
    with ScratchNetns() as ns:
        for argv in (["ip", "link", "add", "ep0", "type", "veth", "peer", "name", "ep1"],
                     ["ip", "addr", "add", "10.9.0.1/24", "dev", "ep0"],
                     ["ip", "addr", "add", "10.9.1.1/24", "dev", "ep1"]):
            assert run_command(ns.path, argv).returncode == 0
        pm.add_endpoints(ns.path, [pm.Endpoint("10.9.0.1", "ep0", ("subflow",), 3),
                                   pm.Endpoint("10.9.1.1", None, ("signal", "backup"), 4)])
        got = {e.id: e for e in pm.endpoints(ns.path)}
        assert (got[3].addr, got[3].flags) == ("10.9.0.1", ("subflow",))
        assert (got[4].addr, got[4].flags) == ("10.9.1.1", ("signal", "backup"))
        pm.set_endpoint_flags(ns.path, "10.9.0.1", 3, pm.flag_bits(["subflow", "backup"]))
        assert {e.id: e.flags for e in pm.endpoints(ns.path)}[3] == ("subflow", "backup")
        pm.delete_endpoint(ns.path, 4)
        assert [e.id for e in pm.endpoints(ns.path)] == [3]
        assert [e.id for e in ns.run(lambda: pm.endpoints(None))] == [3]  # None: the calling thread's
