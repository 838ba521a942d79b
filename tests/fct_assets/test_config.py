"""Launchpad configuration: h's shape chosen at launch reaches the trained h, or is refused
at launch with one line."""

from __future__ import annotations

from dataclasses import replace

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
        "transformation.inner_rank: 8 refused: value error, needs inner_depth >= 2"
        " (inner_depth is 1)"
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
