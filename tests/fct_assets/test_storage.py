"""fct_assets.lib.storage.ann_params against the parameters the backfill benchmark measured."""

from __future__ import annotations

from fct_assets.lib import storage


def test_ann_params_at_benchmark_scale_are_the_measured_ones() -> None:
    # benchmarks/results/backfill.json, ann.params (100,000 vectors of dim 128, recall@10 0.998):
    # 256 partitions (min(256, 100_000 // 256 = 390)), 128 / 4 = 32 sub-vectors, 256 / 8 = 32
    # probed, refine x10.
    assert storage.ann_params(100_000, 128) == {
        "index_type": "IVF_PQ",
        "metric": "l2",
        "num_partitions": 256,
        "num_sub_vectors": 32,
        "nprobes": 32,
        "refine_factor": 10,
    }
