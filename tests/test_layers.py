"""The layers of the code base: no module imports a layer above its own.

The contract lives in pyproject.toml ([tool.importlinter]); import-linter reads
the import graph statically, so this needs no root and builds nothing.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).parent / "lint-imports"


def _lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=tree, capture_output=True, text=True,
                          env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, timeout=120)


def _copy_tree(dst: Path) -> None:
    for name in ("testbed", "experiments", "analysis"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")


def test_no_layer_imports_a_layer_above_it(tmp_path):
    _copy_tree(tmp_path)  # this checkout, not whatever the venv has installed
    res = _lint(tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "1 kept, 0 broken" in res.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    _copy_tree(tmp_path)
    # The base layer reaching into the harness, and RobE (a library over the
    # kernel MPTCP API) reaching into the core: both must be refused.
    (tmp_path / "testbed/base/upward.py").write_text("from testbed.harness import runner\n")
    (tmp_path / "testbed/robe/upward.py").write_text("import testbed.core.net\n")
    res = _lint(tmp_path)
    assert res.returncode != 0
    assert "BROKEN" in res.stdout
    assert "testbed.base.upward -> testbed.harness.runner" in res.stdout
    assert "testbed.robe.upward -> testbed.core.net" in res.stdout
