"""A real Dagster instance and real LanceDB/checkpoint folders in a folder, tiny preset on digits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from fct_assets.definitions import asset_graph, build_defs
from fct_assets.lib.io_managers import CheckpointIOManager, RecordIOManager
from fct_assets.lib.partitions import add_model_version
from fct_assets.lib.records import GalleryStore
from fct_assets.lib.resources import FctResource

DATASET_CONFIG = {"ops": {"dataset": {"config": {"dataset": "digits", "old_classes": "0-4"}}}}


@dataclass
class Env:
    root: Path
    instance: dg.DagsterInstance
    defs: dg.Definitions
    fct: FctResource
    checkpoints: CheckpointIOManager
    records: RecordIOManager
    # False: every version's h maps from the old model, as the shared env's tests compute by
    # hand from the stored old embeddings. True (the living gallery's env): the product's
    # default, h maps from the deployed version's space (chained upgrades).
    chained: bool = False

    def environ(self) -> dict[str, str]:
        """The environment that points the CLI, `build_defs()` and step processes at this
        instance and storage."""
        return {
            "DAGSTER_HOME": str(self.root / "dagster_home"),
            "FCT_LANCEDB_URI": self.fct.lancedb_uri,
            "FCT_STORAGE_URI": str(self.root),  # checkpoints/ and records/ below it
            "FCT_PRESET": "tiny",
            "FCT_DEVICE": "cpu",
        }

    def resources(self) -> dict[str, object]:
        return {
            "fct": self.fct,
            "checkpoint_io_manager": self.checkpoints,
            "record_io_manager": self.records,
        }

    def upgrade(
        self, version: str, run_config: dict | None = None, **kwargs
    ) -> dg.ExecuteInProcessResult:
        if version not in self.instance.get_dynamic_partitions("model_version"):
            add_model_version(self.instance, version)
        run_config = dict(run_config or {})
        if not self.chained:
            ops = dict(run_config.get("ops", {}))
            h = dict(ops.get("transformation", {}))
            h["config"] = {"source": "old", **h.get("config", {})}
            run_config["ops"] = {**ops, "transformation": h}
        return self.defs.resolve_job_def("upgrade").execute_in_process(
            instance=self.instance, partition_key=version, run_config=run_config, **kwargs
        )

    def ensure(self, version: str) -> None:
        """`version` upgraded, by this call unless an earlier one did (its eval_report exists)."""
        done = self.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("eval_report"), asset_partitions=[version]),
            limit=1,
        ).records
        if not done:
            assert self.upgrade(version).success

    def materialise_table(
        self, version: str, reembed_fraction: float = 0.0, *, checks: bool = True
    ) -> dg.ExecuteInProcessResult:
        """backfilled_gallery[version] alone, again: a new LanceDB version of its table, with or
        without its blocking check."""
        selection = dg.AssetSelection.assets("backfilled_gallery")
        job = dg.define_asset_job(
            "table_only",
            selection=selection if checks else selection.without_checks(),
        )
        assets, checks = asset_graph()
        defs = dg.Definitions(
            assets=assets,
            asset_checks=checks,
            jobs=[job],
            resources=self.resources(),
        )
        config = {"reembed_fraction": reembed_fraction}
        return defs.resolve_job_def("table_only").execute_in_process(
            instance=self.instance,
            partition_key=version,
            run_config={"ops": {"backfilled_gallery": {"config": config}}},
        )


def build_env(root: Path, *, chained: bool = False) -> Env:
    """Base assets and model version v2 materialised under `root`.

    (dagster_home, lancedb, checkpoints, records)"""
    fct = FctResource(lancedb_uri=str(root / "lancedb"), preset="tiny", device="cpu", data_dir=None)
    checkpoints = CheckpointIOManager(uri=str(root / "checkpoints"))
    records = RecordIOManager(uri=str(root / "records"))
    defs = build_defs(
        {"fct": fct, "checkpoint_io_manager": checkpoints, "record_io_manager": records}
    )
    (root / "dagster_home").mkdir()
    instance = dg.DagsterInstance.local_temp(
        str(root / "dagster_home"), overrides={"telemetry": {"enabled": False}}
    )
    result = defs.resolve_job_def("base").execute_in_process(
        instance=instance, run_config=DATASET_CONFIG
    )
    assert result.success
    e = Env(root, instance, defs, fct, checkpoints, records, chained=chained)
    assert e.upgrade("v2").success
    return e


def synthetic_store(table: dict, old_space: str, side_space: str, dim: int) -> GalleryStore:
    """The gallery_store record of a hand-made gallery table (`table`: storage.publish's result),
    its vectors of `dim` in the two spaces given; the checkpoints behind them are made up."""
    return GalleryStore(
        **table,
        old_space_id=old_space,
        old_dim=dim,
        side_info_space_id=side_space,
        side_info_dim=dim,
        old_model_sha256="a" * 64,
        side_info_model_sha256="b" * 64,
        dataset_fingerprint="synthetic",
    )
