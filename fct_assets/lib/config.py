"""Launchpad configuration: Dagster Config classes mirroring fct_ml's dataclasses.

Fields left unset (None) take the preset's value (resource `fct`, setting `preset`), so the
launchpad works with no YAML at all and every field says what it changes.

What is checked where (docs/reliability.md, "Launch-time validation"):

- Types, unknown keys and enumerated values (a backbone, h's source): by Dagster's own config
  types, so the launchpad marks them as they are typed and a launch is refused before a run
  exists. Enumerated fields are `StrEnum`s or `Literal`s, which Dagster turns into its Enum type.
- Numeric ranges and formats (`epochs >= 1`, `inner_width >= 1`, a sha256):
  Dagster's config types carry no bounds (its config schema has Int and Float, nothing more;
  pydantic's ge/le stay on the Python class), so the launchpad cannot mark them. They are
  checked on every launch by `launch_refusals`, which validates each step's config with its
  class: by the run coordinator when a run is submitted (fct_assets/lib/submission.py: the
  launch is refused with one line naming the field, no step runs) and, for runs that no
  coordinator sees (`execute_in_process`, `dagster job execute`), by the first upgrade step
  before anything trains.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import dagster as dg
from pydantic import Field, ValidationError, ValidationInfo, field_validator

from fct_assets.lib.keys import (
    BACKFILLED_GALLERY,
    DATASET,
    EVAL_REPORT,
    NEW_MODEL,
    OLD_MODEL,
    SIDE_INFO_MODEL,
    TRANSFORMATION,
)
from fct_ml.backbones import BACKBONES, backbone_names
from fct_ml.datasets import DATASETS, dataset_names, default_splits

# A backbone of the registry (fct_ml/backbones.py): an enumerated field, so Dagster's config type
# is an Enum of these names and the launchpad marks any other name as it is typed. A StrEnum: its
# members are the names themselves (str), as ModelConfig.arch expects.
Backbone = StrEnum("Backbone", {name: name for name in BACKBONES})

# The largest seed: each stage seeds torch with seed * 1000 + k, and torch takes 64 bits.
MAX_SEED = 10**12
# The largest width or embedding dimension accepted (a 65536 x 65536 float32 layer is 16 GiB).
MAX_WIDTH = 65536
MAX_EPOCHS = 100_000
# A LanceDB table version or a row count: a signed 64-bit integer.
MAX_INT64 = 2**63 - 1
_CLASS_LIST = re.compile(r"\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class LaunchConfigError(dg.DagsterError):
    """A launchpad value that cannot be right: one line naming the field, the bound and the value.

    A Dagster error on purpose: Dagster passes those through to the UI and the GraphQL client as
    they are, where any other error raised while the run config is resolved becomes a generic
    "config mapping function ... has thrown an unexpected error"."""


@dataclass(frozen=True)
class Refusal:
    """One launchpad value refused: where it is in the run config, the value, the one line."""

    path: tuple[str, ...]  # ("ops", "transformation", "config", "inner_width")
    value: Any
    line: str  # "transformation.inner_width: 0 refused: expected inner_width >= 1"


def _shown(value: Any) -> str:
    return "NaN" if isinstance(value, float) and math.isnan(value) else repr(value)


def _refusal(err: ValidationError, where: str) -> Refusal:
    first = err.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "(config)"
    value = first.get("input")
    bound = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    limits = [f"{op} {first['ctx'][k]}" for k, op in bound.items() if k in first.get("ctx", {})]
    if limits:
        why = f"expected {field} {' and '.join(limits)}"
    else:
        # pydantic's "Value error, " before a validator's own words says nothing to a user.
        msg = first["msg"].removeprefix("Value error, ")
        why = msg[0].lower() + msg[1:]
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    path = tuple(str(part) for part in first["loc"])
    return Refusal(path, value, f"{where}.{field}: {_shown(value)} refused: {why}{more}")


def seconds_from_env(name: str, default: int) -> int:
    """A sensor's interval from the environment variable `name` (whole seconds >= 1)."""
    value = os.environ.get(name, str(default))
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name}={value!r}: expected whole seconds >= 1")
    return int(value)


