"""Promotion, rollback and search, fast: a real Dagster instance and a real LanceDB folder, with
the materialisations and check evaluations reported to the instance as the assets and checks
report them (no training). tests/fct_assets/test_deployment.py runs the same rules end to end."""

from __future__ import annotations

import datetime as _dt
import random
import time

import dagster as dg
import numpy as np
import pyarrow as pa
import pytest
from dagster._core.events import DagsterEvent, DagsterEventType
from dagster._core.utils import make_new_run_id

from fct_assets.lib import guards, storage
from fct_assets.lib.keys import PROMOTION_CHECKS
from fct_assets.lib.records import BackfilledTable, VersionTable
from fct_assets.serving import deployment, jobs
from fct_assets.serving.deployment import PromotionError, check_results, current, promote, rollback
from tests.support.check_events import report_materialization, report_planned_check

SPACE = "new_model:v2@0123456789ab"


def _table(db, version: str, rows: int = 4, space: str = SPACE, vectors=None) -> int:
    """gallery_<version> with `rows` 2-d vectors (item i at (i, 0), or item i at vectors[i]); its
    LanceDB version."""
    if vectors is None:
        vectors = np.array([[i, 0.0] for i in range(rows)], np.float32)
    rows = len(vectors)
    batch = pa.record_batch(
        [
            pa.array(np.arange(rows, dtype=np.int64)),
            pa.array(np.arange(rows, dtype=np.int32) % 2),
            pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 2),
            pa.array(np.zeros(rows, np.float32)),
            pa.array(["transformed"] * rows),
            pa.array([space] * rows),
        ],
        schema=storage.backfilled_schema(2, space),
    )
    info = storage.publish(db, f"gallery_{version}", storage.backfilled_schema(2, space), [batch])
    return info["version"]


def _append(db, version: str, ids: list[int], space: str = SPACE) -> int:
    """Items `ids` (item i at (i, 0)) appended to gallery_<version>, as an ingest appends them;
    the table's new LanceDB version."""
    n = len(ids)
    rows = pa.table(
        {
            "item_id": pa.array(ids, pa.int64()),
            "label": pa.array(np.zeros(n, np.int32)),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(np.array([[i, 0.0] for i in ids], np.float32).reshape(-1)), 2
            ),
            "sigma": pa.array(np.zeros(n, np.float32)),
            "source": pa.array(["ingested"] * n),
            "space_id": pa.array([space] * n),
        },
        schema=storage.backfilled_schema(2, space),
    )
    return storage.append_rows(db, f"gallery_{version}", rows)


def _materialised(instance, version: str, table_version: int, *, at=None) -> None:
    """backfilled_gallery and eval_report materialised for `version`, at time `at` (default:
    now, as runless reports)."""
    record = BackfilledTable(
        table=f"gallery_{version}",
        version=table_version,
        rows=4,
        space_id=SPACE,
        dim=2,
        reembedded=0,
        reembed_fraction=0.0,
        shards=1,
        backfill_seconds=0.1,
        backfill_items_per_s=40.0,
        gallery_store_version=1,
        gallery_rows=4,
        ann_index="none",
    )
    # The query model the serving contract names (promote reads it; no file is opened).
    checkpoint = {"path": f"checkpoints/new_model/{version}.safetensors", "sha256": "0" * 64}
    events = [
        dg.AssetMaterialization(
            asset_key="new_model", partition=version, metadata={**checkpoint, "space_id": SPACE}
        ),
        dg.AssetMaterialization(
            asset_key="backfilled_gallery", partition=version, metadata=record.model_dump()
        ),
        dg.AssetMaterialization(asset_key="eval_report", partition=version),
    ]
    for event in events:
        if at is None:
            instance.report_runless_asset_event(event)
            continue
        report_materialization(instance, event, at=at)


def _check_evaluation(
    instance, asset: str, check: str, version: str, ok: bool, read: int, *, at=None
) -> str:
    """One evaluation of a blocking check, as a run of its own records it (a runless report
    allows one per check and partition), at time `at` (default: now); its run id."""
    evaluation = dg.AssetCheckEvaluation(
        asset_key=dg.AssetKey(asset),
        check_name=check,
        passed=ok,
        partition=version,
        metadata={"table_version": read},
    )
    instance.report_dagster_event(
        DagsterEvent(
            event_type_value=DagsterEventType.ASSET_CHECK_EVALUATION.value,
            event_specific_data=evaluation,
            job_name="verify",
        ),
        run_id=(run_id := make_new_run_id()),
        timestamp=at,
    )
    return run_id


def _checked(instance, version: str, table_version: int, *, passed=(True, True)) -> None:
    """Every blocking check of promotion evaluated on `table_version`: the table's schema and the
    report's expectations as `passed` says, the gates passed."""
    for key, ok in zip(PROMOTION_CHECKS, (*passed, True, True), strict=True):
        _check_evaluation(
            instance, key.asset_key.to_user_string(), key.name, version, ok, table_version
        )


def _promotable(instance, db, version: str) -> int:
    table_version = _table(db, version)
    _materialised(instance, version, table_version)
    _checked(instance, version, table_version)
    return table_version


