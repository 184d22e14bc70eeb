"""Campaigns: a TOML file listing scenario files, each with the overrides its
--quick variant applies; run through the runner, resuming.

    # experiments/paper.toml
    description = "..."
    [[scenario]]
    file = "throughput.toml"                 # relative to the campaign file
    quick = { repetitions = 1, "params.seconds" = 6 }

`quick` keys are the dotted keys of `./tb run --set` (a table value replaces the
whole table, e.g. `grid = {...}`). An entry with `quick_only = true` runs only
with --quick (more repetitions of a few cells another entry's full run holds). The campaign and every scenario it names,
quick overrides applied, are validated when the campaign is loaded, before
anything runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from testbed.base.errors import TestbedError, format_validation_error
from testbed.base.tomlfile import read_toml
from testbed.base.strict import Strict
from testbed.harness import scenario as sc
from testbed.harness.results import run_status
from testbed.harness.parallel import parallel_sweep
from testbed.harness.runner import SweepSummary, sweep

PAPER = Path(__file__).resolve().parents[2] / "experiments" / "paper.toml"


class CampaignEntry(Strict):
    """One scenario file of a campaign and what --quick changes in it."""

    file: str
    quick: dict[str, Any] = Field(default_factory=dict)
    # More repetitions of some cells for --quick only (rows judged on a random effect need
    # several runs): the full run leaves it out, another entry's full sweep holds the same runs.
    quick_only: bool = False


class Campaign(Strict):
    """A campaign file as loaded (`path` is where it came from)."""

    description: str = ""
    scenario: list[CampaignEntry] = Field(min_length=1)
    path: str = ""

    def entries(self, quick: bool) -> list[tuple[CampaignEntry, sc.Scenario]]:
        """(entry, scenario) of every entry this variant runs (quick-only entries with --quick
        alone), validated, with the quick overrides when asked."""
        base = Path(self.path).parent
        return [(entry, sc.load(base / entry.file, entry.quick if quick else None))
                for entry in self.scenario if quick or not entry.quick_only]

    def scenarios(self, quick: bool) -> list[sc.Scenario]:
        """The campaign's scenarios, validated, with the quick overrides when asked."""
        return [s for _, s in self.entries(quick)]


def load(path: str | Path = PAPER) -> Campaign:
    """Read and validate a campaign file, including both variants of every scenario."""
    p = Path(path)
    data = read_toml(p, "campaign file")
    try:
        campaign = Campaign(**data, path=str(p))
    except ValidationError as exc:
        raise TestbedError(format_validation_error(str(p), exc)) from None
    for quick in (False, True):  # a typo in a quick override must not wait for --quick
        campaign.scenarios(quick)
    return campaign


def run(campaign: Campaign, out: Path, quick: bool, progress: bool = True,
        retry_failed: bool = False, parallel: int = 1) -> list[tuple[str, SweepSummary]]:
    """Sweep every scenario of the campaign into `out`, in order; with parallel > 1,
    up to that many runs at once where the experiment allows (harness.parallel)."""
    if parallel > 1:
        return parallel_sweep(campaign.scenarios(quick), out, parallel,
                              retry_failed=retry_failed, progress=progress)
    return [(s.experiment, sweep(s, out, retry_failed=retry_failed, progress=progress))
            for s in campaign.scenarios(quick)]


def not_complete(campaign: Campaign, out: Path, quick: bool) -> dict[str, int]:
    """Stored campaign runs by status other than complete, counted over the whole
    store, not this invocation: a resumed run skips runs that failed before,
    and must not report success for them."""
    counts: dict[str, int] = {}
    for scenario in campaign.scenarios(quick):
        for spec in sc.expand(scenario):
            status = run_status(out, scenario.experiment, spec.run_id) or "missing"
            if status != "complete":
                counts[status] = counts.get(status, 0) + 1
    return counts