def validated(cls: type[dg.Config], values: dict[str, Any], where: str) -> dg.Config:
    """`cls(**values)`, or LaunchConfigError naming the field, the bound and the value."""
    try:
        return cls(**values)
    except ValidationError as err:
        raise LaunchConfigError(_refusal(err, where).line) from None


class DatasetConfig(dg.Config):
    """Which data the base assets are built from."""

    dataset: str = Field(
        "fashion-mnist",
        description=(
            f"{dataset_names()}. The test split is the gallery (KEY:ITEMS: a generated gallery of"
            " ITEMS items)."
        ),
    )
    old_classes: str | None = Field(
        None,
        description=(
            "Classes the old and side-info models may see, as ranges or lists (0-4, 1,3,5). The"
            f" new model and h see all. Unset: the dataset's default ({default_splits()})."
        ),
    )

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, spec: str) -> str:
        # Not an Enum: `imagefolder:PATH` carries a path, `KEY:ITEMS` a number. Checked at launch
        # all the same.
        key, sep, argument = spec.partition(":")
        found = DATASETS.get(key)
        if found is None or (found.argument is not None) != bool(sep and argument):
            raise ValueError(f"expected one of {dataset_names()}")
        if found.argument == "ITEMS" and not (argument.isdecimal() and int(argument) > 0):
            raise ValueError(f"expected {key}:ITEMS, ITEMS a positive whole number")
        return spec

    @field_validator("old_classes")
    @classmethod
    def _class_list(cls, text: str | None) -> str | None:
        # The format only: which classes exist is the dataset's to say, when it is loaded.
        if text is not None and not _CLASS_LIST.fullmatch(text):
            raise ValueError("expected class numbers as ranges or lists (0-4, 1,3,5)")
        return text


class ModelTrainingConfig(dg.Config):
    """An embedding model and how long to train it (old, side-info and new models)."""

    arch: Backbone | None = Field(
        None,
        description=f"Backbone: {backbone_names()}. Unset: the preset's.",
    )
    embed_dim: int | None = Field(
        None,
        ge=1,
        le=MAX_WIDTH,
        description="Embedding dimension. Unset: the preset's (128 as the paper).",
    )
    epochs: int | None = Field(
        None, ge=1, le=MAX_EPOCHS, description="Training epochs. Unset: the preset's."
    )
    seed: int = Field(
        0,
        ge=0,
        le=MAX_SEED,
        description=(
            "The run's seed (initialisation, data order, augmentation); the model derives its own"
            " from it as `fct reproduce --seed` does, so the same seed gives the same model."
        ),
    )
    source: str = Field(
        "train",
        description=(
            "train (default): train it here. checkpoint:PATH: a safetensors checkpoint of a"
            " registry architecture with its config (fct_ml.checkpoint's format). torchscript:PATH:"
            " a TorchScript file taking (N, C, H, W) images, preprocessed as declared below. Refused"
            " with one line if it cannot load, gives another dim than embed_dim, or NaN/Inf on a"
            " probe batch."
        ),
    )
    sha256: str | None = Field(
        None, description="Expected sha256 of the external file; refused if it differs."
    )
    preprocess_size: int = Field(
        0,
        ge=0,
        le=4096,
        description="TorchScript input: resize to N x N pixels (0: the gallery's size).",
    )
    preprocess_channels: int = Field(
        0, ge=0, le=3, description="TorchScript input channels: 1 or 3 (0: the gallery's)."
    )
    preprocess_mean: float = Field(
        0.0,
        ge=-1.0,
        le=1.0,
        allow_inf_nan=False,
        description="TorchScript input: (x - mean) / std, x in [0, 1].",
    )
    preprocess_std: float = Field(
        1.0,
        gt=0.0,
        le=100.0,
        allow_inf_nan=False,
        description="TorchScript input: see preprocess_mean.",
    )

    @field_validator("source")
    @classmethod
    def _model_source(cls, text: str) -> str:
        # As fct_ml.external.parse_source, which loads torch: checked at launch without it.
        kind, sep, path = text.partition(":")
        if text != "train" and not (kind in ("checkpoint", "torchscript") and sep and path):
            raise ValueError("expected train, checkpoint:PATH or torchscript:PATH")
        return text

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, digest: str | None) -> str | None:
        if digest is not None and not _SHA256.fullmatch(digest):
            raise ValueError("expected 64 lower-case hexadecimal digits")
        return digest

    @field_validator("preprocess_channels")
    @classmethod
    def _channels(cls, channels: int) -> int:
        # Not an Enum: Dagster's Enum takes names (strings), and this is a number in the YAML.
        if channels not in (0, 1, 3):
            raise ValueError("expected 0 (the gallery's), 1 or 3")
        return channels


