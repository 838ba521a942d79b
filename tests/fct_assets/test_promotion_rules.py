"""Promotion, rollback and search, fast: a real Dagster instance and a real LanceDB folder, with
the materialisations and check evaluations reported to the instance as the assets and checks
report them (no training). tests/fct_assets/test_deployment.py runs the same rules end to end."""

from __future__ import annotations

import datetime as _dt
import random
import time

import dagster as dg
import lancedb
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


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "dagster_home").mkdir()
    with dg.DagsterInstance.local_temp(
        str(tmp_path / "dagster_home"), overrides={"telemetry": {"enabled": False}}
    ) as inst:
        yield inst


@pytest.fixture
def db(tmp_path):
    return lancedb.connect(str(tmp_path / "lancedb"))


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
    events = [
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
    with pytest.raises(PromotionError) as refused:
        deployment.advance(db, "v2", 1)
    assert str(refused.value) == (
        "ingest: v2 is no longer deployed (nothing is); retry the run to embed the items with the"
        " deployed model"
    )
    served = _promotable(instance, db, "v2")
    promoted = promote(instance, db, "v2")
    # The same table version: nothing to record.
    assert deployment.advance(db, "v2", served) == promoted
    assert len(deployment.history(db)) == 1
    row = deployment.advance(db, "v2", served + 1)
    assert (row.seq, row.action, row.version, row.table, row.table_version, row.space_id) == (
        2,
        "ingest",
        "v2",
        "gallery_v2",
        served + 1,
        SPACE,
    )
    assert current(db) == row
    with pytest.raises(PromotionError, match=r"^ingest: v3 is no longer deployed \(v2 is\)"):
        deployment.advance(db, "v3", served + 2)


def test_rollback_skips_the_ingest_rows_of_the_current_deployment(instance, db):
    v2 = _promotable(instance, db, "v2")
    promote(instance, db, "v2")
    deployment.advance(db, "v2", v2 + 5)  # an ingest run: v2 now serves v2 + 5
    v3 = _promotable(instance, db, "v3")
    promote(instance, db, "v3")
    deployment.advance(db, "v3", v3 + 1)
    deployment.advance(db, "v3", v3 + 2)
    # Back to v2 as it was served last: at the table version its ingest run advanced it to.
    row = rollback(db)
    assert (row.seq, row.action, row.version, row.table_version) == (6, "rollback", "v2", v2 + 5)


def test_rollback_from_an_ingest_advanced_first_deployment_is_refused(instance, db):
    v2 = _promotable(instance, db, "v2")
    promote(instance, db, "v2")
    deployment.advance(db, "v2", v2 + 1)
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


def test_the_promote_and_rollback_jobs_record_and_report_the_row(instance, db, tmp_path):
    from fct_assets.lib.resources import FctResource

    fct = FctResource(lancedb_uri=str(tmp_path / "lancedb"), preset="tiny", device="cpu")
    v2 = _promotable(instance, db, "v2")
    v3 = _promotable(instance, db, "v3")
    for version in ("v2", "v3"):
        result = jobs.promote_job.execute_in_process(
            instance=instance,
            run_config={"ops": {"promote_version": {"config": {"version": version}}}},
            resources={"fct": fct},
        )
        assert result.success
    row = result.output_for_node("promote_version")
    assert (row.seq, row.action, row.version, row.table_version) == (2, "promote", "v3", v3)
    assert current(db) == row
    result = jobs.rollback_job.execute_in_process(instance=instance, resources={"fct": fct})
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
    refused = jobs.promote_job.execute_in_process(
        instance=instance,
        run_config={"ops": {"promote_version": {"config": {"version": "v4"}}}},
        resources={"fct": fct},
        raise_on_error=False,
    )
    assert not refused.success


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
