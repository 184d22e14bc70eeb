"""RobE_eSIM's security on the wire, as measured by `./tb bench.esim-forgery`:
forged MP_JOIN_CAP attempts from an observer of the losing path against the
user-space stack's server, per variant, next to what the tag's arithmetic
predicts. One table for the benchmark's printout, the docs and the report
(`forgery_table(load_forgery(path))`; `markdown(table)`).

Predictions (the tag: 64 bits, its low 10 = CRC of the winner's Key-B, the
other 54 = a truncated HMAC the attacker cannot compute without Key-B):
- random-tag: the hint passes for Binomial(N, 2^-10) of the attempts (central
  99.9 % interval), the HMAC for none;
- right-hint and replay (the hint copied from the observed tag): the hint passes
  for all N, the HMAC for none (a replayed tag is bound to another attempt's key);
- unknown-key: no connection of that Key-A, refused before any check;
- every attempt refused with RST + MP_TCPRST (reason 1); accepted: 0. The
  chance that any of N hint-passing forgeries is accepted is at most N x 2^-54.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.stats import binomial_interval
from testbed.stack.esim import CRC_BITS

VARIANTS = ("random-tag", "right-hint", "replay", "unknown-key")
FORGERY_FILE = "esim-forgery.json"   # the benchmark's output; the report reads it from a results directory
MAC_BITS = 64 - CRC_BITS
LEVEL = 0.999


def load_forgery(path: str | Path) -> dict[str, Any]:
    """The benchmark's document (esim-forgery.json)."""
    return json.loads(Path(path).read_text())


def invalid_reason(doc: dict[str, Any]) -> str | None:
    """Why a stored measurement is no measurement (its capture lost packets, it never got
    to attack, the victim was not checked), or None when it is one."""
    if doc.get("invalid"):
        return str(doc["invalid"])
    if not doc.get("variants") or "victim_after" not in doc:
        return "the measurement did not finish (no variants or no check of the victim afterwards)"
    return None


def predicted_hint(variant: str, n: int) -> tuple[int, int]:
    """The interval of hint passes the arithmetic predicts for n answered forgeries."""
    if variant == "random-tag":
        return binomial_interval(n, 2.0 ** -CRC_BITS, LEVEL)
    if variant in ("right-hint", "replay"):
        return n, n
    return 0, 0


def forgery_table(doc: dict[str, Any]) -> pd.DataFrame:
    """One row per variant: attempts, SYN/ACKs, hint passes (measured by the server,
    predicted), accepted, the victim's subflows gained, refusals seen by the attacker and
    on the wire (tshark), the bound on an acceptance, and whether every bound held."""
    rows = []
    for variant, v in doc["variants"].items():
        server, wire = v["server"], v.get("wire", {})
        n = v["synacks"]
        passed = server["hmac"] + server["accepted"]
        lo, hi = predicted_hint(variant, n)
        refused_wire = wire.get("rst_mptcprst", 0)
        holds = (n == v["attempts"] and server["accepted"] == 0 and v["victim_subflows_gained"] == 0
                 and v["acked_peer"] == 0 and lo <= passed <= hi
                 and v["rst_mptcprst_peer"] == n and refused_wire == n
                 and server["no-connection"] == (n if variant == "unknown-key" else 0))
        rows.append({"variant": variant, "attempts": v["attempts"], "synacks": n,
                     "passed_hint": passed, "hint_predicted": f"{lo}" if lo == hi else f"{lo}-{hi}",
                     "accepted": server["accepted"], "subflows_gained": v["victim_subflows_gained"],
                     "refused_rst_mptcprst": v["rst_mptcprst_peer"], "refused_on_wire": refused_wire,
                     "p_accept_bound": passed * 2.0 ** -MAC_BITS, "holds": holds})
    return pd.DataFrame(rows)


def render_table(table: pd.DataFrame) -> str:
    """The table as aligned text (the benchmark's printout)."""
    show = table.assign(p_accept_bound=table.p_accept_bound.map(lambda p: f"{p:.1e}"),
                        holds=table.holds.map(lambda h: "yes" if h else "NO"))
    return show.to_string(index=False)


def markdown(table: pd.DataFrame) -> str:
    """The table as Markdown (docs/robe.md, the report)."""
    head = ["variant", "forged attempts", "passed the 10-bit hint (predicted)", "accepted",
            "refused: RST + MP_TCPRST on the wire", "P(any accepted) <="]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.itertuples():
        lines.append(f"| {r.variant} | {r.synacks} | {r.passed_hint} ({r.hint_predicted}) | {r.accepted} | "
                     f"{r.refused_on_wire} | {r.p_accept_bound:.1e} |")
    return "\n".join(lines)
