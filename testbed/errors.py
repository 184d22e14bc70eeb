"""One error type for everything a user can get wrong, printed as one line."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class TestbedError(Exception):
    """A problem the user can fix; its message is a complete one-line diagnosis."""

    __test__ = False  # not a pytest test class despite the name


def format_validation_error(where: str, exc) -> str:
    """Turn a pydantic ValidationError into one line naming the first bad field."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")
    msg = err.get("msg", "invalid value")
    if err.get("type") == "extra_forbidden":
        msg = "unknown key"
    more = len(exc.errors()) - 1
    tail = f" (+{more} more)" if more > 0 else ""
    return f"{where}: {loc or 'value'}: {msg}{tail}"


def one_line_errors(fn: F) -> F:
    """Decorator for CLI entry points: user errors become one stderr line + exit 2."""
    from pydantic import ValidationError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TestbedError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except ValidationError as exc:
            print(f"error: {format_validation_error('invalid input', exc)}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
