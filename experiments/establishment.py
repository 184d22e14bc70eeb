"""Establishment: how fast (and whether) a connection comes up when the
initial (default-route) path is healthy, lossy, blackholed, slow, or behind a
middlebox that drops MPTCP SYNs — for plain TCP, kernel MPTCP and the RobE
strategies (testbed.robe), against an unmodified kernel MPTCP server or the
user-space stack's (server_stack), with the strategy running over kernel sockets
or the user-space stack (client_stack) — the same strategy code either way.

Metrics (per trial, from experiments.robe_trial): setup_s (connect() to
established), ttfb_s (first response byte of a request/response exchange),
multipath_s (second subflow established), multipath_client_s (the same moment
stamped alike for both clients: when the client could use its join),
outcome (mptcp / fallback / failed), syns_sent, rsts_sent, extra_handshakes,
winner_path, esim_subflows / esim_fallback. Runs where a side speaks RobE_eSIM
name the draft's open choices in the manifest's `protocol`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from testbed.core.events import EventSpec
from testbed.harness.experiment import Experiment, ExperimentParams, RunContext, RunOutput, register
from testbed.harness.workload.app_workload import StackName

if TYPE_CHECKING:
    from testbed.core.net import Testbed

Condition = Literal["healthy", "lossy10", "lossy30", "lossy50", "blackhole",
                    "slow_default", "mptcp_drop"]
StrategyName = Literal["tcp", "mptcp", "timer", "sim", "esim", "ips", "sim+ips", "timer+ips"]  # the names of testbed.robe's strategies


class Params(ExperimentParams):
    """Parameters of the establishment experiment: default-path condition, strategy, stacks, timeouts."""
    condition: Condition = "healthy"
    strategy: StrategyName = "mptcp"
    client_stack: StackName = Field("kernel", description="the strategy's attempts on kernel sockets or "
                                                          "the user-space stack")
    server_stack: StackName = Field("kernel", description="the listener: kernel MPTCP or the user-space stack")
    timeout_s: float = Field(10, gt=0, le=300, description="give up after this long")
    slow_delay_ms: float = Field(100, ge=0, description="slow_default: one-way delay of the default path")
    warmup_trials: int = Field(3, ge=0, le=50, description="ips: trials that build path history first")

    @model_validator(mode="after")
    def _esim_needs_the_user_stack(self) -> "Params":
        if self.strategy == "esim" and self.client_stack != "user":
            raise ValueError("strategy 'esim' needs client_stack 'user' (kernel MPTCP cannot send "
                             "ROBE_eSIM_EN or MP_JOIN_CAP)")
        return self


def condition_event(condition: str, default_path: str, slow_delay_ms: float) -> EventSpec | None:
    """The change that degrades the default path (the one the kernel's first SYN
    takes) into `condition`; None for a healthy path."""
    if condition.startswith("lossy"):
        return EventSpec(at_s=0, action="set_link", path=default_path,
                         changes={"loss_pct": float(condition.removeprefix("lossy"))})
    if condition == "slow_default":
        return EventSpec(at_s=0, action="set_link", path=default_path,
                         changes={"delay_ms": slow_delay_ms})
    if condition in ("blackhole", "mptcp_drop"):
        return EventSpec(at_s=0, action=condition, path=default_path)
    return None


def apply_condition(tb: Testbed, condition: str, slow_delay_ms: float) -> None:
    """Degrade the default path now, through the testbed's one route for changes."""
    event = condition_event(condition, tb.topology.default.name, slow_delay_ms)
    if event is not None:
        tb.apply_event(event)


# Lanes for runs with the user-space stack on a side (measured: docs/robe.md, "Kernel sockets
# vs the user-space stack, measured"); kernel-socket runs keep max_parallel.
USER_STACK_LANES = 3


@register
class Establishment(Experiment):
    """Connection setup over a degraded default path, per strategy."""
    name = "establishment"
    description = "connection setup over a healthy/lossy/blackholed/slow/filtered default path"
    Params = Params
    max_parallel = 6  # latency-bound; 8 made the emulator late (docs/performance.md)
    # Not beside the bulk runs: with it (one or two lanes) a bulk run went invalid
    # in two of three quick papers (docs/performance.md).
    overlap_lanes = 0

    @classmethod
    def max_parallel_for(cls, params: dict[str, Any]) -> int:
        """Fewer lanes when a side runs the user-space stack: its Python engine competes for
        the two cores, and six at a time moved user-stack setup medians 1 ms (docs/robe.md)."""
        if "user" in (params.get("client_stack"), params.get("server_stack")):
            return USER_STACK_LANES
        return cls.max_parallel

    @classmethod
    def overlap_lanes_for(cls, params: dict[str, Any]) -> int:
        """Not beside bulk runs when a side runs the user-space stack: its Python
        engine beside them made the link emulator late (docs/performance.md)."""
        if "user" in (params.get("client_stack"), params.get("server_stack")):
            return 0
        return cls.overlap_lanes

    def run(self, ctx: RunContext) -> RunOutput:
        from experiments.robe_trial import release_user_stacks, run_establishment_trial

        p: Params = ctx.params
        tb = ctx.tb
        trial = {"timeout_s": p.timeout_s, "history_dir": str(ctx.raw_dir),
                 "client_stack": p.client_stack, "server_stack": p.server_stack}
        # A slow path is slow in IPS's history too; a broken or lossy one broke
        # after the history was built (WiFi associated, Internet gone).
        if p.condition == "slow_default":
            apply_condition(tb, p.condition, p.slow_delay_ms)
        if "ips" in p.strategy and p.warmup_trials:
            for _ in range(p.warmup_trials):
                run_establishment_trial(tb, p.strategy, trial)
        if p.condition != "slow_default":
            apply_condition(tb, p.condition, p.slow_delay_ms)
        ctx.record("fault", "network", f"condition:{p.condition}", path=tb.topology.default.name)
        if p.strategy == "esim" or p.server_stack == "user":
            from testbed.stack.esim import DEFAULT_CRYPTO
            # the draft's open choices (hash, HMAC key, CRC) this run's stacks use
            ctx.record("stack", "client" if p.strategy == "esim" else "server", "esim_crypto",
                       **DEFAULT_CRYPTO.describe())
        try:
            metrics = run_establishment_trial(tb, p.strategy, trial)
        finally:
            release_user_stacks(tb)  # so that the testbed can carry the next run
        return RunOutput(metrics=dict(metrics), protocol=esim_protocol(p))


def esim_protocol(p: Params) -> dict:
    """The manifest's `protocol` of a run where a side speaks RobE_eSIM (an eSIM client, or
    the user-space stack's server, which accepts it): the draft's open choices and the
    experimental option codes; empty for kernel-only runs."""
    if p.strategy != "esim" and p.server_stack != "user":
        return {}
    from testbed.stack.esim import DEFAULT_CRYPTO
    return {"robe_esim": {**DEFAULT_CRYPTO.describe(), "client": p.strategy == "esim",
                          "server": p.server_stack == "user"}}
