"""The asset graph on a real Dagster instance and real LanceDB folders (tiny preset, digits)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pytest

from fct_assets.cli import main as fct_main
from fct_assets.lib import storage
from fct_assets.lineage.trace import lineage
from fct_assets.serving.deployment import PromotionError, current, promote, rollback
from fct_ml.checkpoint import sha256_file
from tests.support.dagster_internals import stale_status

REPO = Path(__file__).resolve().parents[2]
UPGRADE = ("new_model", "transformation", "backfilled_gallery", "eval_report")
BASE = ("dataset", "old_model", "side_info_model", "gallery_store")


def _materialized(instance: dg.DagsterInstance, run_id: str) -> set[tuple[str, str | None]]:
    """(asset, partition) pairs materialised by one run, read from the event log."""
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
    ).records
    out = set()
    for record in records:
        mat = record.event_log_entry.dagster_event.event_specific_data.materialization
        out.add((mat.asset_key.to_user_string(), mat.partition))
    return out


def _data_version(env, asset: str, partition: str | None = None) -> str:
    record = env.instance.get_latest_data_version_record(
        dg.AssetKey(asset), partition_key=partition
    )
    return record.asset_materialization.tags["dagster/data_version"]


def test_definitions_load_from_workspace():
    # The same loading path as `dagster dev -w workspace.yaml`, in a fresh process.
    done = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_definitions_shape(env):
    graph = env.defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == set(BASE) | set(UPGRADE) | {"ingested_batch", "served_version"}
    assert graph.get(dg.AssetKey("ingested_batch")).partitions_def.name == "ingest_batch"
    for name in UPGRADE:
        assert graph.get(dg.AssetKey(name)).partitions_def.name == "model_version"
    for name in BASE:
        assert graph.get(dg.AssetKey(name)).partitions_def is None
    assert {c.asset_key.to_user_string() for c in graph.asset_check_keys} == {
        "gallery_store",
        "backfilled_gallery",
        "eval_report",
    }
    # What the UI shows of each asset: a description, a kind, owners, an artifact tag, a code
    # version.
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.description and node.owners == ["team:retrieval"] and node.code_version, key
        kind = next(iter(node.kinds))
        assert (
            node.tags["fct/artifact"]
            == {"pytorch": "model", "lancedb": "table", "python": "record"}[kind]
        ), key
    assert {
        k: next(iter(graph.get(dg.AssetKey(k)).kinds))
        for k in ("old_model", "gallery_store", "backfilled_gallery")
    } == {"old_model": "pytorch", "gallery_store": "lancedb", "backfilled_gallery": "lancedb"}
    sensor = env.defs.resolve_sensor_def("fct_upgrade_automation")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert (
        env.defs.resolve_schedule_def("daily_evaluation").default_status
        == dg.DefaultScheduleStatus.RUNNING
    )


def test_full_graph_materialised(env):
    db = env.fct.connect()
    store = db.open_table(storage.GALLERY_STORE)
    gallery_items = json.loads((env.root / "records" / "dataset.json").read_text())["gallery_items"]
    assert store.count_rows() == gallery_items
    table = db.open_table("gallery_v2")
    assert table.count_rows() == gallery_items
    new_record = env.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("new_model"), asset_partitions=["v2"]), limit=1
    ).records[0]
    new_meta = new_record.asset_materialization.metadata
    space = new_meta["space_id"].value
    assert storage.table_space_ids(table) == {"space_id": space}
    assert set(table.to_arrow().column("space_id").to_pylist()) == {space}
    # The UI's column view of the table and the per-epoch training table of a model.
    table_meta = (
        env.instance.fetch_materializations(
            dg.AssetRecordsFilter(
                asset_key=dg.AssetKey("backfilled_gallery"), asset_partitions=["v2"]
            ),
            limit=1,
        )
        .records[0]
        .asset_materialization.metadata
    )
    columns = table_meta["dagster/column_schema"].value.columns
    assert [c.name for c in columns] == table.schema.names and all(c.description for c in columns)
    assert table_meta["dagster/row_count"].value == gallery_items
    history = new_meta["history"].value
    epochs = env.fct.experiment().new_train.epochs
    assert [r.data["epoch"] for r in history.records] == list(range(1, epochs + 1))
    assert new_meta["epochs"].value == epochs
    # Training time is bounded by the wall time of the run that trained the model (RUN_START to
    # RUN_SUCCESS).
    assert new_meta["run_id"].value == new_record.run_id
    stats = env.instance.get_run_stats(new_record.run_id)
    assert 0 < new_meta["train_seconds"].value <= stats.end_time - stats.start_time
    report = json.loads((env.root / "records" / "eval_report" / "v2.json").read_text())
    for case in ("old/old", "new/new", "new/h(old)", "new/old"):
        assert 0 <= report["cases"][case]["mAP"] <= 100
    assert set(report["backfill_auc"]) == {"random", "sigma", "true_error"}


def test_adding_a_version_materialises_exactly_its_four_assets(env):
    # Automation, as the running sensor sees it: one tick before v3 exists, one after. The
    # eager conditions request v3's four assets and nothing else.
    before = dg.evaluate_automation_conditions(defs=env.defs, instance=env.instance)
    env.instance.add_dynamic_partitions("model_version", ["v3"])
    evaluation = dg.evaluate_automation_conditions(
        defs=env.defs, instance=env.instance, cursor=before.cursor
    )
    requested = set()
    for result in evaluation.results:
        for subset_key in result.true_subset.expensively_compute_asset_partitions():
            requested.add((subset_key.asset_key.to_user_string(), subset_key.partition_key))
    assert requested == {(name, "v3") for name in UPGRADE}
    base_runs_before = {
        name: len(env.instance.fetch_materializations(dg.AssetKey(name), limit=100).records)
        for name in BASE
    }
    run = env.upgrade("v3")
    assert run.success
    assert _materialized(env.instance, run.run_id) == {(name, "v3") for name in UPGRADE}
    for name in BASE:
        assert (
            len(env.instance.fetch_materializations(dg.AssetKey(name), limit=100).records)
            == base_runs_before[name]
        )


def test_new_config_makes_downstream_stale_and_upstream_fresh(env):
    assert env.upgrade("v4").success
    before = _data_version(env, "new_model", "v4")
    job = env.defs.resolve_implicit_global_asset_job_def()
    rerun = job.execute_in_process(
        instance=env.instance,
        partition_key="v4",
        asset_selection=[dg.AssetKey("new_model")],
        run_config={"ops": {"new_model": {"config": {"seed": 1}}}},
    )
    assert rerun.success
    assert _data_version(env, "new_model", "v4") != before
    for name in ("transformation", "backfilled_gallery", "eval_report"):
        assert stale_status(env.instance, env.defs, dg.AssetKey(name), "v4") == "STALE", name
    assert stale_status(env.instance, env.defs, dg.AssetKey("new_model"), "v4") == "FRESH"
    assert stale_status(env.instance, env.defs, dg.AssetKey("gallery_store")) == "FRESH"


def test_planted_nan_fails_the_blocking_check_and_blocks_promotion(env):
    assert env.upgrade("v5").success
    db = env.fct.connect()
    table = db.open_table("gallery_v5")
    # Plant a NaN in item 3's vector. LanceDB's add() refuses NaN vectors, but a writer that
    # streams record batches (as a faulty job could) is not checked: overwrite the table so.
    data = table.to_arrow().sort_by("item_id")
    dim = table.schema.field("embedding").type.list_size
    vectors = data.column("embedding").combine_chunks().values.to_numpy(zero_copy_only=False).copy()
    vectors[3 * dim] = np.nan
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors, pa.float32()), dim)
    data = data.set_column(
        data.schema.get_field_index("embedding"), table.schema.field("embedding"), column
    )
    db.create_table(
        "gallery_v5",
        data=pa.RecordBatchReader.from_batches(data.schema, data.to_batches()),
        schema=data.schema,
        mode="overwrite",
        on_bad_vectors="fill",
        fill_value=float("nan"),
    )
    verify = env.defs.resolve_job_def("verify").execute_in_process(
        instance=env.instance, tags={"dagster/partition": "v5"}, raise_on_error=False
    )
    evaluations = {e.check_name: e for e in verify.get_asset_check_evaluations()}
    check = evaluations["backfilled_gallery_schema"]
    assert not check.passed
    assert "all finite" in check.metadata["failed_checks"].value
    # pandera's failure cases, one record per failing cell: the NaN is in the embedding of row 3.
    assert any(
        case["column"] == "embedding" and case["check"] == "all finite" and case["index"] == "3"
        for case in check.metadata["failing_cases"].value
    )
    with pytest.raises(PromotionError, match="backfilled_gallery_schema"):
        promote(env.instance, db, "v5")
    assert current(db) is None or current(db).version != "v5"


def test_lineage_names_every_checkpoint_and_they_match_the_files(env, monkeypatch, capsys):
    db = env.fct.connect()
    promote(env.instance, db, "v2")
    info = lineage(env.instance, "v2")
    files = {
        "old_model": env.root / "checkpoints" / "old_model.safetensors",
        "side_info_model": env.root / "checkpoints" / "side_info_model.safetensors",
        "new_model": env.root / "checkpoints" / "new_model" / "v2.safetensors",
        "transformation": env.root / "checkpoints" / "transformation" / "v2.safetensors",
    }
    for name, path in files.items():
        assert info.checkpoints[name] == sha256_file(path), name
    assert list(info.checkpoints) == list(files)  # graph order
    assert info.table == "gallery_v2"
    assert info.table_version == db.open_table("gallery_v2").version
    assert (
        info.dataset_fingerprint
        == json.loads((env.root / "records" / "dataset.json").read_text())["fingerprint"]
    )
    assert info.space_id.endswith("@" + info.checkpoints["new_model"][:12])
    assert len(info.run_ids) >= 2 and all(info.code_versions)
    assert [hop.version for hop in info.upgrade_chain] == ["old_model", "v2"]
    assert info.upgrade_chain[1].transformation_sha256 == info.checkpoints["transformation"]
    assert set(info.headline) == {
        "new/h(old) top1",
        "new/h(old) mAP",
        "old/old mAP",
        "new/new mAP",
        "gap closed mAP (%)",
        "NFR at f=0 (%)",
        "relative NFR at f=0",
    }
    # The CLI reads the same instance and storage from the environment.
    _cli_env(monkeypatch, env)
    assert fct_main(["lineage", "v2", "--json"]) == 0
    # --json writes the record's fields: the same keys as before they were typed.
    written = json.loads(capsys.readouterr().out)
    assert written["checkpoints"] == info.checkpoints
    assert written["upgrade_chain"][0] == {
        "version": "old_model",
        "space_id": info.upgrade_chain[0].space_id,
        "sha256": info.checkpoints["old_model"],
        "transformation_sha256": None,
    }


def _cli_env(monkeypatch, env) -> None:
    for key, value in env.environ().items():
        monkeypatch.setenv(key, value)


def test_search_finds_a_gallery_image_itself(env, monkeypatch, capsys, tmp_path):
    # Fully re-embedded version: the stored image embeds exactly onto its own row.
    assert env.upgrade(
        "v6", {"ops": {"backfilled_gallery": {"config": {"reembed_fraction": 1.0}}}}
    ).success
    db = env.fct.connect()
    assert set(db.open_table("gallery_v6").to_arrow().column("source").to_pylist()) == {
        "re-embedded"
    }
    _cli_env(monkeypatch, env)
    assert fct_main(["search", "--item-id", "7", "--version", "v6", "-k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    first = out[1].split()
    assert first[1] == "7" and math.isclose(float(first[3]), 0.0, abs_tol=1e-4)
    # The same image from a file.
    row = (
        db.open_table(storage.GALLERY_STORE)
        .search()
        .where("item_id = 7")
        .select(["image"])
        .to_list()[0]
    )
    path = tmp_path / "query.png"
    path.write_bytes(row["image"])
    assert fct_main(["search", "--image", str(path), "--version", "v6", "-k", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[1] == "7"


def test_promote_then_rollback(env):
    env.ensure("vserve")
    db = env.fct.connect()
    promote(env.instance, db, "v2")
    promote(env.instance, db, "vserve")
    assert current(db).version == "vserve"
    row = rollback(db)
    assert row.version == "v2" and current(db).version == "v2"
    assert current(db).table_version == db.open_table("gallery_v2").version


def test_promotion_and_rollback_as_jobs(env):
    # The UI's way: the `promote` and `rollback` jobs launched for a version picked among the
    # registered ones (their partition), without config.
    env.ensure("vserve")
    db = env.fct.connect()
    promote(env.instance, db, "v2")
    promoted = env.defs.resolve_job_def("promote").execute_in_process(
        instance=env.instance, partition_key="vserve"
    )
    assert promoted.success and current(db).version == "vserve"
    assert (
        promoted.output_for_node("promote_version").table_version
        == db.open_table("gallery_vserve").version
    )
    rolled = env.defs.resolve_job_def("rollback").execute_in_process(
        instance=env.instance, partition_key="v2"
    )
    assert rolled.success and current(db).version == "v2"
    # A version no check ever ran on: the job fails with the same one-line reason as the CLI.
    env.instance.add_dynamic_partitions("model_version", ["vunbuilt"])
    refused = env.defs.resolve_job_def("promote").execute_in_process(
        instance=env.instance, partition_key="vunbuilt", raise_on_error=False
    )
    assert not refused.success and current(db).version == "v2"
    failure = next(e for e in refused.all_events if e.is_step_failure)
    assert "version vunbuilt not promoted" in str(failure.event_specific_data.error)


def test_vectors_of_another_space_are_refused(env):
    db = env.fct.connect()
    table = db.open_table("gallery_v2")
    n = table.count_rows()
    rows = table.to_arrow().slice(0, 2)
    foreign = rows.set_column(
        rows.schema.get_field_index("space_id"), "space_id", [["new_model:v9@000000000000"] * 2]
    )
    with pytest.raises(storage.SpaceMismatchError, match="new_model:v9@000000000000"):
        storage.append_rows(db, "gallery_v2", foreign)
    assert env.fct.connect().open_table("gallery_v2").count_rows() == n


def test_tampered_checkpoint_is_refused(env):
    assert env.upgrade("vtamper").success  # its own version: the tampering is not undone
    path = env.root / "checkpoints" / "transformation" / "vtamper.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    job = env.defs.resolve_implicit_global_asset_job_def()
    run = job.execute_in_process(
        instance=env.instance,
        partition_key="vtamper",
        asset_selection=[dg.AssetKey("backfilled_gallery")],
        raise_on_error=False,
    )
    assert not run.success
    failure = next(e for e in run.all_events if e.is_step_failure)
    assert "differs from the recorded" in str(failure.event_specific_data.error)


def test_estimate_uses_the_costs_measured_on_the_versions_runs(env, monkeypatch, capsys):
    from fct_assets.upgrade.estimate import estimate

    e = estimate(env.instance, "v2")
    backfill = json.loads((env.root / "records" / "backfilled_gallery" / "v2.json").read_text())
    report = json.loads((env.root / "records" / "eval_report" / "v2.json").read_text())
    assert (
        e.items == backfill["rows"] and e.transform_items_per_s == backfill["backfill_items_per_s"]
    )
    assert e.reembed_items_per_s == report["reembed_items_per_s"]
    assert e.reembed_seconds == pytest.approx(e.items / e.reembed_items_per_s)
    # The report's sigma curve, priced: fraction f costs f*n/reembed + (1-f)*n/transform (read
    # from the materialisation's metadata, whose figures are rounded to what they mean).
    sigma_curve = report["backfill_curves"]["sigma"]
    assert [p.fraction for p in e.curve] == pytest.approx(sigma_curve["fractions"], rel=1e-3)
    assert [p.mAP for p in e.curve] == pytest.approx(sigma_curve["mAP"], abs=0.005)
    sigma_curve["fractions"] = [p.fraction for p in e.curve]
    assert e.curve[0].seconds == pytest.approx(e.transform_seconds)
    assert e.curve[-1].seconds == pytest.approx(e.reembed_seconds)
    f = sigma_curve["fractions"][1]
    assert e.curve[1].seconds == pytest.approx(
        f * e.items / e.reembed_items_per_s + (1 - f) * e.items / e.transform_items_per_s
    )
    big = estimate(env.instance, "v2", items=10**9)
    assert big.transform_seconds == pytest.approx(10**9 / backfill["backfill_items_per_s"])
    _cli_env(monkeypatch, env)
    assert fct_main(["estimate", "v2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(e.as_json()))
    assert [p["fraction"] for p in printed["curve"]] == sigma_curve["fractions"]
    assert fct_main(["estimate", "v2", "--items", "1000000000"]) == 0
    out = capsys.readouterr().out
    assert "1,000,000,000 items" in out and "full re-embedding" in out
    assert f"({len(sigma_curve['fractions'])} points)" in out
