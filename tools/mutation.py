"""Mutation testing of the modules that compute what users read (`make mutation`, not part of CI).

mutmut (3.x) mutates one expression at a time in the modules below and runs, for each mutant,
only the fast tests that reach the mutated function (mutmut records which tests call which
function in a first pass). A mutant the tests do not fail on survives. It runs in a copy of the
repository under runs/mutation/ (mutmut's config goes into the copy's pyproject.toml), then
writes benchmarks/results/mutation.{json,md}:

    {"modules": {PATH: {"killed", "survived", "total"}}, "score": killed/total,
     "survivors": [{"path", "line", "mutant", "why kept"}], ...}

A survivor is kept only when judged equivalent (no test can tell it apart from the original):
tools/mutation_equivalents.toml says why, keyed by module, function and the changed statement
(before and after, as ast.unparse writes it, so that a reformat cannot orphan it). Any other
survivor is printed with "why kept": null and must be killed by a test or judged.

    python tools/mutation.py [--modules fct_ml/retrieval.py ...] [--max-children 2]
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULES = [
    "fct_ml/retrieval.py",
    "fct_ml/backfill.py",
    "fct_ml/losses.py",
    "fct_ml/bct.py",
    "fct_ml/evaluation.py",
    "fct_ml/transformation.py",
    "fct_assets/serving/deployment.py",
    "fct_assets/serving/jobs.py",
    "fct_assets/upgrade/freshness.py",
    "fct_assets/lib/table_checks.py",
    "fct_assets/upgrade/checks.py",
    "fct_assets/upgrade/report.py",
]
# fct_assets/base/checks.py (gallery_store_schema) is left out: its one function is decorated,
# and mutmut 3 makes no mutant of a decorated function.
# The fast tests that cover each module (seconds each: no Dagster run, no training beyond a few
# steps of a tiny model; tests marked slow are deselected). A run over some modules uses the union
# of theirs, and mutmut runs, for each mutant, the subset that reaches the mutated function.
TESTS_BY_MODULE = {
    "fct_ml/retrieval.py": ["tests/fct_ml/test_retrieval.py", "tests/fct_ml/test_evaluation.py"],
    "fct_ml/backfill.py": [
        "tests/fct_ml/test_backfill.py",
        "tests/fct_ml/test_backfill_summary.py",
    ],
    "fct_ml/losses.py": ["tests/fct_ml/test_losses.py"],
    "fct_ml/bct.py": ["tests/fct_ml/test_bct.py", "tests/fct_ml/test_models.py"],
    "fct_ml/evaluation.py": [
        "tests/fct_ml/test_evaluation.py",
        "tests/fct_ml/test_evaluation_cases.py",
    ],
    "fct_ml/transformation.py": [
        "tests/fct_ml/test_transformation.py",
        "tests/fct_ml/test_models.py",
        "tests/fct_ml/test_losses.py",
        "tests/fct_ml/test_augment.py",
    ],
    "fct_assets/serving/deployment.py": [
        "tests/fct_assets/test_promotion_rules.py",
        "tests/fct_assets/test_upgrade_is_current.py",
    ],
    "fct_assets/serving/jobs.py": ["tests/fct_assets/test_promotion_rules.py"],
    "fct_assets/upgrade/freshness.py": ["tests/fct_assets/test_upgrade_is_current.py"],
    "fct_assets/lib/table_checks.py": ["tests/fct_assets/test_checks.py"],
    "fct_assets/upgrade/checks.py": ["tests/fct_assets/test_checks.py"],
    "fct_assets/upgrade/report.py": [
        "tests/fct_assets/test_report.py",
        "tests/fct_assets/test_report_fast.py",
    ],
}


def tests_for(modules: list[str]) -> list[str]:
    """The fast test files of `modules`, each once, in order."""
    return list(dict.fromkeys(t for m in modules for t in TESTS_BY_MODULE[m]))


# mutmut's exit-code statuses: a timeout is a detected change (the mutant looped), so killed.
KILLED = {"killed", "timeout", "caught by type check", "segfault"}

# Survivors judged equivalent, with why no test can tell: data in mutation_equivalents.toml (its
# header says how a mutant is keyed).
EQUIVALENTS = Path(__file__).with_name("mutation_equivalents.toml")

Key = tuple[str, str, str, str]  # (module path, function qualname, before, after)


def load_equivalents(path: Path = EQUIVALENTS) -> dict[Key, str]:
    """The judgements of `path`: (module, function, before, after) -> reason (the text, a name in
    [reasons] resolved). Raises ValueError on a reason that names no entry of [reasons]."""
    data = tomllib.loads(path.read_text())
    reasons = data.get("reasons", {})
    out: dict[Key, str] = {}
    for e in data.get("equivalent", []):
        reason = e["reason"]
        if " " not in reason and reason not in reasons:
            raise ValueError(f"{path.name}: reason {reason!r} is not in [reasons]")
        out[(e["module"], e["function"], e["before"], e["after"])] = reasons.get(reason, reason)
    return out


_BODIES = ("body", "orelse", "finalbody", "handlers", "cases")
_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef)


def _same(a: object, b: object) -> bool:
    if isinstance(a, ast.AST) and isinstance(b, ast.AST):
        return ast.dump(a) == ast.dump(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _text(stmt: ast.stmt, field: str | None) -> str:
    """A statement as ast.unparse writes it: a function by its signature, another compound
    statement by its header when the change is there (not in its body)."""
    if isinstance(stmt, _DEFS) and field not in _BODIES:
        returns = f" -> {ast.unparse(stmt.returns)}" if stmt.returns else ""
        return f"def {stmt.name}({ast.unparse(stmt.args)}){returns}"
    if field in _BODIES or not any(hasattr(stmt, f) for f in _BODIES):
        return ast.unparse(stmt)
    head = copy.copy(stmt)
    for f in _BODIES:
        if hasattr(head, f):
            setattr(head, f, [])
    head.body = [ast.Expr(ast.Constant(...))]
    return ast.unparse(head).rsplit("\n", 1)[0]


def changed_statement(original: ast.AST, mutant: ast.AST) -> tuple[str, str]:
    """(before, after): the innermost statement where `mutant` differs from `original` (two
    versions of one function), each as _text writes it."""
    stmt, field = (original, mutant), None
    x, y = original, mutant
    while True:
        if isinstance(x, ast.stmt):
            stmt, field = (x, y), None
        if type(x) is not type(y):
            break
        diff = next(
            (f for f in x._fields if not _same(getattr(x, f, None), getattr(y, f, None))), None
        )
        if diff is None:
            raise ValueError("the mutant does not differ from the original")
        if stmt[0] is x:
            field = diff
        vx, vy = getattr(x, diff, None), getattr(y, diff, None)
        if isinstance(vx, list) and isinstance(vy, list) and len(vx) == len(vy):
            i = next(i for i, (p, q) in enumerate(zip(vx, vy, strict=True)) if not _same(p, q))
            vx, vy = vx[i], vy[i]
        if not (isinstance(vx, ast.AST) and isinstance(vy, ast.AST)):
            break
        x, y = vx, vy
    return _text(stmt[0], field), _text(stmt[1], field)


def _functions(tree: ast.Module) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    """mutmut's generated functions of a mutated file by name: top-level ones and methods."""
    out = {}
    for node in tree.body:
        if isinstance(node, _DEFS):
            out[node.name] = node
        elif isinstance(node, ast.ClassDef):
            out |= {m.name: m for m in node.body if isinstance(m, _DEFS)}
    return out