def test_passed_checks_promote_the_recorded_table_version(instance, db):
    table_version = _promotable(instance, db, "v2")
    results = check_results(instance, "v2")
    assert {k: (v.passed, v.why, v.table_version) for k, v in results.items()} == {
        "backfilled_gallery:backfilled_gallery_schema": (True, "passed", table_version),
        "eval_report:eval_report_expectations": (True, "passed", table_version),
        "eval_report:negative_flip_gate": (True, "passed", table_version),
        "eval_report:served_map_gate": (True, "passed", table_version),
    }
    row = promote(instance, db, "v2")
    assert {k: getattr(row, k) for k in ("seq", "action", "version", "table", "table_version")} == {
        "seq": 1,
        "action": "promote",
        "version": "v2",
        "table": "gallery_v2",
        "table_version": table_version,
    }
    assert row.space_id == SPACE and current(db) == row
    # `at` is UTC, offset included, and the time of the promotion.
    at = _dt.datetime.fromisoformat(row.at)
    assert at.utcoffset() == _dt.timedelta(0)
    assert abs((_dt.datetime.now(_dt.UTC) - at).total_seconds()) < 60


def test_the_record_is_decided_under_the_deployments_lock(db):
    # Every writer of this machine that takes the deployments table's lock queues behind a
    # promotion that is deciding: a second holder is refused at once (wait_s=0), naming it.
    refused = []

    def choose(rows):
        with pytest.raises(guards.TableBusyError, match="^deployments: still locked by process"):
            with guards.local_lock(db, storage.DEPLOYMENTS, wait_s=0):
                pass
        refused.append(True)
        return VersionTable(version="v2", table="gallery_v2", table_version=3, space_id=SPACE)

    assert deployment.record(db, "promote", choose).seq == 1
    assert refused == [True]
    with guards.local_lock(db, storage.DEPLOYMENTS, wait_s=0):  # released after the commit
        pass


def test_without_the_file_lock_only_the_conditional_commit_decides(db):
    # file_lock=False (an object store's way): record holds no OS lock while it decides, and
    # append passes the option on, so a writer holding the lock does not hold them up.
    taken = []

    def choose(rows):
        with guards.local_lock(db, storage.DEPLOYMENTS, wait_s=0):
            taken.append(True)
        return VersionTable(version="v2", table="gallery_v2", table_version=3, space_id=SPACE)

    assert deployment.record(db, "promote", choose, file_lock=False).seq == 1
    assert taken == [True]
    table = VersionTable(version="v3", table="gallery_v3", table_version=1, space_id=SPACE)
    with guards.local_lock(db, storage.DEPLOYMENTS, wait_s=0):
        assert deployment.append(db, "promote", table, file_lock=False).seq == 2
    assert [row.version for row in deployment.history(db)] == ["v2", "v3"]


def test_never_ran_failed_and_stale_are_told_apart(instance, db):
    assert {k: v.why for k, v in check_results(instance, "v2").items()} == {
        "backfilled_gallery:backfilled_gallery_schema": "never ran",
        "eval_report:eval_report_expectations": "never ran",
        "eval_report:negative_flip_gate": "never ran",
        "eval_report:served_map_gate": "never ran",
    }
    with pytest.raises(PromotionError, match=r"^version v2 not promoted: .*'never ran'"):
        promote(instance, db, "v2")
    table_version = _table(db, "v2")
    _materialised(instance, "v2", table_version)
    _checked(instance, "v2", table_version, passed=(False, True))
    results = check_results(instance, "v2")
    assert results["backfilled_gallery:backfilled_gallery_schema"].why == "failed"
    assert results["eval_report:eval_report_expectations"].why == "passed"
    with pytest.raises(
        PromotionError, match="'backfilled_gallery:backfilled_gallery_schema': 'failed'"
    ):
        promote(instance, db, "v2")
    # Passed again, then re-materialised: both checks are older than their assets' latest.
    _checked(instance, "v2", table_version)
    time.sleep(0.01)  # event timestamps are compared: the materialisation comes strictly later
    _materialised(instance, "v2", table_version)
    results = check_results(instance, "v2")
    assert {v.why for v in results.values()} == {"stale: ran before the latest materialisation"}
    assert not any(v.ran_after_latest_materialization for v in results.values())
    with pytest.raises(PromotionError, match="stale"):
        promote(instance, db, "v2")
    assert current(db) is None


def test_a_check_at_the_time_of_its_materialisation_is_fresh(instance, db):
    # A check evaluated at the very timestamp of the materialisation it checks (a coarse clock)
    # ran after it, not before: fresh. Each result names the run that evaluated the check.
    table_version = _table(db, "v2")
    at = time.time()
    _materialised(instance, "v2", table_version, at=at)
    runs = {
        f"{k.asset_key.to_user_string()}:{k.name}": _check_evaluation(
            instance, k.asset_key.to_user_string(), k.name, "v2", True, table_version, at=at
        )
        for k in PROMOTION_CHECKS
    }
    results = check_results(instance, "v2")
    assert {k: (v.why, v.ran_after_latest_materialization) for k, v in results.items()} == {
        k: ("passed", True) for k in runs
    }
    assert {k: v.run_id for k, v in results.items()} == runs
    assert promote(instance, db, "v2").table_version == table_version


