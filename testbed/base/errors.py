"""One error type for everything a user can get wrong, printed as one line."""
from __future__ import annotations


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
