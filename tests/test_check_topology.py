"""Params a topology cannot serve are refused at load (Experiment.check_topology,
called by the scenario's validation for every grid point): `./tb run` exits 2 with
one line naming the key and the bound, and stores nothing."""
from __future__ import annotations

from tests.conftest import assert_one_line_error, run_tb

ONE_PATH_INACTIVITY = '''
experiment = "inactivity"
calibrate = false
[topology.spec]
paths = [{ name = "wifi", rate_mbit = 10, delay_ms = 10 }]
[params]
variant = "new_address"
'''


def test_inactivity_new_address_on_one_path_is_refused_at_load(tmp_path):
    scenario = tmp_path / "one-path.toml"
    scenario.write_text(ONE_PATH_INACTIVITY)
    proc = run_tb("run", str(scenario), "--out", str(tmp_path / "store"), timeout=60)
    assert_one_line_error(proc, "params.variant 'new_address'", "2 paths", "wifi")
    assert proc.returncode == 2
    assert not (tmp_path / "store").exists()
