"""Ingest throughput.

    python benchmarks/perf/ingest.py                 # 2,000 Fashion-MNIST images (28x28), demo preset
    python benchmarks/perf/ingest.py --items 200     # a quick check

throughput: `fct_assets.ingest.ingest.ingest_files` over N PNG files of the validation split (never in
the gallery), with the demo preset's models (random weights: timing only) as the deployed model
and the side-info model: read + decode + content id + both embeddings + one LanceDB commit to
gallery_store and one to the deployed table + the deployment row. Items/s = N / wall time.

The inbox -> searchable latency with the sensor, the daemon and `dagster dev` running is
benchmarks/perf/ingest_latency.py's.

Writes benchmarks/results/ingest.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LANCE_LOG", "error")
sys.path.insert(
    0, str(Path(__file__).resolve().parents[2])
)  # the repository root: benchmarks.common
from benchmarks.common import machine, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _setup(root: Path, items: int):
    """A gallery_store and a deployed version table (v2) of 100 items with random-weight demo
    models, the PNG files of `items` held-back images, and the resources."""
    import numpy as np
    import pyarrow as pa
    import torch

    from fct_assets.lib import storage
    from fct_assets.lib.records import Checkpoint, DatasetRecord, VersionTable
    from fct_assets.lib.resources import FctResource
    from fct_assets.serving.deployment import append
    from fct_ml.checkpoint import checkpoint_bytes, space_id
    from fct_ml.data import parse_class_list
    from fct_ml.datasets import default_old_classes
    from fct_ml.models import EmbeddingModel
    from fct_ml.pipeline import validation_split
    from fct_ml.presets import preset

    exp = preset("demo")
    fct = FctResource(lancedb_uri=str(root / "lancedb"), preset="demo", device="cpu")
    data = fct.load_dataset("fashion-mnist")
    torch.manual_seed(0)

    def checkpoint(name, config):
        import hashlib

        model = EmbeddingModel(config).eval()
        blob, _ = checkpoint_bytes(model, name=name)
        sha = hashlib.sha256(blob).hexdigest()
        return Checkpoint(model=model, sha256=sha, space_id=space_id(name, sha), recorded={})

    from dataclasses import replace

    deployed = checkpoint("new_model:v2", replace(exp.new_model, num_classes=10))
    side = checkpoint("side_info_model", replace(exp.side_info.model, num_classes=0))
    old_space = "old_model@000000000000"
    db = fct.connect()
    dim, side_dim = exp.new_model.embed_dim, exp.side_info.model.embed_dim
    n0 = 100
    store_schema = storage.gallery_store_schema(
        dim, side_dim, old_space, side.space_id, living=True
    )
    vec = np.random.default_rng(0).random((n0, dim), dtype=np.float32)
    store_rows = pa.table(
        {
            "item_id": pa.array(np.arange(n0, dtype=np.int64)),
            "label": pa.array(np.zeros(n0, np.int32)),
            "image": pa.array([storage.encode_png(data.test.images[i].numpy()) for i in range(n0)]),
            "old_embedding": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), dim),
            "side_info": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), side_dim),
            "old_space_id": pa.array([old_space] * n0),
            "side_info_space_id": pa.array([side.space_id] * n0),
            "ingest_batch": pa.nulls(n0, pa.string()),
        },
        schema=store_schema,
    )
    storage.publish(db, storage.GALLERY_STORE, store_schema, store_rows.to_batches())
    table_schema = storage.backfilled_schema(dim, deployed.space_id, lineage=True)
    table_rows = pa.table(
        {
            "item_id": pa.array(np.arange(n0, dtype=np.int64)),
            "label": pa.array(np.zeros(n0, np.int32)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), dim),
            "sigma": pa.array(np.zeros(n0, np.float32)),
            "source": pa.array(["transformed"] * n0),
            "space_id": pa.array([deployed.space_id] * n0),
            "chain": pa.array([deployed.space_id] * n0),
            "ingest_batch": pa.nulls(n0, pa.string()),
        },
        schema=table_schema,
    )
    info = storage.publish(db, "gallery_v2", table_schema, table_rows.to_batches())
    append(
        db,
        "promote",
        VersionTable(
            version="v2",
            table="gallery_v2",
            table_version=info["version"],
            space_id=deployed.space_id,
        ),
    )
    held = validation_split(data, exp)
    files = []
    folder = root / "files"
    folder.mkdir()
    for i in range(items):
        path = folder / f"{i:05d}.png"
        path.write_bytes(storage.encode_png(held.images[i].numpy()))
        files.append((str(path), int(held.labels[i])))
    record = DatasetRecord(
        spec="fashion-mnist",
        name=data.name,
        fingerprint="",
        old_classes=tuple(parse_class_list(default_old_classes("fashion-mnist", 10), 10)),
        class_names=tuple(data.class_names),
        num_classes=10,
        channels=1,
        image_size=(28, 28),
        train_items=len(data.train),
        gallery_items=len(data.test),
    )
    return fct, deployed, side, files, record


def throughput(items: int) -> dict:
    import torch

    from fct_assets.ingest.ingest import Target, ingest_files
    from fct_assets.serving.deployment import advance

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        fct, deployed, side, files, record = _setup(Path(tmp), items)
        db = fct.connect()
        started, cpu = time.perf_counter(), time.process_time()
        result = ingest_files(
            fct,
            files,
            batch="bbench",
            dataset=record,
            target=Target("v2", "gallery_v2", deployed),
            side_info_model=side,
            advance_deployment=lambda v: advance(db, "v2", v).seq,
            log=lambda m: None,
        )
        seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu
        assert result.added_to_store == result.added_to_table == items, result
        # Again: every item is already there (idempotent), nothing is written.
        again = time.perf_counter()
        repeat = ingest_files(
            fct,
            files,
            batch="bbench2",
            dataset=record,
            target=Target("v2", "gallery_v2", deployed),
            side_info_model=side,
            log=lambda m: None,
        )
        repeat_s = time.perf_counter() - again
        assert repeat.added_to_store == repeat.added_to_table == 0
    return {
        "items": items,
        "seconds": round(seconds, 3),
        "items_per_s": round(items / seconds, 1),
        # On a shared machine wall time measures the others' load too: the process's CPU time
        # (both threads) bounds what the ingest itself costs.
        "cpu_seconds": round(cpu_s, 3),
        "items_per_cpu_s": round(items / cpu_s, 1),
        "reingest_seconds": round(repeat_s, 3),
        "target_items_per_s": 500,
        "met": items / seconds >= 500,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    start = os.getloadavg()
    measured = throughput(args.items)
    end = os.getloadavg()
    # The load average (1, 5, 15 min) beside the figure: on a shared machine the wall time
    # measures the others' load too.
    result = {
        "throughput": measured,
        "load_average": {"start": [round(x, 2) for x in start], "end": [round(x, 2) for x in end]},
        "machine": machine(
            "load average (1, 5, 15 min)"
            f" {' '.join(f'{x:.1f}' for x in start)} at start,"
            f" {' '.join(f'{x:.1f}' for x in end)} at end"
        ),
    }
    t = result["throughput"]
    md = "\n".join(
        [
            "# Ingest benchmark",
            "",
            f"`python benchmarks/perf/ingest.py --items {args.items}` on {result['machine']}.",
            "",
            "| measure | value |",
            "| --- | --- |",
            f"| items (28x28 PNG, Fashion-MNIST validation split) | {t['items']} |",
            "| ingest wall time (decode, ids, 2 embeddings, 2 commits + deployment row) |"
            f" {t['seconds']:.2f} s |",
            f"| throughput | {t['items_per_s']:,.0f} items/s"
            f" (target 500: {'met' if t['met'] else 'missed'}) |",
            f"| CPU time of the ingest (both threads) | {t['cpu_seconds']:.2f} s"
            f" ({t['items_per_cpu_s']:,.0f} items per CPU-second) |",
            f"| the same files again (idempotent: nothing written) | {t['reingest_seconds']:.2f} s |",
            "",
        ]
    )
    write_results("ingest", result, md, args.out)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