class TransformationTrainingConfig(dg.Config):
    """The transformation h (FastFill variant: it also predicts its uncertainty sigma)."""

    kind: Literal["mlp", "linear", "procrustes"] = Field(
        "mlp",
        description=(
            "mlp (default): the paper's h, trained, with FastFill's sigma. linear: ridge regression"
            " [stored embedding, side-info] -> new, fitted in closed form in seconds. procrustes:"
            " an orthogonal map from the stored embedding alone. Neither closed form has sigma: a"
            " partial re-embedding then goes in storage order. The eval report compares both with"
            " the mlp."
        ),
    )
    inner_width: int | None = Field(
        None,
        ge=1,
        le=MAX_WIDTH,
        description="Width of h's inner MLP (paper: 2048). Unset: the preset's.",
    )
    inner_depth: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Hidden layers of inner_width in h's inner MLP (paper: 2). Unset: the preset's.",
    )
    inner_rank: int | None = Field(
        None,
        ge=0,
        le=MAX_WIDTH,
        description=(
            "0: full rank. r > 0: each inner_width x inner_width layer factorised through rank r"
            " (needs inner_depth >= 2). Unset: the preset's."
        ),
    )
    epochs: int | None = Field(
        None, ge=1, le=MAX_EPOCHS, description="Training epochs (paper: 80). Unset: the preset's."
    )
    side_info: bool = Field(
        True,
        description="Feed the stored side-info to h (FCT). False: h(old) alone, for comparison.",
    )
    source: Literal["deployed", "old"] = Field(
        "deployed",
        description=(
            "The space h maps from. deployed: the deployed version's (the old model's before any"
            " promotion), so items ingested since reach the new table (chained upgrade). old:"
            " always the old model (direct). Either way, an item with no vector in that space"
            " (ingested after a promotion) is embedded from its stored image by the new model"
            " when the table is backfilled."
        ),
    )
    seed: int = Field(
        0,
        ge=0,
        le=MAX_SEED,  # as the new model's seed
        description=(
            "The run's seed (features' augmentation, initialisation, data order), as `fct"
            " reproduce --seed`."
        ),
    )

    @field_validator("inner_rank")
    @classmethod
    def _rank_needs_depth(cls, rank: int | None, info: ValidationInfo) -> int | None:
        # Checked at launch: fct_ml refuses it too, but only once the step has started.
        depth = info.data.get("inner_depth")
        if rank and depth is not None and depth < 2:
            raise ValueError(f"needs inner_depth >= 2 (inner_depth is {depth})")
        return rank


class BackfillConfig(dg.Config):
    """How the version's gallery table is filled."""

    reembed_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description=(
            "Fraction of the gallery re-embedded from its stored images with the new model, most "
            "uncertain (highest sigma) first, as FastFill. 0: transformation only (no image read)."
        ),
    )
    rows_per_batch: int = Field(
        4096,
        gt=0,
        le=1_048_576,
        description=(
            "Gallery rows read, transformed and written per LanceDB page (memory grows with it)."
        ),
    )
    shards: int = Field(
        1,
        ge=1,
        le=256,
        description=(
            "Split the gallery into this many contiguous row ranges, backfilled in parallel (one"
            " process each, at most `gpu` pool-limit at a time) and published in ONE commit. 1: no"
            " staging copy."
        ),
    )
    ann_min_rows: int = Field(
        100_000,
        ge=256,
        le=MAX_INT64,
        description=(
            "Build an IVF_PQ index on the published table when it holds at least this many rows;"
            " below, search is exact (brute force is fast there). IVF_PQ trains 256 codes: it needs"
            " >= 256 rows."
        ),
    )