def test_no_guarding_check_promotes_nothing(instance, db):
    # Promotion needs at least one passed blocking check: were no guarded asset to have any,
    # nothing would be promoted, and the refusal says so.
    _promotable(instance, db, "v2")
    results = check_results(instance, "v2", checks=())
    assert results == {}
    with pytest.raises(PromotionError) as refused:
        promote(instance, db, "v2", results=results)
    assert (
        str(refused.value) == "version v2 not promoted: blocking checks not passed (no checks ran)"
    )


def test_the_promoted_table_is_the_versions_own(instance, db):
    # v3 materialised after v2: promoting v2 records v2's table, not the latest materialisation
    # of backfilled_gallery across versions.
    v2 = _promotable(instance, db, "v2")
    v3 = _promotable(instance, db, "v3")
    assert deployment.recorded_table(instance, "v2") == VersionTable(
        version="v2", table="gallery_v2", table_version=v2, space_id=SPACE
    )
    assert deployment.recorded_table(instance, "v3").table_version == v3
    row = promote(instance, db, "v2")
    assert (row.version, row.table, row.table_version) == ("v2", "gallery_v2", v2)


def test_checks_of_another_table_version_do_not_promote(instance, db):
    # Fresh, passed checks that read version `first`, while the latest materialisation
    # published `second`: no check ran on `second`.
    first = _promotable(instance, db, "v2")
    second = _table(db, "v2")
    _materialised(instance, "v2", second)
    _checked(instance, "v2", first)
    assert all(v.passed for v in check_results(instance, "v2").values())
    with pytest.raises(PromotionError) as refused:
        promote(instance, db, "v2")
    assert str(refused.value).endswith(
        f"its latest materialisation published gallery_v2 at version {second}"
    )
    assert f"'backfilled_gallery:backfilled_gallery_schema': {first}" in str(refused.value)
    # One check on `second`, the other still on `first`: refused too.
    _check_evaluation(
        instance, "backfilled_gallery", "backfilled_gallery_schema", "v2", True, second
    )
    with pytest.raises(PromotionError, match="checks ran on table versions"):
        promote(instance, db, "v2")
    _checked(instance, "v2", second)
    assert promote(instance, db, "v2").table_version == second


def test_rollback_serves_the_previous_deployment_again(instance, db):
    with pytest.raises(PromotionError, match="^nothing is deployed: no rollback possible$"):
        rollback(db)
    v2 = _promotable(instance, db, "v2")
    promote(instance, db, "v2")
    with pytest.raises(PromotionError, match="^version v2 is the only one ever deployed"):
        rollback(db)
    v3 = _promotable(instance, db, "v3")
    promote(instance, db, "v3")
    promote(instance, db, "v3")  # promoting the same table twice is not a new deployment
    row = rollback(db)
    assert (row.seq, row.action, row.version, row.table_version) == (
        4,
        "rollback",
        "v2",
        v2,
    )
    assert [(r.seq, r.version, r.table_version) for r in deployment.history(db)] == [
        (1, "v2", v2),
        (2, "v3", v3),
        (3, "v3", v3),
        (4, "v2", v2),
    ]
    assert rollback(db).version == "v3"


def test_search_reads_the_pinned_table_in_its_space(instance, db):
    served = _promotable(instance, db, "v2")
    row = promote(instance, db, "v2")
    _table(db, "v2", rows=6)  # a later write: the deployment still reads its own version
    hits = deployment.search(db, [2.2, 0.0], version=row, k=3)
    assert [h.item_id for h in hits] == [2, 3, 1]
    assert hits[0].distance == pytest.approx(0.2**2, abs=1e-5)
    assert hits[0].label == 0 and hits[0].source == "transformed"
    assert db.open_table("gallery_v2").count_rows() == 6 and served == row.table_version
    with pytest.raises(storage.SpaceMismatchError, match="holds space new_model:v2@0123456789ab"):
        deployment.search(
            db, [0.0, 0.0], version=row.model_copy(update={"space_id": "other@000000000000"})
        )
    # A query of another dimension is refused naming the embedding column and both dimensions.
    with pytest.raises(ValueError, match=r"query dim\(3\) .* column embedding vector dim\(2\)"):
        deployment.search(db, [0.0, 0.0, 0.0], version=row)


