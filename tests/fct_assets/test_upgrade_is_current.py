"""A second run of a model version that is current does nothing (deployment.upgrade_is_current),
fast: stand-in upgrade assets with the real keys, materialised into a real (ephemeral) Dagster
instance, whose `new_model` asks upgrade_is_current from its own run's context, as the real
new_model does; the deployment record is a real LanceDB folder. No training:
tests/reliability/test_living.py runs real second runs end to end."""

from dataclasses import dataclass, field

import dagster as dg
import lancedb
import pytest

from fct_assets.lib.keys import UPGRADE_ASSETS
from fct_assets.lib.records import VersionTable
from fct_assets.serving import deployment
from fct_assets.upgrade.freshness import upgrade_is_current
from tests.support.check_events import report_materialization

VERSIONS = dg.StaticPartitionsDefinition(["v1", "v2", "v3"])
OLD_SPACE = "old_model@0123456789ab"
V1_SPACE = "new_model:v1@ba9876543210"
V2_SPACE = "new_model:v2@aaaabbbbcccc"
ALL = list(UPGRADE_ASSETS)


class _Config(dg.Config):
    seed: int = 0


class _TransformationConfig(dg.Config):
    source: str = "deployed"  # as TransformationTrainingConfig.source
    seed: int = 0


def _config(names=ALL, **changed) -> dict:
    """The launchpad config of a run: seed 7 for each asset, but those in `changed`."""
    return {"ops": {n: {"config": changed.get(n, {"seed": 7})} for n in names}}


@dataclass
class Upgrade:
    """The four upgrade assets of a version, as stand-ins: new_model records what
    upgrade_is_current answered in its run; transformation records `h` as its metadata."""

    instance: dg.DagsterInstance
    db: object
    code: str = "1"
    h: dict = field(
        default_factory=lambda: {"source_space_id": OLD_SPACE, "old_space_id": OLD_SPACE}
    )
    answers: dict = field(default_factory=dict)

    def assets(self) -> list[dg.AssetsDefinition]:
        answers, db, h = self.answers, self.db, dict(self.h)

        @dg.asset(partitions_def=VERSIONS, code_version=self.code)
        def new_model(context: dg.AssetExecutionContext, config: _Config) -> None:
            answers[context.run.run_id] = upgrade_is_current(context, db)

        @dg.asset(partitions_def=VERSIONS, code_version=self.code, deps=[new_model])
        def transformation(config: _TransformationConfig) -> dg.MaterializeResult:
            return dg.MaterializeResult(metadata=h)

        @dg.asset(partitions_def=VERSIONS, code_version=self.code, deps=[transformation])
        def backfilled_gallery(config: _Config) -> None:
            pass

        @dg.asset(partitions_def=VERSIONS, code_version=self.code, deps=[backfilled_gallery])
        def eval_report(config: _Config) -> None:
            pass

        return [new_model, transformation, backfilled_gallery, eval_report]

    def run(self, version: str = "v2", names=ALL, config: dict | None = None) -> str:
        """Materialise `names` of `version` in one run; its run id."""
        result = dg.materialize(
            self.assets(),
            instance=self.instance,
            partition_key=version,
            selection=list(names),
            run_config=config if config is not None else _config(names),
        )
        assert result.success
        return result.run_id

    def answer(self, version: str = "v2", config: dict | None = None) -> str | None:
        """What upgrade_is_current answers to a run of the whole version."""
        return self.answers[self.run(version, config=config)]

    def latest(self, name: str, version: str = "v2"):
        """The event-log record of the latest materialisation of (name, version)."""
        return self.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(name), asset_partitions=[version]), limit=1
        ).records[0]


def _current(version: str, run_id: str) -> str:
    return (
        f"{version} is current: new_model, transformation, backfilled_gallery and eval_report were"
        f" materialised with this config by run {run_id[:8]}; nothing retrained or overwritten"
        " (change the config, or re-materialise an asset alone, to redo it)"
    )


