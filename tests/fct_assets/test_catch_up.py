"""`fct catch-up` where promotion tells users to run it: v2 promoted, v3 promoted, labelled
items ingested under v3, then v2 promoted again. Promotion refuses ("catch up first"); the
catch-up embeds the items v2's h cannot map (they have no old embedding) from their
stored images with v2's new model, and v2 is then promoted with every item, searchable."""

import numpy as np
import pytest
import torch

from fct_assets.ingest.ingest import content_id
from fct_assets.lib import storage
from fct_assets.lib.io_managers import load_recorded_checkpoint
from fct_assets.serving.deployment import PromotionError, current, promote
from fct_assets.serving.search import search_command
from fct_ml.augment import to_float
from fct_ml.training import encode
from tests.fct_assets.test_ingest import deploy, held_back, run_ingest, write_png


def test_catch_up_of_an_earlier_version_after_a_later_promotion(living, tmp_path):
    deploy(living, "v2")
    # v3's h from the old model: the later version's kind does not matter here, and the tiny
    # preset's chained h can fall short of the metric gate that promotion requires.
    v3 = living.upgrade("v3", {"ops": {"transformation": {"config": {"source": "old"}}}})
    assert v3.success
    promote(living.instance, living.fct.connect(), "v3")
    items = held_back(living, 4, start=60)
    files = [str(write_png(tmp_path / f"i{k}.png", image)) for k, (image, _) in enumerate(items)]
    assert run_ingest(living, "bunderv3", {"files": files, "label": "3"}).success
    ingested = sorted(content_id(image) for image, _ in items)

    db = living.fct.connect()
    with pytest.raises(PromotionError) as err:
        promote(living.instance, db, "v2")
    assert f"{len(ingested)} items of gallery_store" in str(err.value)
    assert "catch up first: `fct catch-up v2`" in str(err.value)
    store = db.open_table(storage.GALLERY_STORE).to_arrow()
    rows = {r["item_id"]: r for r in store.to_pylist()}
    assert all(rows[i]["old_embedding"] is None for i in ingested)  # nothing for h2 to map

    result = living.defs.resolve_job_def("catch_up").execute_in_process(
        instance=living.instance, partition_key="v2", raise_on_error=False
    )
    failures = [e.event_specific_data.error for e in result.all_events if e.is_step_failure]
    assert result.success, [(f.cause or f).message for f in failures]
    row = promote(living.instance, db, "v2")
    assert current(db).version == "v2"

    table = storage.open_pinned(db, row.table, row.table_version).to_arrow()
    served = {r["item_id"]: r for r in table.to_pylist()}
    assert sorted(served) == sorted(rows) and table.num_rows == len(rows)  # every item, once
    new_model = load_recorded_checkpoint(living.instance, "new_model", "v2")
    images = np.stack([storage.decode_png(rows[i]["image"], 1) for i in ingested])
    expected = encode(new_model.model, [torch.from_numpy(images)], transform=to_float).numpy()
    for k, i in enumerate(ingested):
        assert served[i]["source"] == "re-embedded" and served[i]["label"] == 3
        assert served[i]["space_id"] == row.space_id == served[i]["chain"]
        np.testing.assert_allclose(served[i]["embedding"], expected[k], rtol=1e-4, atol=1e-4)
    # Searchable in v2: queried by its stored image, an ingested item finds itself first.
    hits = search_command(
        living.instance, living.fct, image=None, item_id=ingested[0], version=None, k=3
    )
    assert hits[0].item_id == ingested[0] and hits[0].distance < 1e-3
