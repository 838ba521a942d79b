"""fct_ml is the plain library: it must not import the orchestration/storage/validation stack
(dagster, lancedb, pandera, great_expectations), neither directly nor through a dependency."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import fct_ml

FORBIDDEN = ("dagster", "lancedb", "pandera", "great_expectations")
PACKAGE_DIR = Path(fct_ml.__file__).parent


def fct_ml_modules() -> list[str]:
    return ["fct_ml"] + sorted(f"fct_ml.{m.name}" for m in pkgutil.iter_modules([str(PACKAGE_DIR)]))


def test_the_package_has_the_expected_modules() -> None:
    modules = fct_ml_modules()
    for name in (
        "fct_ml.models",
        "fct_ml.training",
        "fct_ml.config",
        "fct_ml.reproduce",
        "fct_ml.cli",
    ):
        assert name in modules


def test_importing_fct_ml_loads_none_of_the_forbidden_packages() -> None:
    code = f"""
import importlib, json, sys
for name in {fct_ml_modules()!r}:
    importlib.import_module(name)
forbidden = {FORBIDDEN!r}
loaded = sorted(m for m in sys.modules if m.split(".")[0] in forbidden)
print(json.dumps(loaded))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == [], f"fct_ml imports pulled in {loaded}"


def _imported_roots(tree: ast.AST) -> list[tuple[int, str]]:
    roots = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.append((node.lineno, node.module.split(".")[0]))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Name, ast.Attribute))
            and getattr(node.func, "id", getattr(node.func, "attr", None))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            roots.append((node.lineno, node.args[0].value.split(".")[0]))
    return roots


def test_no_fct_ml_source_imports_the_forbidden_packages() -> None:
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    assert files
    offending = []
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for lineno, root in _imported_roots(tree):  # includes imports inside functions
            if root in FORBIDDEN:
                offending.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{lineno}: {root}")
    assert offending == []


def test_the_static_check_would_catch_an_import() -> None:
    tree = ast.parse(
        "import os\ndef f():\n    from dagster import asset\n    import lancedb.table\n"
    )
    assert [r for _, r in _imported_roots(tree) if r in FORBIDDEN] == ["dagster", "lancedb"]
