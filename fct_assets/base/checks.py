"""The blocking check on the stored gallery: its pandera schema. A failure stops downstream
assets in the run; failing cases go into the check's metadata."""

from typing import TYPE_CHECKING

import dagster as dg

from fct_assets.base.assets import gallery_store
from fct_assets.lib import storage
from fct_assets.lib.keys import DATASET
from fct_assets.lib.records import DatasetRecord, GalleryStore
from fct_assets.lib.resources import FctResource
from fct_assets.lib.table_checks import validate_table, vector_table_schema

if TYPE_CHECKING:
    pass


@dg.asset_check(
    asset=gallery_store,
    blocking=True,
    additional_ins={"dataset": dg.AssetIn(DATASET)},
    description=(
        "pandera: ids unique, one row per gallery item, dims, finite, one space_id per column"
    ),
)
def gallery_store_schema(
    fct: FctResource, dataset: DatasetRecord, gallery_store: GalleryStore
) -> dg.AssetCheckResult:
    dims = {"old_embedding": gallery_store.old_dim, "side_info": gallery_store.side_info_dim}
    spaces = {
        "old_space_id": gallery_store.old_space_id,
        "side_info_space_id": gallery_store.side_info_space_id,
    }
    return validate_table(
        fct,
        storage.GALLERY_STORE,
        gallery_store.version,
        vector_table_schema(dataset.gallery_items, dims, spaces),
        ["item_id", "label", "old_embedding", "side_info", "old_space_id", "side_info_space_id"],
    )


CHECKS = [gallery_store_schema]
