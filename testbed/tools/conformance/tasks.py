"""The `./tb conformance` task (the root tasks.py adds it).

    ./tb conformance                       every case, a table with the kernel version
    ./tb conformance --case join-wrong-hmac --case add-addr-echo --json
    ./tb conformance --pcap DIR --markdown every packet to DIR/<case>.pcap; a Markdown table
    ./tb conformance --list                the cases and what each sends
"""
from __future__ import annotations

from pathlib import Path

from invoke import Exit, task

from testbed.tools.cli import guard, need_root


@task(iterable=["case"],
      help={"case": "run only this case (repeatable; --list shows the names)",
            "json": "print the results as JSON instead of the table",
            "markdown": "print the results as a Markdown table (as in docs/conformance.md)",
            "pcap": "write every packet of each case to DIR/<case>.pcap",
            "list": "list the cases and what each sends, run nothing"})
def conformance(c, case=None, json_=False, markdown=False, pcap=None, list_=False):
    """Scripted packets against kernel MPTCP: what RFC 8684 says, what the kernel did, verdict."""
    from testbed.base.errors import TestbedError
    from testbed.tools.conformance.case import (ERROR, all_cases, get_case, render_json, render_markdown,
                                                render_table, run_case)

    if list_:
        for cs in all_cases():
            print(f"{cs.name:<30} {cs.where:<22} {cs.description}")
        return
    need_root()

    def go() -> int:
        # Every name is checked before anything is built.
        cases = [get_case(n) for n in case] if case else all_cases()
        if json_ and markdown:
            raise TestbedError("--json and --markdown: choose one")
        pcap_dir = Path(pcap) if pcap else None
        if pcap_dir is not None:
            if pcap_dir.exists() and not pcap_dir.is_dir():
                raise TestbedError(f"--pcap {pcap}: exists and is not a directory")
            pcap_dir.mkdir(parents=True, exist_ok=True)
        results = [run_case(cs, pcap_dir) for cs in cases]
        render = render_json if json_ else render_markdown if markdown else render_table
        print(render(results))
        return sum(r.verdict == ERROR for r in results)

    errors = guard(go)
    if errors:
        raise Exit(f"conformance: {errors} case(s) failed to run (verdict error)", code=1)
