"""--set on a key the scenario's grid sweeps: the user's value wins, and is validated."""
from pathlib import Path

import pytest

from testbed.base.errors import TestbedError
from testbed.harness import scenario as sc

ROOT = Path(__file__).resolve().parents[1]
ESTABLISHMENT = ROOT / "experiments" / "establishment.toml"


def test_a_set_on_a_swept_key_pins_it_for_every_run():
    """--set params.strategy=sim on a scenario sweeping strategies runs sim only."""
    swept = sc.load(ESTABLISHMENT)
    pinned = sc.load(ESTABLISHMENT, {"params.strategy": "sim"})
    assert "params.strategy" not in pinned.grid
    runs = sc.expand(pinned)
    assert runs and {r.scenario.params["strategy"] for r in runs} == {"sim"}
    assert len(runs) * len(swept.grid["params.strategy"]) == len(sc.expand(swept))


def test_a_bad_set_on_a_swept_key_is_refused_at_load_naming_the_key():
    """A --set the grid would have hidden is still checked, in one line."""
    with pytest.raises(TestbedError) as exc:
        sc.load(ESTABLISHMENT, {"params.condition": "nonsense"})
    assert "condition" in str(exc.value) and "\n" not in str(exc.value)