def test_search_with_an_ann_index_probes_its_share_of_partitions_and_refines(db):
    # 2,304 items: 9 IVF partitions (256 items each), of which ceil(9 / 8) = 2 are probed. The
    # answer is approximate (some exact neighbours lie in partitions not probed) and re-ranked
    # on the stored vectors (refine), so every distance it returns is the exact one.
    rng = np.random.default_rng(0)
    vectors = rng.uniform(size=(2304, 2)).astype(np.float32)
    _table(db, "v2", vectors=vectors)
    table = db.open_table("gallery_v2")
    params = storage.build_ann_index(table, 2)
    assert (params["num_partitions"], params["nprobes"], params["refine_factor"]) == (9, 2, 10)
    row = VersionTable(
        version="v2", table="gallery_v2", table_version=table.version, space_id=SPACE
    )
    missed = 0
    for query in rng.uniform(size=(20, 2)):
        hits = deployment.search(db, query, version=row, k=100)
        exact = ((vectors - query.astype(np.float32)) ** 2).sum(1)
        found = [h.item_id for h in hits]
        assert [h.distance for h in hits] == pytest.approx(exact[found].tolist(), abs=1e-6)
        missed += len(set(np.argsort(exact)[:100].tolist()) - set(found))
    assert 0 < missed < 2000 * 0.2  # of 20 x 100 exact neighbours: approximate, not random
    assert len(deployment.search(db, [0.5, 0.5], version=row)) == 10  # k = 10 by default


# ---------------------------------------------------------------- ingest runs advance the pin


def test_advance_pins_a_newer_table_version_of_the_deployed_version_only(instance, db):
    with pytest.raises(deployment.DeploymentMovedError) as refused:
        deployment.advance(db, "v2", 1)
    assert str(refused.value) == (
        "ingest: v2 is no longer deployed (nothing is); the items are embedded again for the"
        " deployed version"
    )
    served = _promotable(instance, db, "v2")
    promoted = promote(instance, db, "v2")
    # The same table version: nothing to record.
    assert deployment.advance(db, "v2", served) == promoted
    assert len(deployment.history(db)) == 1
    appended = _append(db, "v2", [7])
    row = deployment.advance(db, "v2", appended)
    assert (row.seq, row.action, row.version, row.table, row.table_version, row.space_id) == (
        2,
        "ingest",
        "v2",
        "gallery_v2",
        appended,
        SPACE,
    )
    assert current(db) == row
    with pytest.raises(
        deployment.DeploymentMovedError, match=r"^ingest: v3 is no longer deployed \(v2 is\)"
    ):
        deployment.advance(db, "v3", appended)


def test_advance_never_serves_a_publish_whose_checks_have_not_passed(instance, db):
    # Invariant 2. A backfill published the served version's table again (`fct catch-up v2` of
    # the served v2) and an ingest appended to it: that table version holds rows no blocking check
    # ran on, so the deployment stays where it is until the new publish's checks passed.
    served = _promotable(instance, db, "v2")
    promote(instance, db, "v2")
    republished = _table(db, "v2", rows=5)
    appended = _append(db, "v2", [9])
    with pytest.raises(deployment.NotServableError) as refused:
        deployment.advance(db, "v2", appended, instance=instance)
    assert str(refused.value) == (
        f"ingest: gallery_v2 version {appended} may not serve v2: gallery_v2 was published again"
        f" after version {served} (which serves), and its blocking checks passed on version"
        f" {served}, not on the new publish"
    )
    with pytest.raises(deployment.NotServableError, match="published again"):
        deployment.advance(db, "v2", appended)  # without the instance: never
    assert current(db).table_version == served
    # The new publish materialised: the checks of the old one are stale, none ran on it yet.
    _materialised(instance, "v2", republished)
    with pytest.raises(deployment.NotServableError, match="checks have not passed on the new"):
        deployment.advance(db, "v2", appended, instance=instance)
    # Its checks passed on it: the appended version is that checked publish plus an append, so
    # the ingest may serve it.
    _checked(instance, "v2", republished)
    row = deployment.advance(db, "v2", appended, instance=instance)
    assert (row.action, row.table_version) == ("ingest", appended)


def test_servable_tells_appends_from_a_new_publish(instance, db):
    served = _promotable(instance, db, "v2")
    row = promote(instance, db, "v2")
    assert deployment.servable(db, row, served) is None
    assert deployment.servable(db, row, _append(db, "v2", [5])) is None
    assert deployment.servable(db, row, _append(db, "v2", [6])) is None
    assert "published again" in deployment.servable(db, row, _table(db, "v2"))


def test_rollback_skips_the_ingest_rows_of_the_current_deployment(instance, db):
    v2 = _promotable(instance, db, "v2")
    promote(instance, db, "v2")
    v2_ingested = _append(db, "v2", [5])
    deployment.advance(db, "v2", v2_ingested)  # an ingest run: v2 now serves v2_ingested
    _promotable(instance, db, "v3")
    promote(instance, db, "v3")
    deployment.advance(db, "v3", _append(db, "v3", [6]))
    deployment.advance(db, "v3", _append(db, "v3", [8]))
    # Back to v2 as it was served last: at the table version its ingest run advanced it to.
    row = rollback(db)
    assert (row.seq, row.action, row.version, row.table_version) == (
        6,
        "rollback",
        "v2",
        v2_ingested,
    )
    assert v2 < v2_ingested


def test_rollback_from_an_ingest_advanced_first_deployment_is_refused(instance, db):
    _promotable(instance, db, "v2")
    promote(instance, db, "v2")
    deployment.advance(db, "v2", _append(db, "v2", [5]))
    with pytest.raises(PromotionError, match="^version v2 is the only one ever deployed"):
        rollback(db)