def _base(instance, name: str = "dataset", timestamp: float | None = None) -> None:
    """A materialisation of a base (unpartitioned) asset, reported without a run; at `timestamp`
    when given (the public report_runless_asset_event stamps it now)."""
    report_materialization(
        instance, dg.AssetMaterialization(asset_key=name), at=timestamp, run_id="", job_name=""
    )


def _served(db, version: str, space: str) -> None:
    """The deployment record serves `version`, in `space`, from now on."""
    deployment.append(
        db,
        "promote",
        VersionTable(version=version, table=f"gallery_{version}", table_version=1, space_id=space),
    )


@pytest.fixture
def up(tmp_path):
    with dg.DagsterInstance.ephemeral() as instance:
        yield Upgrade(instance, lancedb.connect(str(tmp_path / "lancedb")))


def test_a_second_run_of_a_current_version_says_so_in_one_line(up):
    _base(up.instance)  # the base assets before the version: not stale
    first = up.run("v2")
    assert up.answers[first] is None  # nothing materialised before: everything to do
    up.run("v3")  # another version since: its records are not v2's
    assert up.answer("v2") == _current("v2", first)


def test_runs_without_launchpad_config_are_current(up):
    # As the automation sensor launches them: no config at all, so none to compare.
    first = up.run("v2", config={})
    assert up.answer("v2", config={}) == _current("v2", first)


def test_an_upgrade_asset_never_materialised_is_not_current(up):
    up.run("v2", names=ALL[:3])  # eval_report never ran
    up.run("v3")  # ... for v2: v3's does not count
    assert up.answer("v2") is None


def test_an_input_materialised_after_what_depends_on_it_is_stale(up):
    up.run("v2")
    up.run("v2", names=["transformation"])  # h again, after the gallery it backfilled
    assert up.answer("v2") is None


def test_a_base_asset_materialised_after_new_model_is_stale(up):
    # Between new_model and transformation: new_model is older than the dataset.
    up.run("v2", names=ALL[:1])
    _base(up.instance, "gallery_store")
    up.run("v2", names=ALL[1:])
    assert up.answer("v2") is None


def test_a_base_asset_materialised_at_the_same_instant_as_new_model_is_not_newer(up):
    first = up.run("v2")
    _base(up.instance, "old_model", timestamp=up.latest("new_model").timestamp)
    assert up.answer("v2") == _current("v2", first)


@pytest.mark.parametrize("name", ALL)
def test_a_run_with_another_launchpad_config_for_an_asset_is_not_current(up, name):
    up.run("v2")
    assert up.answer("v2", config=_config(**{name: {"seed": 8}})) is None


def test_materialisations_reported_without_a_run_are_not_current(up):
    # Reported by hand (no run, so no launchpad config to compare), in order.
    for name in ALL:
        up.instance.report_runless_asset_event(
            dg.AssetMaterialization(asset_key=name, partition="v2", metadata=up.h)
        )
    assert up.answer("v2") is None


def test_a_materialisation_by_another_code_version_is_not_current(up):
    up.run("v2")
    up.code = "2"
    assert up.answer("v2") is None


def test_a_promotion_since_h_was_trained_makes_it_stale(up):
    up.run("v2")  # h from the old model's space: nothing was served
    _served(up.db, "v1", V1_SPACE)  # now v1's space is the deployed one
    assert up.answer("v2") is None


def test_h_from_the_old_model_by_choice_is_not_stale_after_a_promotion(up):
    config = _config(transformation={"source": "old", "seed": 7})
    first = up.run("v2", config=config)
    _served(up.db, "v1", V1_SPACE)
    assert up.answer("v2", config=config) == _current("v2", first)


def test_h_from_the_served_version_is_current_while_it_is_served(up):
    _served(up.db, "v1", V1_SPACE)
    up.h = {"source_space_id": V1_SPACE, "old_space_id": OLD_SPACE}
    first = up.run("v2")
    assert up.answer("v2") == _current("v2", first)


def test_serving_the_version_itself_leaves_its_h_current(up):
    # Promoting v2 does not change the space v2's h maps from: it was the old model's.
    first = up.run("v2")
    _served(up.db, "v2", V2_SPACE)
    assert up.answer("v2") == _current("v2", first)