def qualname(mutant: str) -> str:
    """The function a mutant name points at: `pkg.mod.x_f__mutmut_3` -> `f`,
    `pkg.mod.xǁClsǁm__mutmut_3` -> `Cls.m` (mutmut's mangling, mutmut/utils/format_utils.py)."""
    mangled = mutant.partition("__mutmut_")[0].rpartition(".")[2]
    return mangled[2:] if mangled.startswith("x_") else ".".join(mangled.split("ǁ")[1:3])


def mutant_keys(path: str, mutated: str, names: list[str]) -> dict[str, Key]:
    """The key of each mutant in `names` of the module `path`, from mutmut's mutated file (its
    text `mutated`), where each function stands as `..__mutmut_orig` beside its mutants."""
    functions = _functions(ast.parse(mutated))
    out = {}
    for name in names:
        short = name.rpartition(".")[2]
        original = copy.copy(functions[short.partition("__mutmut_")[0] + "__mutmut_orig"])
        mutant = copy.copy(functions[short])
        original.name = mutant.name = qualname(name).rpartition(".")[2]
        out[name] = (path, qualname(name), *changed_statement(original, mutant))
    return out


def _setup(workdir: Path, modules: list[str], tests: list[str]) -> None:
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    for name in ("fct_ml", "fct_assets", "tests"):
        shutil.copytree(
            REPO / name, workdir / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    config = "\n".join(
        [
            "",
            "[tool.mutmut]",
            'source_paths = ["fct_ml", "fct_assets"]',
            f"only_mutate = {json.dumps(modules)}",
            f"pytest_add_cli_args_test_selection = {json.dumps(tests)}",
            'pytest_add_cli_args = ["-p", "no:cacheprovider", "-W", "ignore", "-q", "-m", "not slow"]',
            "use_git_change_detection = false",
            # On the shared 2-core machine a forked test run can take many times the duration
            # mutmut measured in its first pass: mutmut's default limit (15x + 1 s) then times
            # out mutants that do not loop, and a timeout counts as killed.
            "timeout_multiplier = 50.0",
            "timeout_constant = 30.0",
            # Each mutant forked from a server process that never ran a test: the fct_assets
            # tests open LanceDB (a tokio runtime, an event-loop thread) and Dagster, and a
            # child forked from a process holding those deadlocks or segfaults.
            'process_isolation = "forkserver"',
            "",
        ]
    )
    (workdir / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text() + config)


def _mutmut(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    # One torch/OpenMP thread. With mutmut's plain fork isolation, a child forked after OpenMP had
    # started its thread pool waited forever at its first parallel region (fct_ml/backfill.py's
    # mutants sat at 0 % CPU for minutes). The forkserver isolation set in _setup was measured
    # with this setting kept, not without it.
    threads = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    return subprocess.run(
        [sys.executable, "-m", "mutmut", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **threads},
    )


def _changed_line(workdir: Path, name: str, source: list[str]) -> tuple[int, str, str]:
    """(line in the original file, original line, mutated line) of one mutant."""
    diff = _mutmut(workdir, "show", name).stdout.splitlines()
    removed = [line[1:] for line in diff if line.startswith("-") and not line.startswith("---")]
    added = [line[1:] for line in diff if line.startswith("+") and not line.startswith("+++")]
    before = removed[0].strip() if removed else ""
    after = added[0].strip() if added else ""
    lineno = next((i + 1 for i, text in enumerate(source) if text.strip() == before), 0)
    return lineno, before, after


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs="+", default=MODULES)
    parser.add_argument("--tests", nargs="+", help="default: the modules' fast tests")
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "mutation")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--note", help="a paragraph put at the top of mutation.md")
    parser.add_argument(
        "--markdown-only",
        action="store_true",
        help="do not run: rewrite mutation.md from mutation.json (with --note)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other modules' figures of an earlier mutation.json (runs in parts)",
    )
    parser.add_argument(
        "--collect",
        type=float,
        metavar="WALL_SECONDS",
        help="do not run: write the results of the run in --workdir as they stand (mutants not"
        " yet checked are counted apart), stating the given wall time",
    )
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in TESTS_BY_MODULE]
    if unknown:
        parser.error(f"--modules: {unknown[0]} is not one of {MODULES}")
    args.tests = args.tests or tests_for(args.modules)

    if args.markdown_only:
        result = json.loads((args.out / "mutation.json").read_text())
        result["note"] = args.note or result.get("note")
        (args.out / "mutation.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "mutation.md").write_text(markdown(result))
        return 0

    from mutmut.stats import status_by_exit_code

    started = time.perf_counter()
    if args.collect is None:
        _setup(args.workdir, args.modules, args.tests)
        run = _mutmut(args.workdir, "run", "--max-children", str(args.max_children))
        metas = list((args.workdir / "mutants").rglob("*.meta"))
        checked = any(
            status_by_exit_code[code] != "not checked"
            for meta in metas
            for code in json.loads(meta.read_text())["exit_code_by_key"].values()
        )
        if not checked:  # e.g. a test file missing, or a test failing without any mutant
            print(run.stdout[-3000:], run.stderr[-3000:], file=sys.stderr)
            return 1
    wall = time.perf_counter() - started if args.collect is None else args.collect

    equivalents = load_equivalents()
    matched: set[Key] = set()
    modules: dict[str, dict[str, int]] = {}
    survivors: list[dict] = []
    statuses: Counter = Counter()
    for path in args.modules:
        meta = json.loads((args.workdir / "mutants" / f"{path}.meta").read_text())
        source = (REPO / path).read_text().splitlines()
        keys = mutant_keys(
            path,
            (args.workdir / "mutants" / path).read_text(),
            list(meta["exit_code_by_key"]),
        )
        matched |= set(keys.values()) & set(equivalents)
        killed = total = unchecked = 0
        for name, code in sorted(meta["exit_code_by_key"].items(), key=lambda kv: _order(kv[0])):
            status = status_by_exit_code[code]
            statuses[status] += 1
            if status == "not checked":  # a run cut short (--collect)
                unchecked += 1
                continue
            total += 1
            if status in KILLED:
                killed += 1
                continue
            line, _, _ = _changed_line(args.workdir, name, source)
            _, function, before, after = keys[name]
            survivors.append(
                {
                    "path": path,
                    "line": line,
                    "function": function,
                    "mutant": f"{before}  ->  {after}",
                    "status": status,
                    "name": name,
                    "why kept": equivalents.get(keys[name]),
                }
            )
        modules[path] = {"killed": killed, "survived": total - killed, "total": total}
        if unchecked:
            modules[path]["not_checked"] = unchecked
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    runs = [{"modules": list(modules), "wall_seconds": round(wall, 1), "commit": head}]
    earlier = args.out / "mutation.json"
    if args.merge and earlier.exists():
        before = json.loads(earlier.read_text())
        modules = {
            **{k: v for k, v in before["modules"].items() if k not in modules},
            **modules,
        }
        survivors = [s for s in before["survivors"] if s["path"] not in args.modules] + survivors
        # An earlier run's wall time counts while any module it measured still stands here; the
        # modules measured again are taken off its list.
        earlier_runs = [
            {**r, "modules": [m for m in r["modules"] if m not in args.modules]}
            for r in before.get("runs", [])
        ]
        runs = [r for r in earlier_runs if r["modules"]] + runs
        args.tests = sorted(set(before["tests"]) | set(args.tests))
        wall = sum(r["wall_seconds"] for r in runs)
    modules = {path: modules[path] for path in MODULES if path in modules} | modules
    killed = sum(m["killed"] for m in modules.values())
    total = sum(m["total"] for m in modules.values())
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    # Judgements of the modules run that matched no mutant: the judged code changed (or mutmut
    # stopped mutating it, e.g. a function that gained a decorator); judge again or delete.
    stale = [
        {"module": k[0], "function": k[1], "before": k[2], "after": k[3]}
        for k in equivalents
        if k[0] in args.modules and k not in matched
    ]
    result = {
        "note": args.note,
        "modules": modules,
        "score": round(killed / total, 4) if total else None,
        "survivors": survivors,
        "statuses": dict(statuses),
        "tests": args.tests,
        "commit": commit,
        "wall_seconds": round(wall, 1),
        "runs": runs,
        "mutmut": _version(),
        "stale_judgements": stale,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mutation.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "mutation.md").write_text(markdown(result))
    unjudged = [s for s in survivors if s["why kept"] is None]
    print(
        f"mutation score {killed}/{total} = {result['score']}; {len(unjudged)} survivors not"
        f" judged equivalent; wall time {wall:.0f} s"
    )
    for s in stale:
        print(f"stale judgement in {EQUIVALENTS.name}: {s}", file=sys.stderr)
    return 0


def _order(name: str) -> tuple[str, int]:
    match = re.search(r"__mutmut_(\d+)$", name)
    return (name.rsplit("__mutmut_", 1)[0], int(match.group(1)) if match else 0)


def _version() -> str:
    from importlib.metadata import version

    return version("mutmut")


def markdown(result: dict) -> str:
    lines = ["# Mutation testing", ""]
    if result.get("note"):
        lines += [result["note"], ""]
    lines += [
        f"mutmut {result['mutmut']} at commit {result['commit']}, fast tests only"
        f" ({len(result['tests'])} files); wall time {result['wall_seconds']:.0f} s"
        " (`make mutation`).",
        "",
        "| module | killed | survived | total | score | not checked |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for path, m in result["modules"].items():
        score = m["killed"] / m["total"] if m["total"] else float("nan")
        lines.append(
            f"| {path} | {m['killed']} | {m['survived']} | {m['total']} | {score:.2f}"
            f" | {m.get('not_checked', 0)} |"
        )
    killed = sum(m["killed"] for m in result["modules"].values())
    total = sum(m["total"] for m in result["modules"].values())
    unchecked = sum(m.get("not_checked", 0) for m in result["modules"].values())
    lines += [
        f"| **all** | {killed} | {total - killed} | {total} | {result['score']:.2f} | {unchecked} |",
        "",
        "The rule: score = killed / (killed + survived) over the mutants mutmut checked; a mutant"
        " no fast test reaches (`no tests`) counts as survived; a timeout counts as killed (the"
        " mutant looped). Not checked: the run was cut short before mutmut ran them; they are"
        " left out of the score and listed per module, never counted as killed. No mutant is"
        " excluded: a survivor is kept only when judged equivalent"
        " (tools/mutation_equivalents.toml, keyed by module, function and the changed statement;"
        " the reason below); the others say `not judged`.",
        "",
        "## Runs",
        "",
        "| modules | commit | wall time (s) |",
        "| --- | --- | --- |",
    ]
    for run in result["runs"]:
        modules = ", ".join(run["modules"])
        lines.append(f"| {modules} | {run.get('commit', '?')} | {run['wall_seconds']:.0f} |")
    complete = [p for p, m in result["modules"].items() if m["total"] and not m.get("not_checked")]
    partial = [p for p in result["modules"] if p not in complete]
    lines += [
        "",
        f"Complete: {', '.join(complete) or 'none'}. Partial or not run: {', '.join(partial) or 'none'}.",
        "",
    ]
    lines += ["## Survivors", "", "| file:line | mutant | why kept |", "| --- | --- | --- |"]
    for s in result["survivors"]:
        mutant = s["mutant"].replace("|", "\\|")
        why = s["why kept"] or f"not judged ({s['status']})"
        lines.append(f"| {s['path']}:{s['line']} | `{mutant}` | {why} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
