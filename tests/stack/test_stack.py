"""The production storage on one machine (deploy/local_stack.py): Dagster's runs and events in a
private Postgres cluster, LanceDB tables and checkpoints on moto's S3 server. One upgrade on the
tiny preset, read back as a user would; the S3 endpoint going down during a publish and wrong
credentials, each a one-line error naming the endpoint with nothing published.

The long version (multiprocess executor, promotion, schedule, a Postgres restart mid-upgrade) is
`make stack-check`. Skipped only where Postgres is not installed (`make test` installs it)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import dagster as dg
import lancedb
import numpy as np
import pyarrow as pa
import pytest

from deploy.local_stack import LocalStack, Relay, postgres_missing_reason
from fct_assets.definitions import build_defs
from fct_assets.lib import storage
from fct_assets.lib.event_log import recorded_metadata
from fct_assets.lib.io_managers import store_path
from fct_assets.lib.partitions import add_model_version
from fct_assets.lib.resources import FctResource, lancedb_storage_options
from fct_assets.lineage.trace import lineage

pytestmark = pytest.mark.skipif(
    postgres_missing_reason() is not None, reason=postgres_missing_reason() or ""
)

DATASET_CONFIG = {"ops": {"dataset": {"config": {"dataset": "digits", "old_classes": "0-4"}}}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The servers, and this process's environment pointed at them, for this module only."""
    with pytest.MonkeyPatch.context() as mp, LocalStack(tmp_path_factory.mktemp("stack")) as s:
        for key, value in s.environ().items():
            mp.setenv(key, value)
        yield s
    assert not any(_alive(pid) for pid in (s.postgres.proc.pid, s.s3.proc.pid))  # stopped by PID


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()


def test_the_servers_are_stopped_by_pid_when_a_step_fails(tmp_path):
    with pytest.raises(RuntimeError, match="a step failed"):
        with LocalStack(tmp_path) as s:
            pids = [s.postgres.proc.pid, s.s3.proc.pid]
            assert all(_alive(pid) for pid in pids)
            raise RuntimeError("a step failed")
    assert not any(_alive(pid) for pid in pids)


@pytest.fixture(scope="module")
def upgraded(stack):
    """Base assets and v2 (2 shards: staging tables on S3, one publish) on the stack's instance."""
    instance = dg.DagsterInstance.get()  # DAGSTER_HOME/dagster.yaml: Postgres
    defs = build_defs()
    assert (
        defs.resolve_job_def("base")
        .execute_in_process(instance=instance, run_config=DATASET_CONFIG)
        .success
    )
    add_model_version(instance, "v2")
    config = {"ops": {"backfilled_gallery": {"config": {"shards": 2}}}}
    result = defs.resolve_job_def("upgrade").execute_in_process(
        instance=instance, partition_key="v2", run_config=config
    )
    assert result.success
    return instance


def _fresh_db(uri: str):
    return lancedb.connect(uri, storage_options=lancedb_storage_options(uri))


@pytest.mark.slow
def test_an_upgrade_on_postgres_and_s3_reads_back_as_a_user_would(stack, upgraded):
    instance = upgraded
    for part in (instance.run_storage, instance.event_log_storage, instance.schedule_storage):
        assert type(part).__module__.startswith("dagster_postgres"), type(part)

    # The version's table, through a new connection to the bucket: every stored item once.
    db = _fresh_db(stack.lancedb_uri)
    store = db.open_table(storage.GALLERY_STORE).to_arrow().sort_by("item_id")
    table = db.open_table("gallery_v2").to_arrow().sort_by("item_id")
    assert table.num_rows == store.num_rows > 0
    assert table.column("item_id").to_pylist() == store.column("item_id").to_pylist()
    assert not [n for n in db.list_tables().tables if n.startswith("_staging_")]

    # Each checkpoint as stored in the bucket (read with boto3, not fct) hashes to the sha256 its
    # materialisation recorded in Postgres.
    s3 = stack.s3.client()
    for asset, partition in [("old_model", None), ("new_model", "v2"), ("transformation", "v2")]:
        meta = recorded_metadata(instance, dg.AssetKey(asset), partition)
        assert str(meta["path"]).startswith("s3://fct-bucket/fct/checkpoints/")
        bucket, _, key = str(meta["path"]).removeprefix("s3://").partition("/")
        blob = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert hashlib.sha256(blob).hexdigest() == meta["sha256"], asset

    info = lineage(instance, "v2")
    assert info.table == "gallery_v2" and all(info.checkpoints.values())
    assert info.table_version == db.open_table("gallery_v2").version


