"""The serving contract on real LanceDB tables and a real checkpoint: written at every deployment
change, read without Dagster, refused with one line when it cannot be served; and, on the tiny
asset graph, a searcher built from it alone answers as `fct search` did."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from fct_assets.cli import main as fct_main
from fct_assets.lib import records, storage
from fct_assets.serving import contract, deployment
from fct_assets.serving.contract import ContractError
from tests.support.served import ITEMS, Served

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def served(tmp_path) -> Served:
    s = Served(tmp_path)
    s.promote("v2")
    return s


def _nearest(vectors: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    """Item ids (= row indices) by squared L2 distance, by hand."""
    return [int(i) for i in np.argsort(((vectors - query) ** 2).sum(axis=1), kind="stable")[:k]]


def test_the_contract_names_what_serving_needs(served):
    written = contract.read(served.uri)
    v2 = served.tables["v2"]
    assert written.seq == 1 and written.action == "promote" and written.version == "v2"
    assert written.table_uri == f"{served.uri}/gallery_v2.lance"
    assert (written.table, written.table_version) == ("gallery_v2", v2.table_version)
    assert written.space_id == v2.space_id and written.metric == "l2"
    assert (written.nprobes, written.refine_factor) == (None, None)  # no index: exact search
    assert (written.image_channels, written.image_height, written.image_width) == (1, 8, 8)
    checkpoint = Path(served.checkpoints["v2"].path)
    assert written.model == records.QueryModel(
        path=str(checkpoint),
        sha256=hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
        space_id=v2.space_id,
    )
    on_disk = json.loads((Path(served.uri) / "serving_contract.json").read_text())
    assert (
        on_disk["table_version"] == v2.table_version and on_disk["fct_record"] == "ServingContract"
    )
    # The file sits beside the tables without being one.
    assert "serving_contract" not in " ".join(served.db.list_tables().tables)


def test_a_searcher_from_the_contract_alone_answers_and_loads_no_dagster(served):
    # A fresh interpreter: nothing this test process imported counts.
    code = (
        "import json, sys\n"
        "from fct_assets.serving.contract import open_searcher\n"
        f"searcher = open_searcher({served.uri!r})\n"
        "hits = searcher.search(searcher.stored_image(3), k=4)\n"
        "print(json.dumps({'ids': [h.item_id for h in hits], 'distance': hits[0].distance,"
        " 'loaded': sorted(m for m in ('dagster', 'fct_assets.lib.storage', 'torch', 'lancedb')"
        " if m in sys.modules)}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["loaded"] == ["lancedb", "torch"]  # and neither Dagster nor storage
    vectors = served.embed("v2", served.images)
    assert answer["ids"] == _nearest(vectors, vectors[3], 4)
    assert answer["ids"][0] == 3 and answer["distance"] == pytest.approx(0.0, abs=1e-6)


def test_an_image_file_a_stored_image_and_a_vector_give_the_same_answer(served, tmp_path):
    searcher = contract.open_searcher(served.uri)
    path = tmp_path / "query.png"
    path.write_bytes(storage.encode_png(served.images[5]))
    vectors = served.embed("v2", served.images)
    expected = _nearest(vectors, vectors[5], 3)
    by_file = searcher.search(str(path), k=3)
    by_image = searcher.search(searcher.stored_image(5), k=3)
    by_vector = searcher.search(vectors[5], k=3)
    assert [h.item_id for h in by_file] == [h.item_id for h in by_image] == expected
    assert [h.item_id for h in by_vector] == expected
    # The distances are LanceDB's squared L2, by hand.
    assert by_vector[1].distance == pytest.approx(((vectors[expected[1]] - vectors[5]) ** 2).sum())
    with pytest.raises(ContractError, match=r"a \(8,\) vector .* got an array of shape \(3,\)"):
        searcher.search(np.zeros(3, np.float32))
    with pytest.raises(LookupError, match="item_id 99: not in gallery_store"):
        searcher.stored_image(99)


def test_a_query_file_is_held_to_ingests_limits_and_conversions(served, tmp_path):
    # The contract's searcher reads query files through lib/images, as ingest does: a 16-bit
    # PNG keeps its levels (v * 255 / 65535), and a picture above ingest's 40 MP is refused
    # from its header with one line naming the file.
    from PIL import Image

    searcher = contract.open_searcher(served.uri)
    h, w = served.images.shape[2:]
    deep = np.full((h, w), 32896, dtype=np.uint16)  # 128 * 257 -> 128
    deep[0, 0] = 0
    path = tmp_path / "deep.png"
    Image.fromarray(deep).save(path)
    expected = np.full((1, h, w), 128, np.uint8)
    expected[0, 0, 0] = 0
    assert np.array_equal(searcher.image_file(path), expected)
    wide = tmp_path / "wide.png"
    Image.new("L", (8_000, 6_000)).save(wide)
    with pytest.raises(ValueError, match=r"wide\.png: 8000x6000 pixels, more than 40,000,000$"):
        searcher.search(str(wide))


def test_the_stored_images_decode_as_storage_decodes_them():
    rng = np.random.default_rng(1)
    for image in (
        rng.integers(0, 256, (1, 5, 7), np.uint8),
        rng.integers(0, 256, (3, 5, 7), np.uint8),
    ):
        blob = storage.encode_png(image)
        decoded = contract.decode_png(blob, image.shape[0])
        assert np.array_equal(decoded, storage.decode_png(blob, image.shape[0]))
        assert np.array_equal(decoded, image)
    assert (contract.DEPLOYMENTS, contract.GALLERY_STORE) == (
        storage.DEPLOYMENTS,
        storage.GALLERY_STORE,
    )


def test_a_checkpoint_whose_sha256_differs_is_refused_with_one_line(served, monkeypatch, capsys):
    checkpoint = Path(served.checkpoints["v2"].path)
    expected = served.checkpoints["v2"].sha256
    blob = bytearray(checkpoint.read_bytes())
    blob[-1] ^= 0xFF  # one weight's last byte
    checkpoint.write_bytes(bytes(blob))
    actual = hashlib.sha256(bytes(blob)).hexdigest()
    with pytest.raises(ContractError) as refused:
        contract.open_searcher(served.uri)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{checkpoint}: sha256 {actual} differs from {expected}")
    # The same refusal through `fct search`: exit 1, that one line.
    monkeypatch.setenv("FCT_LANCEDB_URI", served.uri)
    assert fct_main(["search", "--item-id", "3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fct: error: {checkpoint}: sha256 {actual}")


def test_rollback_and_ingest_rows_rewrite_the_contract(served):
    v2_model = contract.read(served.uri).model
    served.promote("v3")
    assert contract.read(served.uri).version == "v3"
    v3 = contract.open_searcher(served.uri)
    assert v3.search(v3.stored_image(2), k=1)[0].item_id == 2

    # A rollback: v2 again, with the query model the v2 contract named.
    row = deployment.rollback(served.db)
    back = contract.read(served.uri)
    assert (back.seq, back.action, back.version) == (row.seq, "rollback", "v2")
    assert back.model == v2_model and back.model.sha256 == served.checkpoints["v2"].sha256
    assert {m.space_id for m in back.models} == {t.space_id for t in served.tables.values()}

    # An ingest appends an item to the served table and advances the deployment: the contract
    # pins the new table version, and a searcher finds the new item.
    image = np.full((1, 1, 8, 8), 200, np.uint8)
    vector = served.embed("v2", image)
    table = served.db.open_table("gallery_v2")
    table.add(pa.Table.from_batches([served.rows([ITEMS], vector, back.space_id)]))
    row = deployment.advance(served.db, "v2", table.version)
    ingested = contract.read(served.uri)
    assert (ingested.seq, ingested.action, ingested.table_version) == (
        row.seq,
        "ingest",
        table.version,
    )
    searcher = contract.open_searcher(served.uri)
    assert searcher.search(vector[0], k=1)[0].item_id == ITEMS
    # The searcher opened before the ingest still reads its own pinned version.
    assert v3.contract.version == "v3" and v3.table.count_rows() == ITEMS


def test_a_row_without_its_contract_is_refused_as_stale(served):
    deployment.append(served.db, "promote", served.tables["v3"])  # no contract written
    with pytest.raises(ContractError, match="stale: it describes deployment 1, the deployments"):
        contract.open_searcher(served.uri)


def test_a_row_whose_query_model_is_unknown_is_refused(served):
    # v3 was never promoted with its checkpoint: the contract knows no model of its space.
    row = deployment.append(served.db, "promote", served.tables["v3"])
    contract.write(served.db, row)
    assert contract.read(served.uri).model is None
    with pytest.raises(ContractError, match="no query model is recorded for v3's space"):
        contract.open_searcher(served.uri)


def test_a_writer_that_finishes_last_keeps_the_later_rows_contract(served):
    first = deployment.history(served.db)[-1]
    later = served.promote("v3")
    kept = contract.write(served.db, first)
    assert kept.seq == later.seq and contract.read(served.uri).version == "v3"


def test_no_contract_is_one_line(tmp_path):
    with pytest.raises(ContractError, match="serving_contract.json: no serving contract"):
        contract.open_searcher(str(tmp_path / "lancedb"))


def test_a_searcher_from_the_contract_answers_as_fct_search_did(env, monkeypatch, capsys):
    # After a promotion on the tiny graph: the pre-contract path (the version's recorded table
    # and checkpoint, through the Dagster instance) and the contract give the same hits.
    from fct_assets.serving.search import search_command

    env.ensure("vcontract")
    db = env.fct.connect()
    row = deployment.promote(env.instance, db, "vcontract")
    searcher = contract.open_searcher(env.fct.lancedb_uri)
    assert (searcher.contract.seq, searcher.contract.table_version) == (row.seq, row.table_version)
    for item in (3, 17):
        before = search_command(
            env.instance, env.fct, image=None, item_id=item, version="vcontract", k=10
        )
        assert searcher.search(searcher.stored_image(item), k=10) == before
    # `fct search` without --version goes through the contract, and prints the same hits.
    for key, value in env.environ().items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    assert fct_main(["search", "--item-id", "17", "-k", "10", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == [h.model_dump() for h in before]