def test_a_history_that_starts_with_ingest_rows_has_nothing_to_roll_back_to(db):
    # The walk back over the current deployment's ingest rows stops at the first row, without
    # wrapping round to rows[-1]. fct itself never writes an ingest row first (advance needs a
    # deployment), but a table edited by hand could start with v2's: no deployment before v2's.
    for seq, table_version in ((1, 1), (2, 2)):
        row = _row(seq, "v2", action="ingest", table_version=table_version)
        assert guards.insert_if_absent(db, storage.DEPLOYMENTS, row, "seq")
    with pytest.raises(PromotionError, match="^version v2 is the only one ever deployed"):
        rollback(db)
    assert len(deployment.history(db)) == 2


# ---------------------------------------------------------------- items ingested meanwhile


def _store(db, ids: list[int]) -> int:
    schema = storage.gallery_store_schema(2, 2, "old@1", "side@1")
    n = len(ids)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(2 * n, np.float32)), 2)
    batch = pa.record_batch(
        [
            pa.array(np.asarray(ids, np.int64)),
            pa.array(np.zeros(n, np.int32)),
            pa.array([b"png"] * n),
            vectors,
            vectors,
            pa.array(["old@1"] * n),
            pa.array(["side@1"] * n),
        ],
        schema=schema,
    )
    return storage.publish(db, storage.GALLERY_STORE, schema, [batch])["version"]


def test_a_table_missing_stored_items_is_not_promoted(instance, db):
    assert deployment.missing_items(db, "gallery_v2", 1) == ([], None)  # no store: nothing
    table_version = _promotable(instance, db, "v2")  # items 0..3
    store = _store(db, [0, 1, 2, 3, 5, 4])
    assert deployment.missing_items(db, "gallery_v2", table_version) == ([4, 5], store)
    with pytest.raises(PromotionError) as refused:
        promote(instance, db, "v2")
    assert str(refused.value) == (
        f"version v2 not promoted: 2 items of gallery_store (version {store}) are not in"
        f" gallery_v2 at version {table_version} (ingested while it was backfilled); catch up"
        " first: `fct catch-up v2` or the `catch_up` job"
    )
    assert current(db) is None
    _store(db, [0, 1, 2, 3])
    assert promote(instance, db, "v2").table_version == table_version


def test_a_version_promoted_again_serves_its_checked_table_plus_its_ingested_items(instance, db):
    # v2 served, item 4 ingested into it, then v3 promoted: promoting v2 again serves the table
    # its checks passed on plus that append (the same publish), not the checked version without
    # item 4, which promotion would refuse as missing an item of gallery_store.
    _store(db, [0, 1, 2, 3])
    v2 = _promotable(instance, db, "v2")
    promote(instance, db, "v2")
    _store(db, [0, 1, 2, 3, 4])
    ingested = _append(db, "v2", [4])
    deployment.advance(db, "v2", ingested)
    v3 = _table(db, "v3", rows=5)
    _materialised(instance, "v3", v3)
    _checked(instance, "v3", v3)
    promote(instance, db, "v3")
    row = promote(instance, db, "v2")
    assert (row.action, row.version, row.table_version) == ("promote", "v2", ingested)
    assert ingested == v2 + 1


# ---------------------------------------------------------------- rollback never shrinks silently


def _v3_served_with_items_v2_lacks(instance, db) -> tuple[int, int]:
    """v2 then v3 promoted over items 0..3; items 4 and 5 then ingested while v3 serves (into
    gallery_store and gallery_v3, not gallery_v2). (v2's served table version, the store's)"""
    _store(db, [0, 1, 2, 3])
    v2 = _promotable(instance, db, "v2")
    promote(instance, db, "v2")
    _promotable(instance, db, "v3")
    promote(instance, db, "v3")
    store = _store(db, [0, 1, 2, 3, 4, 5])
    deployment.advance(db, "v3", _append(db, "v3", [4, 5]))
    return v2, store


def test_a_rollback_that_would_drop_items_is_refused_with_their_count_unless_forced(instance, db):
    v2, store = _v3_served_with_items_v2_lacks(instance, db)
    before = deployment.history(db)
    with pytest.raises(PromotionError) as refused:
        rollback(db)
    assert str(refused.value) == (
        f"rollback to v2 refused: 2 items of gallery_store (version {store}) are not in"
        f" gallery_v2 at version {v2} and would stop being searchable; no catch-up was given;"
        " `fct rollback --force` serves it without them"
    )
    assert deployment.history(db) == before and current(db).version == "v3"
    row = rollback(db, force=True)
    assert (row.action, row.version, row.table_version) == ("rollback", "v2", v2)
    assert row.note == (
        f"forced: 2 items of gallery_store (version {store}) are not in gallery_v2 at version {v2}"
    )
    assert deployment.history(db)[-1] == row  # the note is in the deployments table


