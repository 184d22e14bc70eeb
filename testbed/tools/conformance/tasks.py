"""The `./tb conformance` task (the root tasks.py adds it).

    ./tb conformance                       every case, a table with the kernel version
    ./tb conformance --case join-wrong-hmac --case add-addr-echo --json
    ./tb conformance --list                the cases and what each sends
"""
from __future__ import annotations

from invoke import Exit, task

from testbed.tools.cli import guard, need_root


@task(iterable=["case"],
      help={"case": "run only this case (repeatable; --list shows the names)",
            "json": "print the results as JSON instead of the table",
            "list": "list the cases and what each sends, run nothing"})
def conformance(c, case=None, json_=False, list_=False):
    """Scripted packets against kernel MPTCP: what RFC 8684 says, what the kernel did, verdict."""
    from testbed.tools.conformance.case import (ERROR, all_cases, get_case, render_json, render_table,
                                                run_case)

    if list_:
        for cs in all_cases():
            print(f"{cs.name:<30} {cs.where:<22} {cs.description}")
        return
    need_root()

    def go() -> int:
        # Every name is checked before anything is built.
        cases = [get_case(n) for n in case] if case else all_cases()
        results = [run_case(cs) for cs in cases]
        print(render_json(results) if json_ else render_table(results))
        return sum(r.verdict == ERROR for r in results)

    errors = guard(go)
    if errors:
        raise Exit(f"conformance: {errors} case(s) failed to run (verdict error)", code=1)
