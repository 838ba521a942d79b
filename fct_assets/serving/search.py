"""`fct search`: embed a query image with a version's new model and search that version's table.

A query file is held to ingest's limits and converted as an arriving item is
(fct_assets/lib/images.py): a file above 64 MiB is not read, an image above 40 MP is refused from
its header before any pixel is decoded."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np

from fct_assets.lib import storage
from fct_assets.lib.images import decode_image, read_image_file
from fct_assets.lib.io_managers import load_recorded_checkpoint
from fct_assets.lib.keys import NEW_MODEL
from fct_assets.lib.records import Hit, VersionTable
from fct_assets.serving.deployment import current, recorded_table, search


def _served(instance: dg.DagsterInstance, db, version: str | None) -> VersionTable:

    if version is None:
        deployed = current(db)
        if deployed is None:
            raise LookupError("no version is deployed: pass --version or run `fct promote VERSION`")
        return deployed
    return recorded_table(instance, version)


def _query_image(db, *, image: str | None, item_id: int | None, channels: int) -> np.ndarray:
    """(C, H, W) uint8: a gallery item's stored image, or an image file decoded as an arriving
    item is (the same limits and conversions, resized to the gallery's size); a file that is
    refused raises ValueError naming it."""
    store = db.open_table(storage.GALLERY_STORE)
    if item_id is not None:
        rows = (
            store.search().where(f"item_id = {int(item_id)}").select(["image"]).limit(1).to_list()
        )
        if not rows:
            raise LookupError(f"item_id {item_id}: not in gallery_store")
        return storage.decode_png(rows[0]["image"], channels)

    first = store.search().select(["image"]).limit(1).to_list()[0]["image"]
    _, h, w = storage.decode_png(first, channels).shape
    try:
        return decode_image(read_image_file(Path(image)), channels, (h, w))
    except OSError as err:
        raise ValueError(f"{image}: cannot read ({err.strerror or type(err).__name__})") from None
    except ValueError as err:
        raise ValueError(f"{image}: {err}") from None


def search_command(
    instance: dg.DagsterInstance,
    fct,
    *,
    image: str | None,
    item_id: int | None,
    version: str | None,
    k: int = 10,
) -> list[Hit]:
    """The k nearest gallery items to the query, in the version's (or the deployed) table."""
    # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
    import torch

    from fct_ml.augment import to_float
    from fct_ml.training import encode

    db = fct.connect()
    served = _served(instance, db, version)
    new_model = load_recorded_checkpoint(instance, NEW_MODEL, served.version)
    model = new_model.model
    if new_model.space_id != served.space_id:
        raise storage.SpaceMismatchError(
            f"{served.table} holds space {served.space_id}, but"
            f" new_model[{served.version}] is now {new_model.space_id}; re-materialise the"
            " version's backfilled_gallery"
        )
    x = torch.tensor(  # a copy: the decoded image is a read-only array
        _query_image(db, image=image, item_id=item_id, channels=model.config.in_channels)
    )[None]
    query = encode(model, [x], transform=to_float)[0].numpy()
    return search(db, query, version=served, k=k)