def test_a_rollback_first_brings_the_targets_table_up_to_date(instance, db):
    v2, store = _v3_served_with_items_v2_lacks(instance, db)
    asked = []

    def catch_up(target: VersionTable, missing: list[int]) -> int:
        asked.append((target.version, target.table_version, missing))
        return _append(db, "v2", missing)

    row = rollback(db, catch_up=catch_up)
    assert asked == [("v2", v2, [4, 5])]
    assert (row.version, row.table_version) == ("v2", v2 + 1)
    assert row.note == "caught up: 2 items of gallery_store embedded by v2's model"
    assert deployment.missing_items(db, "gallery_v2", row.table_version) == ([], store)
    assert [h.item_id for h in deployment.search(db, [5.1, 0.0], version=row, k=1)] == [5]
    # Nothing missing the other way: rolling back to v3 serves it as is.
    again = rollback(db, catch_up=catch_up)
    assert (again.version, again.note, len(asked)) == ("v3", "complete", 1)


def test_a_rollback_to_a_table_published_again_cannot_catch_up(instance, db):
    # gallery_v2 was published again after it served (a backfill of v2): appending to its latest
    # version would serve rows no check ran on, so its served version is all a rollback can serve.
    v2, store = _v3_served_with_items_v2_lacks(instance, db)
    _table(db, "v2")

    def catch_up(target: VersionTable, missing: list[int]) -> int:
        raise AssertionError("nothing may be appended")

    with pytest.raises(PromotionError) as refused:
        rollback(db, catch_up=catch_up)
    assert "nothing can be appended to it (published again since)" in str(refused.value)
    assert str(refused.value).startswith("rollback to v2 refused: 2 items of gallery_store")
    row = rollback(db, force=True, catch_up=catch_up)
    assert (row.version, row.table_version) == ("v2", v2)
    assert row.note.startswith("forced: 2 items")


def test_an_ingest_appends_to_a_checked_publish_of_the_served_version_and_serves_it(instance, db):
    # `fct catch-up v2` of the served v2 published its table again and its checks passed; an item
    # then arrives. That publish lacks it, so it may not serve as it is, but the ingest bringing
    # the item may append to it, and the appended version serves.
    _store(db, [0, 1, 2, 3])
    _promotable(instance, db, "v2")
    row = promote(instance, db, "v2")
    republished = _table(db, "v2")
    _materialised(instance, "v2", republished)
    _checked(instance, "v2", republished)
    _store(db, [0, 1, 2, 3, 9])
    assert deployment.servable(db, row, republished, instance=instance).endswith(
        "; its checked publish lacks 1 items of gallery_store"
    )
    assert deployment.servable(db, row, republished, instance=instance, complete=False) is None
    appended = _append(db, "v2", [9])
    served = deployment.advance(db, "v2", appended, instance=instance)
    assert (served.action, served.table_version) == ("ingest", appended)


def test_a_deployments_table_without_the_later_columns_reads_and_gains_them(instance, db):
    # A deployments table an older fct wrote has no `note` nor `by`: it reads (None) and gains the
    # columns, null in its old rows, at the next write.
    later = ("note", "by")
    old_schema = pa.schema([f for f in deployment.DEPLOYMENT_SCHEMA if f.name not in later])
    v2 = _table(db, "v2")
    old_row = {
        "seq": 1,
        "action": "promote",
        "version": "v2",
        "table": "gallery_v2",
        "table_version": v2,
        "space_id": SPACE,
        "at": "2026-01-01T00:00:00+00:00",
    }
    rows = pa.Table.from_pylist([old_row], schema=old_schema)
    assert guards.insert_if_absent(db, storage.DEPLOYMENTS, rows, "seq")
    assert not set(later) & set(db.open_table(storage.DEPLOYMENTS).schema.names)
    assert current(db) == deployment.Deployment(**old_row, note=None, by=None)
    _promotable(instance, db, "v3")
    promote(instance, db, "v3")
    row = rollback(db)
    assert set(later) <= set(db.open_table(storage.DEPLOYMENTS).schema.names)
    assert [(r.seq, r.version, r.note) for r in deployment.history(db)] == [
        (1, "v2", None),
        (2, "v3", None),
        (3, "v2", "complete"),
    ]
    # Who wrote each row: unknown for the old one, this process for the two written here.
    assert [r.by is None for r in deployment.history(db)] == [True, False, False]
    assert row.table_version == v2


# ---------------------------------------------------------------- the record under contention


def _row(seq: int, version: str, action: str = "promote", table_version: int = 1) -> pa.Table:
    row = {
        "seq": seq,
        "action": action,
        "version": version,
        "table": f"gallery_{version}",
        "table_version": table_version,
        "space_id": SPACE,
        "at": "2026-01-01T00:00:00+00:00",
    }
    return pa.Table.from_pylist([row], schema=deployment.DEPLOYMENT_SCHEMA)


def test_a_lost_race_is_decided_again_on_the_new_history(db):
    from fct_assets.lib import guards
    from fct_assets.lib.records import VersionTable

    seen: list[list[str]] = []

    def choose(rows):
        seen.append([r.version for r in rows])
        if len(seen) == 1:  # another writer commits seq 1 between our read and our insert
            assert guards.insert_if_absent(db, storage.DEPLOYMENTS, _row(1, "v9"), "seq")
        return VersionTable(version="v2", table="gallery_v2", table_version=3, space_id=SPACE)

    row = deployment.record(db, "promote", choose)
    assert seen == [[], ["v9"]]
    assert (row.seq, row.version, row.table_version) == (2, "v2", 3)
    assert [r.version for r in deployment.history(db)] == ["v9", "v2"]


