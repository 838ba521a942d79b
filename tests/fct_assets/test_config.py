"""Launchpad configuration: h's shape chosen at launch reaches the trained h, or is refused
at launch with one line; a bad value for a later step stops a run before its first step trains."""

from __future__ import annotations

from dataclasses import replace

import dagster as dg
import pytest

from fct_assets.lib import config as cfg
from fct_assets.lib.asset_factory import preset_overrides
from fct_ml.presets import preset
from fct_ml.transformation import transformation_macs


def _h_config(**launch):
    chosen = cfg.validated(cfg.TransformationTrainingConfig, launch, "transformation")
    exp = preset_overrides(preset("cpu"), chosen, "transformation", "transformation_train")
    return exp.transformation


def test_unset_fields_keep_the_presets_h():
    assert _h_config() == preset("cpu").transformation


def test_launched_width_depth_and_rank_reach_h():
    h = _h_config(inner_width=64, inner_depth=3, inner_rank=16)
    assert (h.inner_width, h.inner_depth, h.inner_rank) == (64, 3, 16)
    assert h.branch_width == preset("cpu").transformation.branch_width  # not launched: kept
    # By hand, dims as the trained h has them (old 128, side-info 64, new 128, branches 256):
    # branches 128*256 + 256*256 + 64*256 + 256*256 = 180,224; inner 512*64, then two 64x64
    # layers at rank 16 (64*16 + 16*64 each), then 64*128: 32,768 + 4,096 + 8,192 = 45,056.
    # (FastFill's sigma head adds new_dim = 128 when the preset's h has it.)
    sized = replace(h, old_dim=128, side_info_dim=64, new_dim=128)
    sigma = 128 if sized.uncertainty else 0
    assert transformation_macs(sized) == 180_224 + 45_056 + sigma


def test_rank_without_a_square_layer_is_refused_at_launch():
    with pytest.raises(cfg.LaunchConfigError) as err:
        _h_config(inner_depth=1, inner_rank=8)
    assert str(err.value) == (
        "transformation.inner_rank: 8 refused: needs inner_depth >= 2 (inner_depth is 1)"
    )


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("inner_depth", 0, "expected inner_depth >= 1"),
        ("inner_rank", -1, "expected inner_rank >= 0"),
    ],
)
def test_out_of_range_shape_is_refused_with_its_bound(field, value, why):
    with pytest.raises(cfg.LaunchConfigError) as err:
        _h_config(**{field: value})
    assert str(err.value) == f"transformation.{field}: {value} refused: {why}"


def test_a_launched_backbone_reaches_the_model_as_its_name():
    # An Enum in Dagster's config (the launchpad offers the registry's names), a plain name in
    # the model's config and its provenance.
    chosen = cfg.validated(cfg.ModelTrainingConfig, {"arch": "cnn-xs"}, "new_model")
    exp = preset_overrides(preset("cpu"), chosen, "new_model", "new_train")
    assert exp.new_model.arch == "cnn-xs" and isinstance(exp.new_model.arch, str)


def test_launch_refusals_name_each_step_once_with_its_first_bad_field():
    found = cfg.launch_refusals(
        {
            "ops": {
                "new_model": {"config": {"epochs": -1, "embed_dim": 0}},
                "transformation": {"config": {"inner_width": 0}},
                "eval_report": {"config": {"table_version": 3}},
                "not_a_step": {"config": {"epochs": -1}},
            }
        }
    )
    assert [(r.path, r.value, r.line) for r in found] == [
        (
            ("ops", "new_model", "config", "embed_dim"),
            0,
            "new_model.embed_dim: 0 refused: expected embed_dim >= 1 (and 1 more)",
        ),
        (
            ("ops", "transformation", "config", "inner_width"),
            0,
            "transformation.inner_width: 0 refused: expected inner_width >= 1",
        ),
    ]
    assert cfg.launch_refusals(None) == [] and cfg.launch_refusals({"ops": {}}) == []


def test_a_bad_value_for_h_stops_the_upgrade_before_the_new_model_trains(env):
    # The finding: with `transformation.inner_width: 0`, new_model[v4] trained for minutes and
    # replaced its checkpoint before transformation refused. A run no coordinator checked
    # (execute_in_process) now stops at new_model's start, naming the field; nothing trains.
    version = "vbadh"
    result = env.upgrade(
        version,
        run_config={"ops": {"transformation": {"config": {"inner_width": 0}}}},
        raise_on_error=False,
    )
    assert not result.success
    failures = [e for e in result.all_events if e.is_step_failure]
    assert [e.step_key for e in failures] == ["new_model"]
    error = failures[0].event_specific_data.error
    assert (
        (error.cause or error)
        .message.strip()
        .endswith(
            "LaunchConfigError: transformation.inner_width: 0 refused: expected inner_width >= 1"
        )
    )
    done = env.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("new_model"), asset_partitions=[version]),
        limit=1,
    ).records
    assert (
        done == []
        and not (env.root / "checkpoints" / "new_model" / f"{version}.safetensors").exists()
    )
