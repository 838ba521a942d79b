"""A small world for backfill tests that need no training: a gallery_store of a few 8x8 items,
random (untrained) models recorded as the checkpoints of model version v2 on a real Dagster
instance, and the definitions over real LanceDB and checkpoint folders. A backfill of it runs in
about a second, in process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import torch

from fct_assets.definitions import build_defs
from fct_assets.lib import records, storage
from fct_assets.lib.io_managers import CheckpointIOManager, RecordIOManager
from fct_assets.lib.resources import FctResource
from fct_ml.checkpoint import CheckpointInfo, save_checkpoint
from fct_ml.models import EmbeddingModel, ModelConfig
from fct_ml.transformation import TrainedFor, Transformation, TransformationConfig, bind
from tests.support.env import synthetic_store

OLD_SPACE, SIDE_SPACE = "old_model@aaaaaaaaaaaa", "side_info_model@bbbbbbbbbbbb"
BACKFILL = dg.AssetKey("backfilled_gallery")
DIM = 4


@dataclass
class SmallWorld:
    root: Path
    fct: FctResource
    instance: dg.DagsterInstance
    defs: dg.Definitions
    n_items: int

    def new_model(self, seed: int) -> EmbeddingModel:
        torch.manual_seed(seed)
        model = EmbeddingModel(
            ModelConfig(arch="cnn-xs", embed_dim=DIM, in_channels=1, num_classes=10)
        )
        return model.eval()

    def h(self, seed: int = 0) -> Transformation:
        torch.manual_seed(seed)
        config = TransformationConfig(
            old_dim=DIM,
            side_info_dim=DIM,
            new_dim=DIM,
            branch_width=4,
            inner_width=4,
            uncertainty=True,
        )
        return Transformation(config).eval()

    def record(
        self, name: str, model: torch.nn.Module, version: str = "v2", **extra
    ) -> CheckpointInfo:
        """Save `model` as the checkpoint of `name[version]` and record its materialisation, as
        the checkpoint IO manager and the asset do (path, sha256, space_id, `extra`)."""
        saved = save_checkpoint(
            self.root / "checkpoints" / name / f"{version}.safetensors",
            model,
            name=f"{name}:{version}",
        )
        self.instance.report_runless_asset_event(
            dg.AssetMaterialization(
                name,
                partition=version,
                metadata={
                    "path": saved.path,
                    "sha256": saved.sha256,
                    "space_id": saved.space_id,
                    **extra,
                },
            )
        )
        return saved

    def upgrade_models(self, *, new_seed: int = 0, source: str = OLD_SPACE, **h_extra) -> str:
        """new_model[v2] (`new_seed`) and an h trained for it (bound in its checkpoint and in its
        recorded metadata, as the transformation asset does); returns the new model's space."""
        new = self.record("new_model", self.new_model(new_seed))
        h = bind(self.h(), TrainedFor(source, SIDE_SPACE, new.space_id))
        self.record(
            "transformation",
            h,
            old_space_id=OLD_SPACE,
            side_info_space_id=SIDE_SPACE,
            new_space_id=new.space_id,
            new_model_sha256=new.sha256,
            source_space_id=source,
            **h_extra,
        )
        return new.space_id

    def backfill(self, **config) -> dg.ExecuteInProcessResult:
        job = self.defs.resolve_implicit_global_asset_job_def()
        return job.execute_in_process(
            instance=self.instance,
            partition_key="v2",
            asset_selection=[BACKFILL],
            raise_on_error=False,
            run_config={"ops": {"backfilled_gallery": {"config": {"rows_per_batch": 2, **config}}}},
        )


def build_small_world(
    root: Path, *, n_items: int = 12, corrupt: int | None = None, without_old: tuple = ()
) -> SmallWorld:
    """gallery_store of `n_items` random 1x8x8 images (item `corrupt`'s image unreadable), with
    random old embeddings and side-info; the items `without_old` have none in the old space, as
    items ingested after a promotion (ingest batch "after")."""
    fct = FctResource(lancedb_uri=str(root / "lancedb"), preset="tiny", device="cpu", data_dir=None)
    rng = np.random.default_rng(1)
    images = [
        storage.encode_png(rng.integers(0, 256, (1, 8, 8), dtype=np.uint8)) for _ in range(n_items)
    ]
    if corrupt is not None:
        images[corrupt] = b"\x89PNG\r\n\x1a\n" + b"garbage" * 4
    no_old = np.isin(np.arange(n_items), list(without_old))

    def vec(missing=None):
        values = pa.array(rng.random(n_items * DIM).astype(np.float32))
        return pa.FixedSizeListArray.from_arrays(
            values, DIM, mask=None if missing is None else pa.array(missing)
        )

    schema = storage.gallery_store_schema(DIM, DIM, OLD_SPACE, SIDE_SPACE, living=True)
    batch = pa.record_batch(
        [
            pa.array(np.arange(n_items, dtype=np.int64)),
            pa.array((np.arange(n_items) % 10).astype(np.int32)),
            pa.array(images, pa.binary()),
            vec(no_old),
            vec(),
            pa.array([None if m else OLD_SPACE for m in no_old], pa.string()),
            pa.array([SIDE_SPACE] * n_items),
            pa.array(["after" if m else None for m in no_old], pa.string()),
        ],
        schema=schema,
    )
    info = storage.publish(fct.connect(), storage.GALLERY_STORE, schema, [batch])
    (root / "records").mkdir()
    store = synthetic_store(info, OLD_SPACE, SIDE_SPACE, DIM)
    (root / "records" / "gallery_store.json").write_text(records.dumps(store))
    home = root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    instance = dg.DagsterInstance.from_config(str(home))
    instance.add_dynamic_partitions("model_version", ["v2"])
    defs = build_defs(
        {
            "fct": fct,
            "checkpoint_io_manager": CheckpointIOManager(uri=str(root / "checkpoints")),
            "record_io_manager": RecordIOManager(uri=str(root / "records")),
        },
        executor=dg.in_process_executor,
    )
    return SmallWorld(root, fct, instance, defs, n_items)