def test_a_record_that_keeps_losing_gives_up_saying_so(db):
    from fct_assets.lib import guards
    from fct_assets.lib.records import VersionTable

    calls = []

    def choose(rows):
        calls.append(len(rows))
        assert guards.insert_if_absent(db, storage.DEPLOYMENTS, _row(len(rows) + 1, "v9"), "seq")
        return VersionTable(version="v2", table="gallery_v2", table_version=3, space_id=SPACE)

    with pytest.raises(PromotionError) as refused:
        deployment.record(db, "promote", choose, attempts=2)
    assert str(refused.value) == (
        "promote of v2 not recorded: seq 2 was taken by a concurrent writer 2 times in a row; retry"
    )
    assert calls == [0, 1]


def test_a_lost_race_waits_a_random_share_of_a_doubling_back_off(db):
    # After lost race i the writer waits uniform(0, min(0.5, 0.01 * 2**i)) s: 10 ms doubling,
    # at most 0.5 s. The draws come from a seeded generator, so the waits are known; they are
    # recorded, not slept, to keep the test fast.
    waits: list[float] = []

    def choose(rows):
        assert guards.insert_if_absent(db, storage.DEPLOYMENTS, _row(len(rows) + 1, "v9"), "seq")
        return VersionTable(version="v2", table="gallery_v2", table_version=3, space_id=SPACE)

    with pytest.raises(PromotionError, match="taken by a concurrent writer 8 times"):
        deployment.record(
            db,
            "promote",
            choose,
            attempts=8,
            sleep=waits.append,
            rng=random.Random(20260101),
        )
    draws = random.Random(20260101)
    bounds = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.5, 0.5]
    assert waits == [draws.uniform(0.0, bound) for bound in bounds]


# ---------------------------------------------------------------- the UI's jobs


def _registered(instance, *versions: str) -> None:
    """The versions registered, as `fct add-version` registers them: the jobs' partitions."""
    instance.add_dynamic_partitions("model_version", list(versions))


def test_the_promote_and_rollback_jobs_record_and_report_the_row(instance, db, tmp_path):
    from fct_assets.lib.resources import FctResource

    fct = FctResource(lancedb_uri=str(tmp_path / "lancedb"), preset="tiny", device="cpu")
    v2 = _promotable(instance, db, "v2")
    v3 = _promotable(instance, db, "v3")
    _registered(instance, "v2", "v3", "v4")
    # The version is the run's partition, picked among the registered ones; no config at all.
    for version in ("v2", "v3"):
        result = jobs.promote_job.execute_in_process(
            instance=instance, partition_key=version, resources={"fct": fct}
        )
        assert result.success
    row = result.output_for_node("promote_version")
    assert (row.seq, row.action, row.version, row.table_version) == (2, "promote", "v3", v3)
    assert current(db) == row
    assert row.by == f"run {result.run_id} (job promote)"
    result = jobs.rollback_job.execute_in_process(
        instance=instance, partition_key="v2", resources={"fct": fct}
    )
    assert result.success
    row = result.output_for_node("rollback_deployment")
    assert (row.seq, row.action, row.version, row.table_version) == (3, "rollback", "v2", v2)
    # The output's metadata is the deployment row, for the run page.
    (materialized,) = [
        e
        for e in result.all_node_events
        if e.node_name == "rollback_deployment" and e.is_successful_output
    ]
    metadata = {k: v.value for k, v in materialized.step_output_data.metadata.items()}
    assert metadata == row.model_dump()
    assert row.note == "complete" and metadata["note"] == "complete"
    # A refusal fails the run with its one line as the failure's description (the run page's
    # failure line), not only inside a stack trace.
    refused = jobs.promote_job.execute_in_process(
        instance=instance, partition_key="v4", resources={"fct": fct}, raise_on_error=False
    )
    assert not refused.success
    (failure,) = [e for e in refused.all_node_events if e.is_step_failure]
    assert failure.step_failure_data.user_failure_data.description == (
        "version v4 not promoted: blocking checks not passed ({'backfilled_gallery:"
        "backfilled_gallery_schema': 'never ran', 'eval_report:eval_report_expectations': 'never"
        " ran', 'eval_report:negative_flip_gate': 'never ran', 'eval_report:served_map_gate':"
        " 'never ran'})"
    )


def _failure_line(result) -> str:
    (failure,) = [e for e in result.all_node_events if e.is_step_failure]
    return failure.step_failure_data.user_failure_data.description


