"""Ingestion on the real stack: the inbox sensor ticked by the sensor daemon, ingest runs in a
real Dagster instance, real LanceDB tables (tiny preset, digits)."""

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.compute as pc

from fct_assets.cli import main as fct_main
from fct_assets.ingest.ingest import content_id, decode_image, label_of
from fct_assets.lib import guards, storage
from fct_assets.lib.event_log import plain_metadata
from fct_assets.serving.deployment import current, history, missing_items, promote, rollback

REPO = Path(__file__).resolve().parents[2]


def held_back(env, n: int, start: int = 0) -> list[tuple[np.ndarray, int]]:
    """n (image (C, H, W) uint8, label) of the validation split: never trained on, not in the
    gallery."""
    from fct_ml.pipeline import validation_split

    data = env.fct.load_dataset("digits")
    val = validation_split(data, env.fct.experiment())
    return [(val.images[i].numpy(), int(val.labels[i])) for i in range(start, start + n)]


def write_png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(storage.encode_png(image))
    return path


def deploy(env, version: str = "v2") -> None:
    db = env.fct.connect()
    serving = current(db)
    if serving is None or serving.version != version:
        if version == "v2":
            env.ensure(version)
        elif version not in env.instance.get_dynamic_partitions("model_version"):
            # A better model than v2's, as a real next version is (test_living's harness does
            # the same): the default one may miss the report's quality gate on this gallery.
            epochs = 2 * env.fct.experiment().new_train.epochs
            config = {"ops": {"new_model": {"config": {"seed": 1, "epochs": epochs}}}}
            assert env.upgrade(version, config).success
        promote(env.instance, db, version)


def run_ingest(env, batch: str, config: dict) -> dg.ExecuteInProcessResult:
    env.instance.add_dynamic_partitions("ingest_batch", [batch])
    return env.defs.resolve_job_def("ingest").execute_in_process(
        instance=env.instance,
        partition_key=batch,
        run_config={"ops": {"ingested_batch": {"config": config}}},
    )


def batch_metadata(env, batch: str) -> dict:
    record = env.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("ingested_batch"), asset_partitions=[batch]),
        limit=1,
    ).records[0]
    return plain_metadata(record)


def rows_of(env, table: str, ids) -> dict[int, dict]:
    t = env.fct.connect().open_table(table)
    rows = t.to_arrow().to_pylist()
    return {r["item_id"]: r for r in rows if r["item_id"] in set(ids)}


def test_label_of_folder_names():
    names = ["zero", "one", "T-shirt/top"]
    folders = ("One", "2", "t-shirt-top", "7", "misc", None)
    assert [label_of(f, names) for f in folders] == [1, 2, 2, -1, -1, -1]


def test_content_ids_follow_the_pixels_not_the_file():
    from PIL import Image

    image = np.arange(64, dtype=np.uint8).reshape(1, 8, 8)
    import io

    bmp = io.BytesIO()
    Image.fromarray(image[0]).save(bmp, format="BMP")
    as_png = decode_image(storage.encode_png(image), 1, (8, 8))
    as_bmp = decode_image(bmp.getvalue(), 1, (8, 8))
    assert content_id(as_png) == content_id(as_bmp) == content_id(image)
    assert content_id(image) != content_id(image[:, ::-1].copy())
    assert 0 < content_id(image) < 2**63


