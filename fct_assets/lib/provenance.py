"""Provenance helpers: code versions, per-epoch progress logs and training-history metadata.

Two code versions, for two questions. `source_version(fn)` is an asset's Dagster code version: a
digest of the asset function's source and of the project code it reaches, so an asset is marked
changed only when code that can change its value changed (a README edit or another asset's
change marks nothing). `code_version()` is the checkout's git commit, recorded as metadata on
every materialisation for lineage.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import os
import subprocess
import textwrap
import time
import types
from collections.abc import Callable
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import dagster as dg

PROJECT_PACKAGES = ("fct_ml", "fct_assets")


def _in(module_name: str, packages: tuple[str, ...]) -> bool:
    return any(module_name == p or module_name.startswith(p + ".") for p in packages)


def _module_file(name: str) -> Path | None:
    """The source file of project module `name`, found on disk without importing it (importing
    fct_ml would pull torch into every process that only loads the definitions)."""
    top, *rest = name.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(next(iter(spec.submodule_search_locations)), *rest)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(tree: ast.AST, packages: tuple[str, ...]) -> set[str]:
    """Project modules named by the import statements in `tree`, at any depth."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if _in(a.name, packages)}
        elif isinstance(node, ast.ImportFrom) and node.module and _in(node.module, packages):
            found.add(node.module)
            # `from fct_ml import models` names a module, not an attribute.
            subs = (f"{node.module}.{a.name}" for a in node.names)
            found |= {s for s in subs if _module_file(s) is not None}
    return found


def _referenced(fn: Callable, tree: ast.AST, packages: tuple[str, ...]):
    """Project modules and same-module functions that the global names read in `fn` stand for."""
    modules: set[str] = set()
    functions: list[Callable] = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)):
            continue
        value = fn.__globals__.get(node.id)
        if value is None:
            continue
        # An op's compute function stands for the op (graph assets call ops).
        value = getattr(getattr(value, "compute_fn", None), "decorated_fn", value)
        if isinstance(value, types.ModuleType):
            if _in(value.__name__, packages):
                modules.add(value.__name__)
            continue
        owner = getattr(value, "__module__", None) or ""
        if not _in(owner, packages):
            continue
        if owner == fn.__module__ and inspect.isfunction(value):
            functions.append(value)  # a helper beside the asset: its own source, not the file's
        else:
            modules.add(owner)
    return modules, functions


@cache
def module_source(name: str, packages: tuple[str, ...]) -> tuple[str, list[str]]:
    """A project module's source and the project modules it imports (read once per process)."""
    path = _module_file(name)
    if path is None:
        raise ValueError(f"source_units: no source file for module {name!r}")
    source = path.read_text(encoding="utf-8")
    return source, sorted(_imported_modules(ast.parse(source), packages))


def source_units(fn: Callable, packages: tuple[str, ...] = PROJECT_PACKAGES) -> dict[str, str]:
    """The sources that `fn` reaches, by name: its own, the helpers beside it that it calls, and
    every project module it imports or names, with those modules' own project imports in turn.

    A helper in the same module counts by its source alone, so that editing one asset does not
    change the others' versions; any other project module counts whole."""
    units: dict[str, str] = {}
    pending_modules: list[str] = []
    pending_functions: list[Callable] = [inspect.unwrap(fn)]
    while pending_functions or pending_modules:
        if pending_functions:
            func = pending_functions.pop()
            name = f"{func.__module__}:{func.__qualname__}"
            if name in units:
                continue
            source = textwrap.dedent(inspect.getsource(func))
            units[name] = source
            tree = ast.parse(source)
            modules, functions = _referenced(func, tree, packages)
            pending_modules += sorted(modules | _imported_modules(tree, packages))
            pending_functions += functions
        else:
            module_name = pending_modules.pop()
            if module_name in units:
                continue
            units[module_name], imported = module_source(module_name, packages)
            pending_modules += imported
    return units


def source_version(fn: Callable, packages: tuple[str, ...] = PROJECT_PACKAGES) -> str:
    """The code version of the asset computed by `fn`: sha256[:16] of `source_units(fn)`."""
    digest = hashlib.sha256()
    for name, source in sorted(source_units(fn, packages).items()):
        digest.update(f"{name}\n{len(source)}\n{source}".encode())
    return digest.hexdigest()[:16]


@lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the git commit of the checkout (and '+dirty' for local changes).

    FCT_CODE_VERSION, when set, wins: an image has no .git (deploy/Dockerfile bakes the commit in
    at build time), and without it every build would stamp the same bare package version."""
    # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
    from fct_ml import __version__

    if os.environ.get("FCT_CODE_VERSION"):
        return os.environ["FCT_CODE_VERSION"]

    root = Path(__file__).resolve().parents[2]  # the checkout
    try:
        # A fixed argv, no shell and no user input.
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return f"{__version__}+g{sha}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return __version__


def epoch_logger(
    context: dg.AssetExecutionContext, stage: str, epochs: int, items: int
) -> Callable:
    """An `on_epoch` callback that logs epoch, losses, duration and ETA to the run's log."""
    started = time.perf_counter()

    def log(record) -> None:
        elapsed = time.perf_counter() - started
        eta = elapsed / record.epoch * (epochs - record.epoch)
        parts = ", ".join(f"{k} {v:.4f}" for k, v in record.parts.items())
        context.log.info(
            f"{stage}: epoch {record.epoch}/{epochs} ({items} items) {parts}; {record.seconds:.1f}"
            f" s, ETA {eta:.0f} s"
        )

    return log


def history_metadata(history) -> dict[str, Any]:
    """Final losses as numbers (the UI plots them across materialisations) and the per-epoch table."""
    if not history:
        return {}
    last = history[-1]
    meta: dict[str, Any] = {f"final_{k}": float(v) for k, v in last.parts.items()}
    meta["train_seconds"] = float(sum(r.seconds for r in history))
    meta["epochs"] = len(history)
    meta["final_epoch_seconds"] = float(last.seconds)
    # The per-epoch table, as a typed table the UI renders (losses and durations by epoch).
    parts = list(last.parts)
    columns = [
        dg.TableColumn("epoch", "int"),
        dg.TableColumn("seconds", "float"),
        dg.TableColumn("lr", "float"),
    ]
    columns += [
        dg.TableColumn(k, "float", description="mean over the epoch's batches") for k in parts
    ]
    rows = [
        dg.TableRecord(
            {
                "epoch": r.epoch,
                "seconds": round(r.seconds, 2),
                "lr": float(r.lr),
                **{k: round(float(r.parts[k]), 5) for k in parts},
            }
        )
        for r in history
    ]
    meta["history"] = dg.MetadataValue.table(rows, schema=dg.TableSchema(columns=columns))
    return meta