@pytest.mark.slow
def test_promote_and_search_through_the_cli_on_the_stack(stack, upgraded, capsys):
    from fct_assets.cli import main

    assert main(["promote", "v2", "--json"]) == 0
    promoted = json.loads(capsys.readouterr().out)  # a JSON object, not a record's str()
    assert (promoted["version"], promoted["table"]) == ("v2", "gallery_v2")
    store = _fresh_db(stack.lancedb_uri).open_table(storage.GALLERY_STORE).to_arrow()
    item = store.column("item_id")[3].as_py()
    assert main(["search", "--item-id", str(item), "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and set(hits[0]) >= {"item_id", "distance", "source"}
    assert {h["item_id"] for h in hits} <= set(store.column("item_id").to_pylist())


def _rows(n: int, space: str, start: int = 0) -> pa.RecordBatch:
    """n rows of a backfilled table (2-d vectors) in `space`."""
    return pa.RecordBatch.from_pydict(
        {
            "item_id": np.arange(start, start + n, dtype=np.int64),
            "label": np.zeros(n, np.int32),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(2 * n, np.float32)), 2),
            "sigma": np.zeros(n, np.float32),
            "source": ["transformed"] * n,
            "space_id": [space] * n,
        },
        schema=storage.backfilled_schema(2, space),
    )


def test_endpoint_down_during_publish_publishes_nothing_and_names_it(stack, monkeypatch):
    # A relay in front of moto: taken down mid-publish, clients get connection refused, and
    # moto (behind it) keeps the bucket's state to check afterwards.
    relay = Relay(stack.s3.port)
    relay.up()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", relay.endpoint)
        uri = "s3://fct-bucket/faults"
        db = FctResource(lancedb_uri=uri).connect()
        schema = storage.backfilled_schema(2, "new@1")
        first = storage.publish(db, "gallery_v9", schema, [_rows(4, "new@1")])
        assert first["rows"] == 4

        def batches():
            yield _rows(4, "new@1")
            relay.down()
            yield _rows(4, "new@1", start=4)

        with pytest.raises(OSError) as err:
            storage.publish(db, "gallery_v9", schema, batches())
        message = str(err.value)
        assert "\n" not in message and relay.endpoint in message and "unreachable" in message
        assert "s3://fct-bucket/faults/gallery_v9" in message

        # A first publish of a table that the endpoint drops: no table afterwards.
        def first_batches():
            yield _rows(2, "new@1")
            relay.down()
            yield _rows(2, "new@1", start=2)

        relay.up()
        with pytest.raises(OSError, match="unreachable"):
            storage.publish(db, "gallery_v10", schema, first_batches())
        relay.up()
    finally:
        relay.down()
    # Straight to moto: the published version is the first one, whole; the failed ones left none.
    monkeypatch.setenv("AWS_ENDPOINT_URL", stack.s3.endpoint)
    fresh = _fresh_db("s3://fct-bucket/faults")
    table = fresh.open_table("gallery_v9")
    assert (table.version, table.count_rows()) == (first["version"], 4)
    assert not storage.table_exists(fresh, "gallery_v10")


def test_wrong_credentials_are_a_one_line_error_naming_the_endpoint(stack, monkeypatch, capsys):
    from fct_assets.cli import main

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(OSError) as err:
        FctResource(lancedb_uri="s3://fct-bucket/lancedb").connect()
    message = str(err.value)
    assert "\n" not in message and stack.s3.endpoint in message
    assert "refused the credentials" in message

    # A checkpoint write through the IO managers' path (s3fs): the same one line, no object.
    path = store_path("s3://fct-bucket/fct/checkpoints/wrong.safetensors")
    from fct_assets.lib.io_managers import write_atomically

    with pytest.raises(OSError) as err:
        write_atomically(path, b"weights")
    message = str(err.value)
    assert "\n" not in message and stack.s3.endpoint in message
    assert "refused the credentials" in message
    keys = stack.s3.client().list_objects_v2(Bucket="fct-bucket", Prefix="fct/checkpoints/wrong")
    assert keys.get("KeyCount", 0) == 0

    # What a user of the CLI sees: exit 1 and that line.
    assert main(["rollback"]) == 1
    line = capsys.readouterr().err.strip()
    assert line.count("\n") == 0 and line.startswith("fct: error: cannot open LanceDB")
    assert "refused the credentials" in line