class EvalReportConfig(dg.Config):
    """Which table version the evaluation reads, and the gates promotion passes."""

    table_version: int | None = Field(
        None,
        ge=1,
        le=MAX_INT64,
        description=(
            "LanceDB version of the model version's table to evaluate: the daily schedule sets the"
            " deployed, pinned one. Unset: the table the latest backfilled_gallery published."
        ),
    )
    # The defaults and their reasons: fct_assets/upgrade/gates.py (DEFAULT_MAX_NFR, ...).
    max_nfr: float | None = Field(
        None,
        ge=0.0,
        le=100.0,
        allow_inf_nan=False,
        description=(
            "Gate: the most negative flips (% of queries right under what is served, wrong under"
            " this version at f = 0) promotion accepts. Unset: the chance level (1 - err_S) x"
            " err_P, what independent errors would flip (relative NFR 1), so regressions that"
            " concentrate on today's right answers are refused at any accuracy (preset tiny: off)."
        ),
    )
    map_tolerance: float | None = Field(
        None,
        ge=0.0,
        le=100.0,
        allow_inf_nan=False,
        description=(
            "Gate: how many mAP points this version at f = 0 may lose against what is served."
            " Unset: 1, beyond the bootstrap interval of a 10,000-item gallery's mAP delta"
            " (preset tiny: off)."
        ),
    )
    compare_closed_form: bool = Field(
        True,
        description=(
            "Fit the linear and Procrustes maps on h's training features and report them beside"
            " h (seconds to fit; the features cost one pass of the training images through the"
            " three models)."
        ),
    )
    # fct_assets/upgrade/report.py's QUERY_SAMPLE (tests/fct_assets/test_report_sample.py holds
    # them equal), why it is 10,000 beside it.
    query_sample: int = Field(
        10_000,
        ge=1,
        le=MAX_INT64,
        description=(
            "Most items that query. Up to this many gallery items, every item queries the rest"
            " (leave-one-out); above it, a seeded sample of this many queries the whole gallery"
            " (cost: queries x gallery), and new/new, P(1), the backfilling curves and the"
            " closed-form maps run on the sub-gallery of the sampled items. 10,000 keeps a"
            " 10,000-item gallery whole."
        ),
    )


# Each step's launchpad config class, by the step's name in the run config
# (`ops: {NAME: {config: ...}}`): what `launch_refusals` checks on every launch. The steps of
# other domains with a config of their own (the ingest batch, housekeeping) run alone in their
# jobs: their class refuses a bad value as their one step starts, before it does anything.
LAUNCHPAD: dict[str, type[dg.Config]] = {
    DATASET: DatasetConfig,
    OLD_MODEL: ModelTrainingConfig,
    SIDE_INFO_MODEL: ModelTrainingConfig,
    NEW_MODEL: ModelTrainingConfig,
    TRANSFORMATION: TransformationTrainingConfig,
    BACKFILLED_GALLERY: BackfillConfig,
    EVAL_REPORT: EvalReportConfig,
}


def launch_refusals(run_config: Mapping[str, Any] | None) -> list[Refusal]:
    """The launchpad values of `run_config` that their step's config class refuses, one per step
    (its first bad field), in the order of LAUNCHPAD. Types and unknown keys are Dagster's to
    refuse first; a value of the wrong type found here is refused too."""
    ops = (run_config or {}).get("ops") or {}
    found = []
    for step, cls in LAUNCHPAD.items():
        values = (ops.get(step) or {}).get("config") if isinstance(ops, Mapping) else None
        if not isinstance(values, Mapping):
            continue
        try:
            cls(**values)
        except ValidationError as err:
            refusal = _refusal(err, step)
            found.append(
                Refusal(("ops", step, "config", *refusal.path), refusal.value, refusal.line)
            )
    return found


def require_launchable(run_config: Mapping[str, Any] | None) -> None:
    """Raise LaunchConfigError (the first refusal's line) if any step's config is refused: the
    first step of a run calls it, so that a bad value for a later step is refused before this
    one trains for minutes and replaces its checkpoint."""
    found = launch_refusals(run_config)
    if found:
        more = f" (and {len(found) - 1} more steps)" if len(found) > 1 else ""
        raise LaunchConfigError(found[0].line + more)
