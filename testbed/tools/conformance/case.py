"""Conformance cases: what one is, how they are registered, run and judged.

A case is one small function that drives the scripted peer against the kernel
in a fresh Lab and returns an Observation: a short outcome token plus what the
kernel did in words (with the measured values). The `case` decorator adds what
RFC 8684 says, which outcomes conform to it, and the outcome recorded on the
kernel this table was made on. The verdict follows from the outcome alone:

    conforms      the outcome is one the RFC allows
    deviates      the kernel did something else (a finding, not an error)
    inconclusive  the case could not tell (the peer could not get as far as it needed)
    error         the case itself failed (an exception): the only verdict that fails the run

Cases live in the modules of testbed/tools/conformance/cases/ and register
themselves on import.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from testbed.base.registry import Registry
from testbed.stack.scripted import ScriptError
from testbed.tools.conformance.lab import Lab

CONFORMS, DEVIATES, INCONCLUSIVE, ERROR = "conforms", "deviates", "inconclusive", "error"
# The kernel every case's `recorded` outcome was observed on.
RECORDED_ON = "6.18"


@dataclass(frozen=True)
class Observation:
    """What the kernel did: an outcome token (compared with the case's) and the details."""
    outcome: str
    detail: str


@dataclass(frozen=True)
class Case:
    """One scripted exchange with the kernel and how to judge it against RFC 8684."""
    name: str
    section: str                   # "3.2", or "3.1, 3.7"
    rfc_says: str
    conforming: frozenset[str]     # outcomes the RFC allows
    recorded: str                  # the outcome on RECORDED_ON
    script: Callable[[Lab], Observation]
    sysctls: dict[str, int | str] = field(default_factory=dict)   # of the kernel's namespace
    rfc: str = "RFC 8684"
    # MPTcpExt counters and their change on RECORDED_ON (0: must not move), where the
    # kernel answers through state as well as (or instead of) packets.
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def where(self) -> str:
        """RFC and section, e.g. 'RFC 8684 §3.2'."""
        return f"{self.rfc} §{self.section}"

    @property
    def description(self) -> str:
        """The script's one-line docstring: what the peer sends."""
        return (self.script.__doc__ or "").strip().splitlines()[0]

    def verdict(self, outcome: str) -> str:
        """conforms / deviates / inconclusive for an outcome."""
        if outcome == INCONCLUSIVE:
            return INCONCLUSIVE
        return CONFORMS if outcome in self.conforming else DEVIATES


CASES: Registry[Case] = Registry("conformance case", "testbed.tools.conformance.cases")


def case(name: str, section: str, rfc_says: str, conforming: Iterable[str], recorded: str,
         sysctls: dict[str, int | str] | None = None, rfc: str = "RFC 8684",
         counters: dict[str, int] | None = None) -> Callable[[Callable[[Lab], Observation]], Case]:
    """Decorator: register the function below as a conformance case named `name`."""
    def register(script: Callable[[Lab], Observation]) -> Case:
        return CASES.register(Case(name, section, " ".join(rfc_says.split()), frozenset(conforming),
                                   recorded, script, dict(sysctls or {}), rfc,
                                   dict(counters or {})))  # type: ignore[arg-type]
    return register


def get_case(name: str) -> Case:
    """The case registered under name; TestbedError listing the known names."""
    return CASES.cls(name)  # type: ignore[return-value]


def all_cases() -> list[Case]:
    """Every registered case, by name."""
    return [get_case(n) for n in CASES.available()]


@dataclass
class Result:
    """One case run: the observation, its verdict and how long it took."""
    case: Case
    outcome: str
    detail: str
    verdict: str
    seconds: float
    pcap: str | None = None      # every packet of the exchange, when asked for
    counters: dict[str, int] = field(default_factory=dict)   # MPTcpExt changes the case caused

    def differences(self) -> list[str]:
        """How this run differs from what the kernel did on RECORDED_ON (outcome, counters)."""
        out = [] if self.outcome == self.case.recorded else [f"outcome {self.outcome!r}, "
                                                             f"recorded {self.case.recorded!r}"]
        out += [f"{name} {self.counters.get(name, 0):+d}, recorded {want:+d}"
                for name, want in self.case.counters.items() if self.counters.get(name, 0) != want]
        return out

    @property
    def as_recorded(self) -> bool:
        """The kernel did what it did on RECORDED_ON (same outcome, same recorded counters)."""
        return not self.differences()

    def as_dict(self) -> dict:
        """The result as JSON-ready data."""
        return {"case": self.case.name, "rfc": self.case.rfc, "section": self.case.section,
                "rfc_says": self.case.rfc_says,
                "outcome": self.outcome, "kernel_did": self.detail, "verdict": self.verdict,
                "recorded_outcome": self.case.recorded, "as_recorded": self.as_recorded,
                "differences": self.differences(), "counters": self.counters,
                "seconds": round(self.seconds, 3), "pcap": self.pcap}


def run_case(c: Case, pcap_dir: Path | None = None) -> Result:
    """Run one case in a lab of its own; an exception becomes verdict 'error'. With
    pcap_dir, every packet the scripted peer sent and received goes to
    pcap_dir/<case>.pcap."""
    t0 = time.monotonic()
    pcap = None
    counters: dict[str, int] = {}
    try:
        with Lab(c.sysctls) as lab:
            try:
                obs = c.script(lab)
            except ScriptError as exc:
                obs = Observation(INCONCLUSIVE, str(exc))
            finally:
                if pcap_dir is not None:
                    pcap = str(Path(pcap_dir) / f"{c.name}.pcap")
                    lab.peer.write_pcap(pcap)
            counters = lab.counters()
        verdict = c.verdict(obs.outcome)
    except Exception as exc:  # noqa: BLE001 - reported as the case's verdict
        obs, verdict = Observation(ERROR, f"{type(exc).__name__}: {exc}"), ERROR
    return Result(c, obs.outcome, obs.detail, verdict, time.monotonic() - t0, pcap, counters)


def kernel_version() -> str:
    """The running kernel's release string."""
    return platform.release()


def render_table(results: list[Result]) -> str:
    """The results case by case: name, section, verdict, outcome, then what the RFC says
    and what the kernel did."""
    lines = [f"kernel {kernel_version()}: {len(results)} case(s), "
             f"{sum(r.seconds for r in results):.1f} s (outcomes recorded on {RECORDED_ON})", ""]
    width = max([len(r.case.name) for r in results] + [4])
    wsec = max([len(r.case.where) for r in results] + [7])
    lines.append(f"{'case':<{width}}  {'section':<{wsec}}  {'verdict':<12} outcome")
    for r in results:
        note = "" if r.as_recorded else f"   (differs from {RECORDED_ON}: {'; '.join(r.differences())})"
        lines.append(f"{r.case.name:<{width}}  {r.case.where:<{wsec}}  {r.verdict:<12} {r.outcome}{note}")
        lines.append(f"{'':<{width}}  RFC:    {r.case.rfc_says}")
        lines.append(f"{'':<{width}}  kernel: {r.detail}")
    counts = {v: sum(r.verdict == v for r in results) for v in (CONFORMS, DEVIATES, INCONCLUSIVE, ERROR)}
    lines += ["", ", ".join(f"{n} {v}" for v, n in counts.items())]
    return "\n".join(lines)


def render_markdown(results: list[Result]) -> str:
    """The results as a Markdown table (what docs/conformance.md shows)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [f"Kernel {kernel_version()}.", "",
             "| case | section | what the RFC says | what the kernel did | verdict |",
             "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| `{r.case.name}` | {r.case.where} | {cell(r.case.rfc_says)} | "
                     f"**{cell(r.outcome)}**: {cell(r.detail)} | {r.verdict} |")
    return "\n".join(lines)


def render_json(results: list[Result]) -> str:
    """The results as one JSON document with the kernel version."""
    return json.dumps({"kernel": kernel_version(), "recorded_on": RECORDED_ON,
                       "cases": [r.as_dict() for r in results]}, indent=2)
