"""Faults: a backfill killed with SIGKILL part-way, searches while a version is backfilled and
promoted, and the security defaults. Real Dagster instance, real LanceDB, tiny preset."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fct_assets.lib import storage
from fct_assets.lib.records import Deployment
from fct_assets.serving.deployment import current, promote, search
from fct_ml.backfill import apply_transformation
from fct_ml.checkpoint import load_checkpoint
from tests.support.env import build_env

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("backfill_worker.py")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = build_env(tmp_path_factory.mktemp("reliability"))
    promote(e.instance, e.fct.connect(), "v2")
    return e


def _served_state(db) -> tuple[Deployment, int, int]:
    deployed = current(db)
    table = db.open_table(deployed.table)
    return deployed, table.version, table.count_rows()


def _run_worker(root: Path, version: str, kill_after_lines: int | None) -> tuple[int, list[str]]:
    """Run the backfill worker; with kill_after_lines, SIGKILL it after that many progress lines."""
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(root), version, "64"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line.strip())
            if (
                kill_after_lines is not None
                and sum(line.startswith("backfill") for line in lines) >= kill_after_lines
            ):
                proc.send_signal(signal.SIGKILL)
                break
        return proc.wait(timeout=300), lines
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()


def test_backfill_killed_part_way_publishes_nothing_and_rerun_is_exact(env, reliability):
    db = env.fct.connect()
    # v3's model and transformation exist; its table is written by the worker alone.
    job = env.defs.resolve_implicit_global_asset_job_def()
    env.instance.add_dynamic_partitions("model_version", ["v3"])
    import dagster as dg

    assert job.execute_in_process(
        instance=env.instance,
        partition_key="v3",
        asset_selection=[dg.AssetKey("new_model"), dg.AssetKey("transformation")],
        # h from the old model: the worker backfills from gallery_store's old embeddings (and
        # refuses an h trained on another space, e.g. a version promoted by an earlier test).
        run_config={"ops": {"transformation": {"config": {"source": "old"}}}},
    ).success
    before = _served_state(db)
    n = db.open_table(storage.GALLERY_STORE).count_rows()
    batches = -(-n // 64)
    for kill_after in (1, batches // 2, batches - 1):
        code, lines = _run_worker(env.root, "v3", kill_after)
        assert code == -signal.SIGKILL, lines
        assert not storage.table_exists(db, "gallery_v3"), (
            f"killed after {kill_after} batches, a table was published"
        )
        assert _served_state(db) == before
        reliability(
            "fault",
            f"SIGKILL during backfill after {kill_after}/{batches} batches",
            "nothing published; deployed version and its table unchanged",
        )
    code, lines = _run_worker(env.root, "v3", None)
    assert code == 0, lines
    record = json.loads(lines[-1].removeprefix("DONE "))
    table = db.open_table("gallery_v3").to_arrow().sort_by("item_id")
    store = db.open_table(storage.GALLERY_STORE).to_arrow().sort_by("item_id")
    assert (
        table.column("item_id").to_pylist() == store.column("item_id").to_pylist()
    )  # each item once
    assert record["rows"] == n and record["reembedded"] == round(0.25 * n)
    # Transformed rows hold exactly h(stored old_embedding, side_info).
    meta = {name: _recorded(env, name, "v3") for name in ("transformation",)}
    h, _ = load_checkpoint(meta["transformation"]["path"], meta["transformation"]["sha256"])
    expected, _ = apply_transformation(
        h,
        torch.from_numpy(storage.vectors(store.column("old_embedding"))),
        torch.from_numpy(storage.vectors(store.column("side_info"))),
    )
    got = storage.vectors(table.column("embedding"))
    transformed = np.asarray(table.column("source").to_pylist()) == "transformed"
    np.testing.assert_allclose(
        got[transformed], expected.numpy()[transformed], rtol=1e-5, atol=1e-5
    )
    assert _served_state(db) == before
    reliability(
        "fault",
        "re-run after the kills",
        f"table complete: {n} items once each, vectors equal h(stored)",
    )


def test_a_second_backfill_of_the_version_is_refused_naming_the_first(env, reliability):
    """Two backfills of v3 racing (after the kill test, v3's models exist): the second is refused
    with one line naming the first, which is paused mid-way (SIGSTOP) and then completes."""
    db = env.fct.connect()
    before = db.open_table("gallery_v3").version
    first = subprocess.Popen(
        [sys.executable, str(WORKER), str(env.root), "v3", "64"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert first.stdout.readline().startswith("backfill v3")  # it holds the lease
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(
            [sys.executable, str(WORKER), str(env.root), "v3", "64"],
            cwd=REPO,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            timeout=300,
        )
        refusal = second.stderr.strip().splitlines()[-1]
        assert second.returncode != 0 and "DONE" not in second.stdout
        assert refusal.startswith("fct_assets.lib.guards.TableBusyError: gallery_v3: process")
        assert f"process {first.pid} on" in refusal
        assert db.open_table("gallery_v3").version == before  # nothing written by the second
        first.send_signal(signal.SIGCONT)
        out, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
    assert first.returncode == 0 and out.strip().splitlines()[-1].startswith("DONE")
    assert db.open_table("gallery_v3").version > before
    reliability(
        "writers raced",
        "a second backfill of v3 while the first is mid-way (paused)",
        "refused: " + refusal.split(": ", 1)[1] + "; the first completed and published",
    )


def test_a_run_for_an_unregistered_version_is_refused_before_anything_trains(env, reliability):
    import dagster as dg

    assert "v99" not in env.instance.get_dynamic_partitions("model_version")
    try:
        run = env.defs.resolve_job_def("upgrade").execute_in_process(
            instance=env.instance, partition_key="v99", raise_on_error=False
        )
    except dg.DagsterError as err:  # Dagster's own refusal at launch, if it makes one
        refusal = str(err).splitlines()[0]
    else:
        assert not run.success
        failure = next(e for e in run.all_events if e.is_step_failure)
        assert failure.step_key == "new_model"  # the first step; nothing after it ran
        refusal = failure.step_failure_data.error.message.strip()
        assert not any(e.is_step_success for e in run.all_events)
    # Dagster refuses an unknown partition key at launch in process ("Could not find a partition
    # with key `v99`"); a launch that gets past it meets our step-time refusal.
    assert "v99" in refusal and "\n" not in refusal
    assert "not registered" in refusal or "Could not find a partition" in refusal
    assert not (env.root / "checkpoints" / "new_model" / "v99.safetensors").exists()
    assert not storage.table_exists(env.fct.connect(), "gallery_v99")
    reliability(
        "bad input",
        "an upgrade run for a model version never registered (v99)",
        f"refused before anything trained: {refusal}",
    )


def _recorded(env, asset: str, partition: str) -> dict:
    import dagster as dg

    from fct_assets.lib.event_log import recorded_metadata

    return recorded_metadata(env.instance, dg.AssetKey(asset), partition)


def test_searches_during_backfill_and_promotion_see_one_version(env, reliability):
    db = env.fct.connect()
    answers: list[dict] = []
    errors: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        reader_db = env.fct.connect()
        deadline = time.monotonic() + 240  # bounded in time and count
        while not stop.is_set() and time.monotonic() < deadline and len(answers) < 5000:
            try:
                deployed = current(reader_db)
                table = reader_db.open_table(deployed.table)
                table.checkout(int(deployed.table_version))
                row = (
                    table.search().where("item_id = 11").select(["embedding"]).limit(1).to_list()[0]
                )
                hits = search(reader_db, row["embedding"], version=deployed, k=5)
                answers.append(
                    {
                        "version": deployed.version,
                        "table_version": deployed.table_version,
                        "hits": [(h.item_id, h.distance) for h in hits],
                    }
                )
            except Exception as err:  # any failure is a finding
                errors.append(f"{type(err).__name__}: {err}")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        assert env.upgrade("v4").success
        promote(env.instance, db, "v4")
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors[:3]
    versions = {a["version"] for a in answers}
    assert versions == {"v2", "v4"}, versions
    # Each answer comes from one version: its query vector is item 11's row of that version, so
    # item 11 is first at distance 0, and the rest match a brute-force search of that version.
    truth = {}
    for version in versions:
        deployed = next(a for a in answers if a["version"] == version)
        table = db.open_table(f"gallery_{version}")
        table.checkout(int(deployed["table_version"]))
        data = table.to_arrow().sort_by("item_id")
        vectors = storage.vectors(data.column("embedding"))
        ids = np.asarray(data.column("item_id").to_pylist())
        d = ((vectors - vectors[ids == 11][0]) ** 2).sum(1)
        truth[version] = ids[np.argsort(d, kind="stable")[:5]].tolist()
    for a in answers:
        assert a["hits"][0] == (11, pytest.approx(0.0, abs=1e-4))
        assert [i for i, _ in a["hits"]] == truth[a["version"]]
    reliability(
        "fault",
        f"{len(answers)} searches while v4 was backfilled and promoted",
        f"none failed; each answer from one version ({sorted(versions)})",
    )


# What the security scan forbids, by call: unpickling (pickle.load/loads), a shell (os.system,
# os.popen, any call with shell=True, e.g. subprocess.run), and torch.load without
# weights_only=True.
_FORBIDDEN_CALLS = {"pickle.load", "pickle.loads", "os.system", "os.popen"}


def _call_name(func: ast.expr, aliases: dict[str, str]) -> str | None:
    """The dotted name a call's function resolves to through the module's imports, or None."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None  # e.g. SomeUnpickler(f).load(): not a module-level function
    parts.append(aliases.get(func.id, func.id))
    return ".".join(reversed(parts))


def _unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted name) of every call in `tree` the security defaults forbid."""
    # Local name -> what it was imported as: "pk" -> "pickle", "load" -> "torch.load".
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update(
                {
                    (a.asname or a.name.split(".")[0]): a.name if a.asname else a.name.split(".")[0]
                    for a in node.names
                }
            )
        elif isinstance(node, ast.ImportFrom) and node.module:
            aliases.update({(a.asname or a.name): f"{node.module}.{a.name}" for a in node.names})
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node.func, aliases)
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        shell = keywords.get("shell")
        weights_only = keywords.get("weights_only")
        if name in _FORBIDDEN_CALLS:
            found.append((node.lineno, name))
        elif name == "torch.load" and not (
            isinstance(weights_only, ast.Constant) and weights_only.value is True
        ):
            found.append((node.lineno, name))
        elif shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
            found.append((node.lineno, f"{name}(shell=...)"))
    return sorted(found)


def test_the_security_scan_would_catch_each_unsafe_call() -> None:
    snippet = (
        "import os, subprocess, torch\n"
        "import pickle as pk\n"
        "from torch import load\n"
        "torch.load(f)\n"  # 4: no weights_only
        "torch.load(f, weights_only=True)\n"  # 5: fine
        "torch.load(f, weights_only=False)\n"  # 6
        "load(f)\n"  # 7: torch.load by another name
        "pk.loads(b)\n"  # 8
        "os.system('ls')\n"  # 9
        "subprocess.run('ls', shell=True)\n"  # 10
        "subprocess.run(['ls'], shell=False)\n"  # 11: fine
        "Restricted(f).load()\n"  # 12: a method of an object, fine
        "def g():\n    os.popen('ls')\n"  # 14: inside a function
    )
    assert _unsafe_calls(ast.parse(snippet)) == [
        (4, "torch.load"),
        (6, "torch.load"),
        (7, "torch.load"),
        (8, "pickle.loads"),
        (9, "os.system"),
        (10, "subprocess.run(shell=...)"),
        (14, "os.popen"),
    ]


def test_security_defaults(reliability):
    files = sorted(p for d in ("fct_ml", "fct_assets") for p in (REPO / d).rglob("*.py"))
    assert (
        REPO / "fct_ml" / "data.py" in files and REPO / "fct_assets" / "lib" / "storage.py" in files
    )
    unsafe = [
        f"{path.relative_to(REPO)}:{line}: {name}"
        for path in files
        for line, name in _unsafe_calls(ast.parse(path.read_text(), filename=str(path)))
    ]
    assert unsafe == []
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"dagster dev .*-h 127\.0\.0\.1", makefile)
    reliability("security", "source scan: shell, os.system, pickle, torch.load", "none unsafe")
    reliability("security", "make ui binds", "127.0.0.1 only")


def test_same_seed_same_metrics_on_cpu(tmp_path, reliability):
    # Through the CLI, as a user runs it: the seed reaches the run and the written JSON is the same.
    from fct_ml.cli import main

    results = []
    for i in range(2):
        out = tmp_path / f"run{i}.json"
        with contextlib.redirect_stdout(io.StringIO()):
            code = main(
                [
                    "reproduce",
                    "--dataset",
                    "digits",
                    "--preset",
                    "tiny",
                    "--seed",
                    "3",
                    "--out",
                    str(out),
                    "--quiet",
                ]
            )
        assert code == 0
        results.append(json.loads(out.read_text()))
    assert results[0]["seed"] == 3
    for key in ("cases", "cases_unseen_classes", "backfill_auc", "gap_closed"):
        assert results[0][key] == results[1][key], key
    reliability(
        "determinism",
        "fct reproduce --preset tiny --dataset digits, seed 3, twice",
        f"identical metrics (new/h(old) mAP {results[0]['cases']['new/h(old)']['mAP']:.2f} both"
        " times)",
    )
