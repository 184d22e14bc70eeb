"""What every command-line entry point shares: user errors become one line on
stderr and a non-zero exit (never a traceback), Ctrl-C a clean message."""
from __future__ import annotations

import os
from typing import Callable, TypeVar

from invoke import Exit
from pydantic import ValidationError

from testbed.base.errors import TestbedError, format_validation_error

T = TypeVar("T")
USER_ERROR = 2


def fail(msg: str) -> Exit:
    """The invoke Exit for a user error: one line, the project's user-error exit code."""
    return Exit(f"error: {msg}", code=USER_ERROR)


def guard(fn: Callable[[], T]) -> T:
    """Run fn, turning user errors into a one-line message and exit status 2."""
    try:
        return fn()
    except TestbedError as exc:
        raise fail(str(exc)) from None
    except ValidationError as exc:
        raise fail(format_validation_error("invalid input", exc)) from None
    except KeyboardInterrupt:
        raise Exit("interrupted; everything created was removed", code=130) from None


def need_root() -> None:
    """Exit with a user error unless running as root."""
    if os.geteuid() != 0:
        raise fail("this task needs root (network namespaces, tc, nftables)")
