"""Reading the project's TOML files (topologies, scenarios, campaigns): one
place that turns a missing, unreadable or malformed file into a one-line
TestbedError naming the file."""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from testbed.base.errors import TestbedError


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """The file's table; `what` names the kind of file in the error ("scenario file")."""
    p = Path(path)
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise TestbedError(f"{what} {p} does not exist") from None
    except OSError as exc:
        raise TestbedError(f"cannot read {what} {p}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TestbedError(f"malformed TOML in {p}: {exc}") from None
