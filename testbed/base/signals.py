"""Stop signals as exceptions: SIGTERM and SIGHUP (a closed terminal) raise
SystemExit(128 + signum) in the main thread, so that `with` blocks and
`finally` clauses unwind and clean up as they do for Ctrl-C's
KeyboardInterrupt. One owner for the testbed's lifetime and for the parallel
sweep's wait on its lanes."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def raise_exit(signum: int, frame: object) -> None:
    """The handler: the exit status a shell gives a process this signal ended."""
    raise SystemExit(128 + signum)


def unwind_on_exit_signals() -> dict[int, Any]:
    """Make EXIT_SIGNALS raise (main thread only: handlers live there); the
    handlers replaced, for restore_handlers ({} when not in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, raise_exit) for sig in EXIT_SIGNALS}


def restore_handlers(old: dict[int, Any]) -> None:
    """Put back the handlers unwind_on_exit_signals replaced (None: the default)."""
    for sig, handler in old.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextmanager
def exit_signals_unwind() -> Iterator[None]:
    """EXIT_SIGNALS raise SystemExit inside the block; the old handlers after it."""
    old = unwind_on_exit_signals()
    try:
        yield
    finally:
        restore_handlers(old)