def test_the_inbox_sensor_launches_one_ingest_run_per_batch(living, tmp_path):
    deploy(living)
    inbox = tmp_path / "inbox"
    items = held_back(living, 5)
    names = living.fct.load_dataset("digits").class_names
    for k, (image, label) in enumerate(items[:4]):
        write_png(inbox / names[label] / f"item{k}.png", image)
    write_png(inbox / "loose.png", items[4][0])  # no sub-folder: label unknown
    (inbox / ".partial.png").write_bytes(b"being written")  # a dot-name is not picked up

    done = subprocess.run(
        [sys.executable, "-m", "tests.support.ingest_tick", "2"],
        cwd=REPO,
        env={
            **os.environ,
            **living.environ(),
            "FCT_INBOX": str(inbox),
            "FCT_INBOX_INTERVAL_S": "1",
            "FCT_INBOX_SETTLE_S": "0",  # just written, and complete (test_ingest_inbox.py)
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = json.loads(done.stdout.strip().splitlines()[-1])
    # One run for the five files, a new ingest_batch partition; the second tick finds the files
    # already launched (their run has not moved them yet) and requests nothing.
    assert len(first) == 1 and second == []
    request = first[0]
    batch = request["partition"]
    assert request["job"] == "ingest"
    assert batch in living.instance.get_dynamic_partitions("ingest_batch")
    config = request["run_config"]["ops"]["ingested_batch"]["config"]
    assert sorted(config["files"]) == sorted(
        [f"{names[label]}/item{k}.png" for k, (_, label) in enumerate(items[:4])] + ["loose.png"]
    )

    result = living.defs.resolve_job_def("ingest").execute_in_process(
        instance=living.instance,
        partition_key=batch,
        run_config=request["run_config"],
    )
    assert result.success
    ids = [content_id(image) for image, _ in items]
    store = rows_of(living, storage.GALLERY_STORE, ids)
    table = rows_of(living, "gallery_v2", ids)
    assert set(store) == set(table) == set(ids)
    expected_labels = [label for _, label in items[:4]] + [-1]
    assert [store[i]["label"] for i in ids] == expected_labels
    # Embedded by the deployed v2 model: no old embedding; side-info in the store's space.
    side_space = storage.table_space_ids(living.fct.connect().open_table("gallery_store"))
    for i in ids:
        assert store[i]["old_embedding"] is None and store[i]["old_space_id"] is None
        assert store[i]["side_info_space_id"] == side_space["side_info_space_id"]
        assert store[i]["ingest_batch"] == table[i]["ingest_batch"] == batch
        assert table[i]["source"] == "ingested"
        assert table[i]["space_id"] == table[i]["chain"] == current(living.fct.connect()).space_id
    # The deployment serves the table version that holds them; the files left the inbox.
    db = living.fct.connect()
    assert current(db).table_version == db.open_table("gallery_v2").version
    assert current(db).action == "ingest"
    assert sorted(p.name for p in (inbox / ".processed" / batch).rglob("*.png")) == sorted(
        [f"item{k}.png" for k in range(4)] + ["loose.png"]
    )
    meta = batch_metadata(living, batch)
    assert (meta["added_to_store"], meta["added_to_table"], meta["duplicates"]) == (5, 5, 0)


def test_reingest_is_idempotent(living, tmp_path, capsys):
    from PIL import Image

    deploy(living)
    items = held_back(living, 3, start=10)
    folder = tmp_path / "drop"
    for k, (image, _) in enumerate(items):
        write_png(folder / f"a{k}.png", image)
    env = living.environ()
    os.environ.update(env)  # fct reads the instance and storage from the environment
    try:
        assert fct_main(["ingest", str(folder), "--json"]) == 0
        first = json.loads(capsys.readouterr().out)
        # The same pictures again, one as a BMP under another name: nothing is added.
        Image.fromarray(items[0][0][0]).save(folder / "copy.bmp")
        assert fct_main(["ingest", str(folder), "--json"]) == 0
        second = json.loads(capsys.readouterr().out)
    finally:
        for key in env:
            os.environ.pop(key, None)
    assert (first["added_to_store"], first["added_to_table"], first["duplicates"]) == (3, 3, 0)
    # `--json` prints the batch's record with the keys and values of its materialisation's
    # metadata (which the command read before it read the record).
    assert list(first) == [
        "batch",
        "files",
        "added_to_store",
        "added_to_table",
        "duplicates",
        "table",
        "space_id",
        "deployed_version",
        "quarantined",
    ]
    recorded = batch_metadata(living, first["batch"])
    assert first == {key: recorded[key] for key in first}
    assert (second["added_to_store"], second["added_to_table"]) == (0, 0)
    assert second["duplicates"] == 4  # three stored already, and the BMP copy of one of them
    ids = [content_id(image) for image, _ in items]
    db = living.fct.connect()
    for name in ("gallery_store", "gallery_v2"):
        column = db.open_table(name).to_arrow().column("item_id")
        assert [pc.sum(pc.equal(column, i)).as_py() for i in ids] == [1, 1, 1]

    # A run retried after it wrote gallery_store but not the deployed table (killed between the
    # two commits, emulated by deleting its rows there): the retry writes the missing rows only.
    batch = first["batch"]
    db.open_table("gallery_v2").delete(f"ingest_batch = '{batch}'")
    retry = run_ingest(living, batch, {"files": [str(folder / f"a{k}.png") for k in range(3)]})
    assert retry.success
    meta = batch_metadata(living, batch)
    assert (meta["added_to_store"], meta["added_to_table"]) == (0, 3)
    column = db.open_table("gallery_v2").to_arrow().column("item_id")
    assert [pc.sum(pc.equal(column, i)).as_py() for i in ids] == [1, 1, 1]


def test_a_corrupt_file_is_quarantined_and_the_rest_lands(living, tmp_path):
    deploy(living)
    inbox = tmp_path / "inbox"
    items = held_back(living, 2, start=20)
    good = [write_png(inbox / f"good{k}.png", image) for k, (image, _) in enumerate(items)]
    png = storage.encode_png(items[0][0])
    (inbox / "noise.png").write_bytes(bytes(range(256)) * 4)
    (inbox / "truncated.png").write_bytes(png[: len(png) // 2])
    (inbox / "empty.jpg").write_bytes(b"")
    files = sorted(p.name for p in inbox.iterdir())
    store_rows = living.fct.connect().open_table("gallery_store").count_rows()

    result = run_ingest(living, "bcorrupt", {"files": files, "inbox": str(inbox)})
    assert result.success
    meta = batch_metadata(living, "bcorrupt")
    reasons = {q["file"].rsplit("/", 1)[-1]: q["reason"] for q in meta["quarantined"]}
    assert sorted(reasons) == ["noise.png"]
    assert reasons["noise.png"].startswith("unreadable image (not an image")
    # Empty or truncated: maybe still being written, left in the inbox for a later tick.
    left = {q["file"].rsplit("/", 1)[-1]: q["reason"] for q in meta["retrying"]}
    assert sorted(left) == ["empty.jpg", "truncated.png"]
    assert left["empty.jpg"].startswith("empty file; still being written? left in the inbox")
    assert left["truncated.png"].startswith("unreadable image (")
    assert all("\n" not in r for r in [*reasons.values(), *left.values()])
    assert (inbox / "empty.jpg").exists() and (inbox / "truncated.png").exists()
    assert meta["added_to_store"] == 2
    assert living.fct.connect().open_table("gallery_store").count_rows() == store_rows + 2
    # Each quarantined file sits in .quarantine/<batch>/ beside its reason; the good ones landed.
    quarantine = inbox / ".quarantine" / "bcorrupt"
    for name, reason in reasons.items():
        assert (quarantine / name).exists()
        assert (quarantine / f"{name}.reason.txt").read_text() == reason + "\n"
    assert sorted(p.name for p in (inbox / ".processed" / "bcorrupt").iterdir()) == [
        p.name for p in good
    ]


def aged(path: Path, seconds: float) -> Path:
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def test_a_file_being_written_waits_and_a_truncated_one_is_retried(living, tmp_path, monkeypatch):
    """Through the real inbox sensor (evaluated by Dagster's build_sensor_context, as the demo
    does) and ingest runs: a half-written PNG is not taken until it has settled, then lands
    whole; a truncated PNG whose writer died is left for one retry, then quarantined."""
    deploy(living)
    inbox = tmp_path / "inbox"
    (good, _), (dead, _), (slow, _) = held_back(living, 3, start=30)
    aged(write_png(inbox / "good.png", good), 60)
    dead_png, slow_png = storage.encode_png(dead), storage.encode_png(slow)
    half = len(dead_png) // 2
    (inbox / "dead.png").write_bytes(dead_png[:half])  # its writer died
    aged(inbox / "dead.png", 60)
    (inbox / "slow.png").write_bytes(slow_png[: len(slow_png) // 2])  # its writer goes on
    monkeypatch.setenv("FCT_INBOX", str(inbox))
    monkeypatch.setenv("FCT_INBOX_SETTLE_S", "30")
    sensor = living.defs.resolve_sensor_def("fct_inbox")
    cursor = None

    def tick() -> list[dg.RunRequest]:
        nonlocal cursor
        context = dg.build_sensor_context(
            instance=living.instance, definitions=living.defs, cursor=cursor
        )
        result = sensor(context)
        cursor = context.cursor
        if isinstance(result, dg.SkipReason):
            return []
        for add in result.dynamic_partitions_requests or []:
            living.instance.add_dynamic_partitions(
                add.partitions_def_name, list(add.partition_keys)
            )
        return list(result.run_requests)

    def run(request: dg.RunRequest):
        config = request.run_config["ops"]["ingested_batch"]["config"]
        result = living.defs.resolve_job_def("ingest").execute_in_process(
            instance=living.instance,
            partition_key=request.partition_key,
            run_config=request.run_config,
        )
        assert result.success
        return sorted(config["files"]), result.asset_value("ingested_batch")

    # Tick 1: slow.png was written just now, so only good.png and dead.png are taken.
    (request,) = tick()
    files, first = run(request)
    assert files == ["dead.png", "good.png"]
    assert first.quarantined == () and [Path(q.file).name for q in first.retrying] == ["dead.png"]
    assert sorted(first.ingested) == [content_id(good)]
    assert (inbox / "dead.png").exists() and not (inbox / "good.png").exists()

    # Its writer finishes slow.png; tick 2 takes it with dead.png's retry.
    with open(inbox / "slow.png", "ab") as writer:
        writer.write(slow_png[len(slow_png) // 2 :])
    aged(inbox / "slow.png", 31)
    (request,) = tick()
    files, second = run(request)
    assert files == ["dead.png", "slow.png"]
    assert sorted(second.ingested) == [content_id(slow)] and second.retrying == ()
    (q,) = second.quarantined
    assert Path(q.file).name == "dead.png" and "\n" not in q.reason
    assert q.reason.startswith("unreadable image (")
    assert q.reason.endswith(f"; the same on a retry, unchanged since batch {first.batch} tried it")
    moved = inbox / ".quarantine" / second.batch / "dead.png"
    assert moved.read_bytes() == dead_png[:half]
    assert (moved.parent / "dead.png.reason.txt").read_text() == q.reason + "\n"
    # slow.png landed whole: its stored image is the picture, once in each table.
    for table in (storage.GALLERY_STORE, "gallery_v2"):
        assert list(rows_of(living, table, [content_id(slow)])) == [content_id(slow)]
    stored = rows_of(living, storage.GALLERY_STORE, [content_id(slow)])[content_id(slow)]
    assert np.array_equal(storage.decode_png(stored["image"], 1), slow)

    # Tick 3: nothing is left in the inbox, and nothing waits for a hand.
    assert tick() == []
    assert [p for p in inbox.iterdir() if not p.name.startswith(".")] == []


# ---------------------------------------------------------------- ingest, rollback and promotion
# These run last, in this order: they promote v3 over what the tests above ingested under v2.


def fct_cli(env, *args: str, wait_s: float) -> subprocess.Popen:
    """`fct ARGS...` in its own process, pointed at the test's instance and storage."""
    return subprocess.Popen(
        [sys.executable, "-m", "fct_assets.cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            **env.environ(),
            "FCT_INGEST_WAIT_S": str(wait_s),
            "PYTHONPATH": str(REPO),
        },
    )


@contextlib.contextmanager
def gallery_store_held(env):
    """gallery_store's lease held by a live process (a `sleep`), released when it is killed."""
    holder = subprocess.Popen(["sleep", "600"])
    reaper = threading.Thread(target=holder.wait)  # reaped: its pid is gone once killed
    reaper.start()
    db = env.fct.connect()
    other = guards.Writer.me(purpose="ingest").model_copy(update={"pid": holder.pid})
    guards.claim(db, "gallery_store", other, ended=guards.process_ended)
    try:
        yield holder
    finally:
        holder.kill()
        reaper.join()
        guards.release(db, "gallery_store", other)


def ingest_run_waiting(env, proc: subprocess.Popen, version: str) -> dg.DagsterRun:
    """The ingest run of `proc` once its step has read the deployment (it logged the model it
    embeds with) and waits for gallery_store's lease."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        for run in env.instance.get_runs(dg.RunsFilter(job_name="ingest")):
            if run.is_finished:
                continue
            logs = [e.user_message for e in env.instance.all_logs(run.run_id)]
            if any(f"embedded by {version} (" in m for m in logs):
                return run
        time.sleep(0.2)
    raise AssertionError("the ingest never started embedding")


def vectors_of(env, table: str, ids, *, version: int | None = None) -> dict[int, np.ndarray]:
    t = env.fct.connect().open_table(table)
    if version is not None:
        t.checkout(version)
    rows = t.to_arrow()
    found = {}
    for item, vector in zip(rows.column("item_id").to_pylist(), rows.column("embedding")):
        if item in set(ids):
            found.setdefault(item, []).append(np.asarray(vector.as_py(), np.float32))
    return found


def embedded_by(env, version: str, images: list[np.ndarray]) -> np.ndarray:
    """What new_model[version] gives for `images` ((C, H, W) uint8 each), computed here."""
    import torch

    from fct_assets.lib.io_managers import load_recorded_checkpoint
    from fct_ml.pipeline import embed

    model = load_recorded_checkpoint(env.instance, "new_model", version)
    batch = torch.from_numpy(np.stack(images))
    return embed(model.model.cpu(), batch, env.fct.experiment()).numpy()


def test_fct_rollback_first_embeds_the_items_ingested_since_with_the_targets_model(
    living, tmp_path, capsys
):
    # Invariant 4: items ingested while v3 served are embedded by v2's model from their stored
    # images before v2 serves again; nothing that was searchable stops being so.
    deploy(living, "v2")
    deploy(living, "v3")
    items = held_back(living, 3, start=60)
    ids = [content_id(image) for image, _ in items]
    folder = tmp_path / "drop"
    for k, (image, _) in enumerate(items):
        write_png(folder / f"c{k}.png", image)
    env = living.environ()
    os.environ.update(env)
    try:
        assert fct_main(["ingest", str(folder), "--json"]) == 0
        capsys.readouterr()
        db = living.fct.connect()
        assert current(db).version == "v3" and not vectors_of(living, "gallery_v2", ids)
        assert fct_main(["rollback", "--json"]) == 0
        row = json.loads(capsys.readouterr().out)
    finally:
        for key in env:
            os.environ.pop(key, None)
    served = current(db)
    assert (served.action, served.version, served.seq) == ("rollback", "v2", row["seq"])
    assert (
        served.note == row["note"] == ("caught up: 3 items of gallery_store embedded by v2's model")
    )
    assert missing_items(db, served.table, served.table_version)[0] == []
    found = vectors_of(living, "gallery_v2", ids, version=served.table_version)
    assert sorted(found) == sorted(ids) and all(len(v) == 1 for v in found.values())
    expected = embedded_by(living, "v2", [image for image, _ in items])
    for item, want in zip(ids, expected):
        np.testing.assert_allclose(found[item][0], want, rtol=1e-5, atol=1e-5)
    rows = rows_of(living, "gallery_v2", ids)
    assert {rows[i]["source"] for i in ids} == {"re-embedded"}
    assert {rows[i]["space_id"] for i in ids} == {served.space_id}


def test_an_ingest_racing_a_rollback_lands_once_in_the_version_served_then(living, tmp_path):
    # Invariant 1: the ingest read v3 as deployed and embedded for it; a rollback to v2 lands
    # before its commit. It embeds again for v2, in the same run: each item once in the table
    # served, none in v3's, the deployment advanced, no hand.
    deploy(living, "v2")
    deploy(living, "v3")
    db = living.fct.connect()
    items = held_back(living, 3, start=70)
    ids = [content_id(image) for image, _ in items]
    folder = tmp_path / "drop"
    for k, (image, _) in enumerate(items):
        write_png(folder / f"r{k}.png", image)
    v3_before = db.open_table("gallery_v3").version
    with gallery_store_held(living):
        proc = fct_cli(living, "ingest", str(folder), "--json", wait_s=300)
        ingest_run_waiting(living, proc, "v3")
        rolled = rollback(db)  # nothing missing in v2: no catch-up, no lease needed
        assert rolled.version == "v2"
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    landed = json.loads(out)
    assert (landed["deployed_version"], landed["added_to_table"]) == ("v2", 3)
    served = current(db)
    assert (served.action, served.version) == ("ingest", "v2")
    held = vectors_of(living, "gallery_v2", ids, version=served.table_version)
    assert sorted(held) == sorted(ids) and all(len(v) == 1 for v in held.values())
    assert rows_of(living, "gallery_store", ids).keys() == set(ids)
    # Nothing went to the table no longer served.
    assert db.open_table("gallery_v3").version == v3_before
    assert missing_items(db, served.table, served.table_version)[0] == []


def test_an_orphaned_ingest_step_whose_run_was_marked_failed_commits_nothing(living, tmp_path):
    # A run whose worker died is marked failed (run_reaper) while its step process goes on: the
    # step must not commit, or the run the UI shows as failed would have landed its batch (and
    # its retry would race the orphan). Here the step waits for a lease while its run is failed.
    db = living.fct.connect()
    items = held_back(living, 2, start=80)
    ids = [content_id(image) for image, _ in items]
    folder = tmp_path / "drop"
    for k, (image, _) in enumerate(items):
        write_png(folder / f"o{k}.png", image)
    before = (db.open_table("gallery_store").version, len(history(db)))
    serving = current(db).version
    with gallery_store_held(living):
        proc = fct_cli(living, "ingest", str(folder), "--json", wait_s=300)
        run = ingest_run_waiting(living, proc, serving)
        living.instance.report_run_failed(run)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, out
    line = err.strip().splitlines()[-1]
    assert f"ingest: run {run.run_id} is FAILURE" in line, line
    assert "nothing committed to gallery_store" in line, line
    assert (db.open_table("gallery_store").version, len(history(db))) == before
    assert not rows_of(living, "gallery_store", ids)
    assert living.instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
