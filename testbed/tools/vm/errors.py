"""The one error type of the VM tooling: a user-fixable problem, one line."""
from __future__ import annotations

from testbed.base.errors import TestbedError


class VmError(TestbedError):
    """Printed as a single line by the invoke tasks (no traceback)."""
