"""No two project modules import each other in a circle, counting imports inside functions.

A deferred import (inside a function) hides a circle from Python at import time but not from a
reader: the modules still depend on each other. So every import statement counts, wherever it is.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("fct_ml", "fct_assets")


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of `packages` under `root`."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its source (top level or inside a
    function). `from pkg import mod` counts as importing `pkg.mod`; `from pkg.mod import name`
    as importing `pkg.mod` (and `pkg.mod.name` when that is a module)."""
    modules = module_files(root, packages)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
        # A package (its __init__) is not an edge: `from pkg import mod` names pkg.mod, and
        # every package __init__ here holds a docstring only (test below).
        graph[name] = {
            t for t in targets if t in modules and t != name and modules[t].name != "__init__.py"
        }
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_project_has_no_import_circle():
    graph = import_graph(REPO)
    assert len(graph) > 40  # both packages were walked, subpackages included
    assert cycles(graph) == []


def test_package_inits_hold_no_code():
    # What makes ignoring the edges to a package sound: importing one runs no project import.
    for path in module_files(REPO).values():
        if path.name == "__init__.py":
            body = ast.parse(path.read_text()).body
            code = [n for n in body if not isinstance(n, ast.Expr | ast.Assign)]
            assert code == [], f"{path}: a package __init__ imports or defines something"


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_circle_added_on_purpose_is_found(tmp_path):
    # serving imports upgrade only inside a function; upgrade imports serving at the top: a circle.
    _write(
        tmp_path,
        {
            "fct_assets/__init__.py": "",
            "fct_assets/lib/__init__.py": "",
            "fct_assets/lib/keys.py": "X = 1\n",
            "fct_assets/serving/__init__.py": "",
            "fct_assets/serving/deployment.py": (
                "from fct_assets.lib import keys\n\n"
                "def f():\n    from fct_assets.upgrade.assets import g\n    return g\n"
            ),
            "fct_assets/upgrade/__init__.py": "",
            "fct_assets/upgrade/assets.py": (
                "from fct_assets.serving import deployment\n\ndef g():\n    return deployment\n"
            ),
            "fct_ml/__init__.py": "",
            "fct_ml/a.py": "import fct_ml.b\n",
            "fct_ml/b.py": "from fct_ml import c\n",
            "fct_ml/c.py": "X = 2\n",
        },
    )
    graph = import_graph(tmp_path)
    assert graph["fct_assets.serving.deployment"] == {
        "fct_assets.lib.keys",
        "fct_assets.upgrade.assets",
    }
    assert cycles(graph) == [["fct_assets.serving.deployment", "fct_assets.upgrade.assets"]]
    # The same files without the deferred import: no circle, and a chain a -> b -> c is none.
    _write(tmp_path, {"fct_assets/serving/deployment.py": "from fct_assets.lib import keys\n"})
    assert cycles(import_graph(tmp_path)) == []
    _write(tmp_path, {"fct_ml/c.py": "def h():\n    import fct_ml.a\n"})
    assert cycles(import_graph(tmp_path)) == [["fct_ml.a", "fct_ml.b", "fct_ml.c"]]


def deferred_imports_without_a_reason(root: Path, packages=PACKAGES) -> list[str]:
    """`path:line` of every import inside a function that says nothing of why it is there: no
    comment on its line, none on the line above its block of imports, and no module docstring
    that states the module's policy on deferred imports."""
    missing = []
    for path in module_files(root, packages).values():
        source = path.read_text()
        tree = ast.parse(source)
        if "deferred import" in (ast.get_docstring(tree) or "").lower():
            continue
        lines = source.splitlines()
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, ast.Import | ast.ImportFrom):
                    continue
                row = node.lineno - 1
                if "#" in lines[row]:
                    continue
                # Up over the block of imports (and blank lines) this one belongs to.
                above = row - 1
                while above >= 0 and (
                    not lines[above].strip()
                    or lines[above].lstrip().startswith(("import ", "from "))
                    or lines[above].strip().startswith(")")
                    or lines[above].startswith(" " * 8)
                    and lines[above].strip().endswith(",")
                ):
                    above -= 1
                if above < 0 or not lines[above].strip().startswith("#"):
                    missing.append(f"{path.relative_to(root)}:{node.lineno}")
    return missing


def test_every_deferred_import_says_why():
    # An import inside a function stays only where it is a measured start-up cost, and says so.
    assert deferred_imports_without_a_reason(REPO) == []


def test_a_deferred_import_without_a_reason_is_found(tmp_path):
    _write(
        tmp_path,
        {
            "fct_ml/__init__.py": "",
            "fct_ml/a.py": (
                "def f():\n    # Deferred: torch, 1.6 s.\n    import torch\n    import numpy\n\n"
                "def g():\n    x = 1\n    import torch\n"
            ),
            "fct_ml/b.py": '"""Deferred imports: every command imports what it uses."""\n'
            "def h():\n    import torch\n",
        },
    )
    assert deferred_imports_without_a_reason(tmp_path) == ["fct_ml/a.py:8"]
