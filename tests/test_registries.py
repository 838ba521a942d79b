"""One registry per concept: backbones (fct_ml.backbones), datasets with their default class split
and augmentation policy (fct_ml.datasets) and presets (fct_ml.presets). The CLI help and the
launchpad's field descriptions come from them, and listing them loads no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fct_ml.backbones import BACKBONES, backbone_names
from fct_ml.data import DataError, parse_class_list
from fct_ml.datasets import DATASETS, dataset_names, default_old_classes, entry, policy_for


def test_registries_load_without_torch():
    # What a Dagster code location reads to describe its launchpad fields.
    code = (
        "import sys, fct_ml.backbones, fct_ml.datasets, fct_assets.lib.config;"
        " print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_dataset_specs_and_default_splits():
    assert dataset_names() == (
        "fashion-mnist | digits | cifar100 | imagefolder:PATH | fashion-mnist-augmented:ITEMS"
        " | digits-augmented:ITEMS"
    )
    assert default_old_classes("fashion-mnist", 10) == "5,6,7,8,9"
    assert default_old_classes("digits", 10) == "0-4"
    assert default_old_classes("cifar100", 100) == "0-49"
    # A dataset without its own split: the first half of its classes.
    assert default_old_classes("imagefolder:/photos", 6) == "0-2"
    for key, registered in DATASETS.items():
        if registered.old_classes is not None:  # every registered split parses
            assert parse_class_list(registered.old_classes, 100)
        assert policy_for(key) is registered.augment is entry(f"{key}:x").augment
    with pytest.raises(DataError, match="unknown dataset 'mnist'; expected one of fashion-mnist"):
        entry("mnist")


def test_augmentation_policies_per_kind_of_data():
    # A mirrored digit is no digit; clothes and photos may be flipped.
    assert not policy_for("digits").supervised.flip and not policy_for("digits").contrastive.flip
    for key in ("fashion-mnist", "cifar100", "imagefolder"):
        assert policy_for(key).supervised.flip and policy_for(key).contrastive.flip, key


def test_cli_help_and_launchpad_come_from_the_registries():
    from fct_assets.lib.config import DatasetConfig, ModelTrainingConfig
    from fct_assets.lib.resources import FctResource
    from fct_ml.cli import build_parser
    from fct_ml.presets import PRESETS

    options = build_parser().commands["reproduce"].options
    assert options["dataset"].help == dataset_names()
    assert "fashion-mnist 5,6,7,8,9; digits 0-4; cifar100 0-49" in options["old_classes"].help
    assert list(options["preset"].choices) == list(PRESETS)

    assert DatasetConfig.model_fields["dataset"].description.startswith(dataset_names())
    assert "digits 0-4" in DatasetConfig.model_fields["old_classes"].description
    assert backbone_names() in ModelTrainingConfig.model_fields["arch"].description
    assert " | ".join(PRESETS) in FctResource.model_fields["preset"].description
    assert list(BACKBONES) == ["cnn-xs", "cnn-s", "cnn-m", "resnet18", "resnet50"]


def test_the_dataset_asset_takes_the_registered_split_when_none_is_given(tmp_path):
    import dagster as dg

    from fct_assets.base.assets import dataset
    from fct_assets.lib.io_managers import RecordIOManager
    from fct_assets.lib.resources import FctResource

    result = dg.materialize(
        [dataset],
        resources={
            "fct": FctResource(lancedb_uri=str(tmp_path / "lancedb"), preset="tiny", device="cpu"),
            "record_io_manager": RecordIOManager(uri=str(tmp_path / "records")),
        },
        run_config={"ops": {"dataset": {"config": {"dataset": "digits"}}}},
    )
    assert result.output_for_node("dataset").old_classes == (0, 1, 2, 3, 4)


def test_the_launchpad_takes_a_generated_gallery_with_its_size():
    from pydantic import ValidationError

    from fct_assets.lib.config import DatasetConfig

    assert DatasetConfig(dataset="fashion-mnist-augmented:1000000").dataset.endswith(":1000000")
    for spec in ("fashion-mnist-augmented", "fashion-mnist-augmented:0", "fashion-mnist:20"):
        with pytest.raises(ValidationError, match="expected"):
            DatasetConfig(dataset=spec)
