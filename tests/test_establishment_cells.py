"""The draft's establishment cells hold RobE over kernel sockets against a kernel
server only: runs with the user-space stack on a side stay out (no root)."""
import pandas as pd

from analysis import establishment_checks as ec


def test_user_stack_runs_stay_out_of_the_drafts_cells(monkeypatch):
    df = pd.DataFrame({"param.condition": ["healthy"] * 4, "param.strategy": ["sim"] * 4,
                       "param.client_stack": ["kernel", "user", None, "kernel"],
                       "param.server_stack": [None, "kernel", "kernel", "user"]})
    monkeypatch.setattr(ec, "establishment_data", lambda res: df)
    cell = ec.Establishment(None).cell("healthy", "sim")
    assert list(cell.index) == [0, 2]   # kernel/kernel, and a run from before the parameters
