"""A LanceDB folder that serves: a gallery_store of small grey images, and per model version a
real checkpoint and its table of the images' embeddings; versions promoted with their serving
contract written, as deployment.promote writes it (without the checks)."""

from __future__ import annotations

from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import torch

from fct_assets.lib import storage
from fct_assets.lib.records import CheckpointMeta, VersionTable
from fct_assets.serving import contract, deployment
from fct_ml.augment import to_float
from fct_ml.checkpoint import save_checkpoint
from fct_ml.models import EmbeddingModel, ModelConfig
from fct_ml.training import encode

ITEMS = 12
DIM = 8


class Served:
    """gallery_store (ITEMS random 8x8 grey images) and gallery_v2, gallery_v3: the images
    embedded by a real checkpoint of each version (cnn-xs, DIM), under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.db = lancedb.connect(str(root / "lancedb"))
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, (ITEMS, 1, 8, 8), dtype=np.uint8)  # (N, C, H, W)
        blobs = [storage.encode_png(image) for image in self.images]
        store = pa.table({"item_id": pa.array(range(ITEMS), pa.int64()), "image": blobs})
        self.db.create_table(storage.GALLERY_STORE, data=store)
        self.models, self.checkpoints, self.tables = {}, {}, {}
        for seed, version in enumerate(("v2", "v3")):
            torch.manual_seed(seed)
            model = EmbeddingModel(ModelConfig(arch="cnn-xs", embed_dim=DIM, num_classes=0))
            info = save_checkpoint(
                root / "checkpoints" / "new_model" / f"{version}.safetensors",
                model.eval(),
                name=f"new_model:{version}",
            )
            self.models[version] = model
            self.checkpoints[version] = CheckpointMeta(
                path=info.path, sha256=info.sha256, space_id=info.space_id
            )
            self.publish(version, self.embed(version, self.images))

    @property
    def uri(self) -> str:
        return str(self.root / "lancedb")

    def embed(self, version: str, images: np.ndarray) -> np.ndarray:
        """(N, C, H, W) uint8 -> (N, DIM): the version's model, as a query is embedded."""
        return encode(self.models[version], [torch.tensor(images)], transform=to_float).numpy()

    def publish(self, version: str, vectors: np.ndarray) -> VersionTable:
        """gallery_<version> (re)written in one commit with item i at vectors[i]."""
        space = self.checkpoints[version].space_id
        table = storage.publish(
            self.db,
            f"gallery_{version}",
            storage.backfilled_schema(DIM, space),
            [self.rows(range(len(vectors)), vectors, space)],
        )
        self.tables[version] = VersionTable(
            version=version,
            table=f"gallery_{version}",
            table_version=table["version"],
            space_id=space,
        )
        return self.tables[version]

    @staticmethod
    def rows(ids, vectors: np.ndarray, space_id: str) -> pa.RecordBatch:
        n = len(vectors)
        return pa.RecordBatch.from_pydict(
            {
                "item_id": pa.array(list(ids), pa.int64()),
                "label": pa.array(np.arange(n) % 3, pa.int32()),
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(vectors.reshape(-1).astype(np.float32)), DIM
                ),
                "sigma": pa.array(np.zeros(n, np.float32)),
                "source": ["re-embedded"] * n,
                "space_id": [space_id] * n,
            },
            schema=storage.backfilled_schema(DIM, space_id),
        )

    def promote(self, version: str):
        """What deployment.promote records once the checks passed: the row, then the contract."""
        row = deployment.append(self.db, "promote", self.tables[version])
        contract.write(self.db, row, checkpoint=self.checkpoints[version])
        return row
