"""Tests for fct_ml.config: from_dict / to_dict / replace over the frozen config dataclasses."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fct_ml.augment import AugmentConfig
from fct_ml.config import ConfigError, from_dict, replace, to_dict
from fct_ml.datasets import DATASETS
from fct_ml.models import ModelConfig
from fct_ml.presets import PRESETS, ExperimentConfig, preset
from fct_ml.side_info import SideInfoConfig
from fct_ml.training import TrainConfig
from fct_ml.transformation import TransformationConfig


def error_of(fn, *args, **kwargs) -> str:
    """The ConfigError message of fn(*args, **kwargs); asserts it is one line."""
    with pytest.raises(ConfigError) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------- building


def test_from_dict_builds_nested_frozen_dataclasses() -> None:
    config = from_dict(
        ExperimentConfig,
        {
            "old_model": {"arch": "cnn-xs", "embed_dim": 16},
            "side_info": {
                "model": {"arch": "cnn-xs", "embed_dim": 8, "num_classes": 0},
                "projection_dim": 4,
            },
            "transformation_train": {"optimizer": "adam", "lr": 0.002, "bn_eval_after": 0.5},
            "metric": "cosine",
        },
    )
    assert isinstance(config, ExperimentConfig)
    assert config.old_model == ModelConfig(arch="cnn-xs", embed_dim=16)
    assert isinstance(config.side_info, SideInfoConfig)
    assert config.side_info.model == ModelConfig(arch="cnn-xs", embed_dim=8, num_classes=0)
    assert config.side_info.projection_dim == 4
    assert config.side_info.temperature == SideInfoConfig().temperature  # default kept
    assert config.transformation_train.bn_eval_after == 0.5
    assert config.new_model == ModelConfig()  # absent -> default
    assert config.metric == "cosine"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.metric = "l2"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.side_info.model.embed_dim = 3  # type: ignore[misc]


def test_from_dict_side_info_config_with_nested_model() -> None:
    side = from_dict(
        SideInfoConfig, {"model": {"embed_dim": 32, "num_classes": 0}, "temperature": 0.5}
    )
    assert side == SideInfoConfig(model=ModelConfig(embed_dim=32, num_classes=0), temperature=0.5)


def test_from_dict_accepts_dataclass_instances_for_nested_fields() -> None:
    model = ModelConfig(arch="cnn-m")
    assert from_dict(SideInfoConfig, {"model": model}).model is model


def test_from_dict_empty_gives_defaults() -> None:
    assert from_dict(TrainConfig, {}) == TrainConfig()


# ------------------------------------------------------------------------- unknown keys


def test_unknown_key_is_named() -> None:
    message = error_of(from_dict, TrainConfig, {"epochs": 3, "epoch": 3})
    assert message.startswith("epoch:")
    assert "TrainConfig" in message and "epochs" in message  # says what is known


def test_unknown_nested_key_names_the_path() -> None:
    message = error_of(from_dict, ExperimentConfig, {"side_info": {"model": {"archh": "cnn-s"}}})
    assert message.startswith("side_info.model.archh:")
    assert "ModelConfig" in message


# ------------------------------------------------------------------------- types


@pytest.mark.parametrize("value", ["3", True, 3.0, None, [3]])
def test_int_field_refuses_non_int(value) -> None:
    message = error_of(from_dict, TrainConfig, {"epochs": value})
    assert message.startswith("epochs:")


def test_int_field_error_names_nested_path() -> None:
    message = error_of(from_dict, ExperimentConfig, {"old_model": {"embed_dim": "128"}})
    assert message.startswith("old_model.embed_dim:")


def test_float_field_accepts_int_as_float() -> None:
    config = from_dict(TrainConfig, {"lr": 1, "warmup_epochs": 0})
    assert config.lr == 1.0 and type(config.lr) is float
    assert type(config.warmup_epochs) is float


@pytest.mark.parametrize("value", [True, "0.1", None])
def test_float_field_refuses_bool_str_none(value) -> None:
    assert error_of(from_dict, TrainConfig, {"lr": value}).startswith("lr:")


def test_bool_field_refuses_int() -> None:
    assert error_of(from_dict, TransformationConfig, {"side_info": 1}).startswith("side_info:")


def test_str_field_refuses_int() -> None:
    assert error_of(from_dict, ModelConfig, {"arch": 18}).startswith("arch:")


def test_optional_float() -> None:
    assert from_dict(TrainConfig, {"bn_eval_after": None}).bn_eval_after is None
    assert from_dict(TrainConfig, {"bn_eval_after": 1}).bn_eval_after == 1.0
    assert error_of(from_dict, TrainConfig, {"bn_eval_after": "half"}).startswith("bn_eval_after:")


def test_list_for_tuple_is_fine() -> None:
    config = from_dict(AugmentConfig, {"crop_scale": [0.5, 1], "crop_ratio": (1, 2)})
    assert config.crop_scale == (0.5, 1.0)  # a tuple, ints converted to floats
    assert isinstance(config.crop_scale, tuple) and type(config.crop_scale[1]) is float
    assert config.crop_ratio == (1.0, 2.0)


def test_tuple_length_and_item_types_are_checked() -> None:
    assert error_of(from_dict, AugmentConfig, {"crop_scale": [0.5]}).startswith("crop_scale:")
    assert error_of(from_dict, AugmentConfig, {"crop_scale": ["a", 1.0]}).startswith(
        "crop_scale[0]:"
    )
    assert error_of(from_dict, AugmentConfig, {"crop_scale": 0.5}).startswith("crop_scale:")


@pytest.mark.parametrize(
    ("cls", "data", "path"),
    [
        (TrainConfig, {"optimizer": "rmsprop"}, "optimizer"),
        (ExperimentConfig, {"metric": "l1"}, "metric"),
        (ExperimentConfig, {"new_train": {"optimizer": "SGD"}}, "new_train.optimizer"),
    ],
)
def test_literal_violation(cls, data, path) -> None:
    message = error_of(from_dict, cls, data)
    assert message.startswith(f"{path}:")
    assert "expected one of" in message


def test_nested_dataclass_needs_a_mapping() -> None:
    message = error_of(from_dict, ExperimentConfig, {"old_model": "cnn-s"})
    assert message.startswith("old_model:") and "ModelConfig" in message


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# ------------------------------------------------------------------------- replace


def test_replace_flat_and_nested() -> None:
    side = SideInfoConfig()
    changed = replace(side, model__embed_dim=32, temperature=0.5)
    assert changed.model.embed_dim == 32
    assert changed.temperature == 0.5
    assert changed.model.arch == side.model.arch and changed.projection_dim == side.projection_dim
    assert side.model.embed_dim == ModelConfig().embed_dim  # the original is untouched


def test_replace_two_levels_deep() -> None:
    config = preset("tiny")
    changed = replace(
        config, side_info__model__embed_dim=8, old_model__in_channels=3, backfill_points=3
    )
    assert changed.side_info.model.embed_dim == 8
    assert changed.old_model.in_channels == 3
    assert changed.backfill_points == 3
    assert changed.new_model == config.new_model


def test_replace_checks_like_from_dict() -> None:
    assert error_of(replace, TrainConfig(), epochs="3").startswith("epochs:")
    assert error_of(replace, TrainConfig(), optimizer="rmsprop").startswith("optimizer:")
    assert error_of(replace, TrainConfig(), epoch=3).startswith("epoch:")
    assert "archh" in error_of(replace, SideInfoConfig(), model__archh="x")
    assert error_of(replace, SideInfoConfig(), modle__arch="x").startswith("modle:")
    assert type(replace(TrainConfig(), lr=1).lr) is float


# ------------------------------------------------------------------------- to_dict


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_dict_roundtrip_every_preset(name: str) -> None:
    config = preset(name)
    data = to_dict(config)
    assert isinstance(data["side_info"]["model"], dict)
    assert from_dict(ExperimentConfig, data) == config
    # Through JSON too (what provenance stores).
    assert from_dict(ExperimentConfig, json.loads(json.dumps(data))) == config


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_to_dict_roundtrip_through_json_turns_lists_back_into_tuples(name: str) -> None:
    policy = DATASETS[name].augment
    for aug in (policy.supervised, policy.contrastive):
        assert from_dict(AugmentConfig, json.loads(json.dumps(to_dict(aug)))) == aug