def test_a_version_not_registered_or_not_picked_fails_the_job_in_one_line(instance, db, tmp_path):
    from fct_assets.lib.resources import FctResource

    fct = FctResource(lancedb_uri=str(tmp_path / "lancedb"), preset="tiny", device="cpu")
    _promotable(instance, db, "v2")  # promotable, but never registered as a partition
    # A client may launch a run for any partition key (the run's tag, as a GraphQL client sends
    # it); only registered versions are served.
    refused = jobs.promote_job.execute_in_process(
        instance=instance,
        tags={"dagster/partition": "v2"},
        resources={"fct": fct},
        raise_on_error=False,
    )
    assert not refused.success and current(db) is None
    assert _failure_line(refused) == (
        "promote: model version 'v2' is not registered (partition of model_version); nothing was"
        " trained or written. Register it first: `fct add-version v2`"
    )
    # No partition at all (a run submitted without one): refused in one line too.
    unpicked = jobs.rollback_job.execute_in_process(
        instance=instance, resources={"fct": fct}, raise_on_error=False
    )
    assert not unpicked.success
    assert _failure_line(unpicked) == (
        "rollback: no model version picked; launch it for one registered version (the"
        " launchpad's partition)"
    )


def test_the_rollback_job_serves_only_the_deployment_before_the_current_one(instance, db, tmp_path):
    from fct_assets.lib.resources import FctResource

    fct = FctResource(lancedb_uri=str(tmp_path / "lancedb"), preset="tiny", device="cpu")
    for version in ("v2", "v3", "v4"):
        _promotable(instance, db, version)
        promote(instance, db, version)
    _registered(instance, "v2", "v3", "v4")
    # v4 serves, v3 before it: picking v2 is refused (promote serves another version).
    refused = jobs.rollback_job.execute_in_process(
        instance=instance, partition_key="v2", resources={"fct": fct}, raise_on_error=False
    )
    assert not refused.success and current(db).version == "v4"
    assert _failure_line(refused) == (
        "rollback to v2 refused: the deployment before the current one (v4) is v3; a rollback"
        " serves only that one (`fct promote v2` serves another version)"
    )
    done = jobs.rollback_job.execute_in_process(
        instance=instance, partition_key="v3", resources={"fct": fct}
    )
    assert done.success and current(db).version == "v3" and current(db).action == "rollback"


def test_the_rollback_job_refuses_to_drop_items_unless_forced(instance, db, tmp_path):
    from fct_assets.lib.resources import FctResource

    fct = FctResource(lancedb_uri=str(tmp_path / "lancedb"), preset="tiny", device="cpu")
    v2, store = _v3_served_with_items_v2_lacks(instance, db)
    _table(db, "v2")  # published again since: its missing items cannot be added
    _registered(instance, "v2", "v3")
    refused = jobs.rollback_job.execute_in_process(
        instance=instance, partition_key="v2", resources={"fct": fct}, raise_on_error=False
    )
    assert not refused.success
    (failure,) = [e for e in refused.all_node_events if e.is_step_failure]
    assert failure.step_failure_data.user_failure_data.description.startswith(
        f"rollback to v2 refused: 2 items of gallery_store (version {store}) are not in"
        f" gallery_v2 at version {v2}"
    )
    assert current(db).version == "v3"
    forced = jobs.rollback_job.execute_in_process(
        instance=instance,
        partition_key="v2",
        resources={"fct": fct},
        run_config={"ops": {"rollback_deployment": {"config": {"force": True}}}},
    )
    row = forced.output_for_node("rollback_deployment")
    assert (row.version, row.table_version) == ("v2", v2) and row.note.startswith("forced: 2")
    assert current(db) == row
    assert guards.holder(db, "gallery_store") is None  # the rollback's leases are released


def test_a_check_planned_but_never_evaluated_is_reported_by_its_status(instance, db):
    # A run that planned the check and stopped before it ran (a crash, a cancelled run, a
    # backfill refused by another's lease). With no evaluation before it, the execution record
    # has none, and its status says what became of it.
    from fct_assets.lib.partitions import model_version

    def planned() -> None:
        report_planned_check(
            instance, "eval_report", "eval_report_expectations", model_version, "v2"
        )

    table_version = _table(db, "v2")
    _materialised(instance, "v2", table_version)
    _check_evaluation(
        instance, "backfilled_gallery", "backfilled_gallery_schema", "v2", True, table_version
    )
    for gate in ("negative_flip_gate", "served_map_gate"):
        _check_evaluation(instance, "eval_report", gate, "v2", True, table_version)
    planned()
    result = check_results(instance, "v2")["eval_report:eval_report_expectations"]
    assert not result.passed and result.why == "status PLANNED"
    assert result.table_version is None
    assert (
        check_results(instance, "v2")["backfilled_gallery:backfilled_gallery_schema"].table_version
        == table_version
    )
    with pytest.raises(PromotionError, match="'eval_report:eval_report_expectations': 'status "):
        promote(instance, db, "v2")
    # Evaluated (passed) on the current materialisation, then planned again by a run that stopped
    # first: the later planned record does not hide the evaluation, so the version promotes.
    _check_evaluation(
        instance, "eval_report", "eval_report_expectations", "v2", True, table_version
    )
    planned()
    assert check_results(instance, "v2")["eval_report:eval_report_expectations"].why == "passed"
    assert promote(instance, db, "v2").table_version == table_version
