"""Every public class and function of testbed/, experiments/ and analysis/ says
what it is in a docstring, and every package's docstring says its job and what
it may use. A method that overrides a documented one shares its contract
(inspect.getdoc inherits it) and needs no copy."""
from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("testbed", "experiments", "analysis")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _inherits_doc(path: Path, owner: str, name: str) -> bool:
    cls = importlib.import_module(_module_name(path))
    for part in owner.split("."):
        cls = getattr(cls, part)
    return bool(inspect.getdoc(getattr(cls, name, None)))


def undocumented(path: Path, root: Path = ROOT) -> list[str]:
    """`file:line name` of each public class/function of the file without a docstring."""
    tree = ast.parse(path.read_text())
    rel = path.relative_to(root)
    out = [] if ast.get_docstring(tree) else [f"{rel}:1 (module)"]

    def visit(node: ast.AST, owner: str) -> None:
        for child in getattr(node, "body", []):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if child.name.startswith("_"):
                continue
            if not ast.get_docstring(child) and not (owner and _inherits_doc(path, owner, child.name)):
                out.append(f"{rel}:{child.lineno} {owner + '.' if owner else ''}{child.name}")
            if isinstance(child, ast.ClassDef):
                visit(child, f"{owner + '.' if owner else ''}{child.name}")

    visit(tree, "")
    return out


def _sources() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def test_the_checker_finds_a_missing_docstring(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text('"""A module."""\n\n\ndef public():\n    return 1\n\n\ndef _private():\n    return 2\n')
    assert undocumented(bad, tmp_path) == ["probe.py:4 public"]
    bad.write_text("def public():\n    \"\"\"Documented.\"\"\"\n")
    assert undocumented(bad, tmp_path) == ["probe.py:1 (module)"]


def test_every_public_class_and_function_has_a_docstring():
    missing = [m for p in _sources() for m in undocumented(p)]
    assert not missing, f"{len(missing)} without a docstring:\n" + "\n".join(missing)


def test_every_package_says_its_job_and_what_it_may_use():
    vague = []
    for init in (p for pkg in PACKAGES for p in (ROOT / pkg).rglob("__init__.py")):
        if "stack" in init.relative_to(ROOT).parts[:2]:
            continue  # the user-space stack documents its own layers
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        if not any(w in doc for w in ("may use", "May use", "Part of", "uses ", "Imports nothing",
                                       "may import")):
            vague.append(str(init.relative_to(ROOT)))
    assert not vague, "package docstrings that do not say what they may use: " + ", ".join(vague)
