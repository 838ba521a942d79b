"""Launchpad configuration: Dagster Config classes mirroring fct_ml's dataclasses.

Fields left unset (None) take the preset's value (resource `fct`, setting `preset`), so the
launchpad works with no YAML at all and every field says what it changes.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

import dagster as dg
from pydantic import Field, ValidationError, ValidationInfo, field_validator

from fct_ml.backbones import backbone_names
from fct_ml.datasets import dataset_names, default_splits


class LaunchConfigError(dg.DagsterError):
    """A launchpad value that cannot be right: one line naming the field, the bound and the value.

    A Dagster error on purpose: Dagster passes those through to the UI and the GraphQL client as
    they are, where any other error raised while the run config is resolved becomes a generic
    "config mapping function ... has thrown an unexpected error"."""


def _one_line(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "(config)"
    value = first.get("input")
    shown = "NaN" if isinstance(value, float) and math.isnan(value) else repr(value)
    bound = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    limits = [f"{op} {first['ctx'][k]}" for k, op in bound.items() if k in first.get("ctx", {})]
    if limits:
        why = f"expected {field} {' and '.join(limits)}"
    else:
        why = first["msg"][0].lower() + first["msg"][1:]
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{where}.{field}: {shown} refused: {why}{more}"


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
        raise LaunchConfigError(_one_line(err, where)) from None


class DatasetConfig(dg.Config):
    """Which data the base assets are built from."""

    dataset: str = Field(
        "fashion-mnist",
        description=f"{dataset_names()}. The test split is the gallery.",
    )
    old_classes: str | None = Field(
        None,
        description=(
            "Classes the old and side-info models may see, as ranges or lists (0-4, 1,3,5). The"
            f" new model and h see all. Unset: the dataset's default ({default_splits()})."
        ),
    )


class ModelTrainingConfig(dg.Config):
    """An embedding model and how long to train it (old, side-info and new models)."""

    arch: str | None = Field(
        None,
        description=f"Backbone: {backbone_names()}. Unset: the preset's.",
    )
    embed_dim: int | None = Field(
        None,
        ge=1,
        le=65536,
        description="Embedding dimension. Unset: the preset's (128 as the paper).",
    )
    epochs: int | None = Field(
        None, ge=1, le=100_000, description="Training epochs. Unset: the preset's."
    )
    # At most 10**12: each stage seeds torch with seed * 1000 + k, and torch takes 64 bits.
    seed: int = Field(
        0,
        ge=0,
        le=10**12,
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
        0, ge=0, description="TorchScript input: resize to N x N pixels (0: the gallery's size)."
    )
    preprocess_channels: int = Field(
        0, ge=0, le=3, description="TorchScript input channels: 1 or 3 (0: the gallery's)."
    )
    preprocess_mean: float = Field(
        0.0, description="TorchScript input: (x - mean) / std, x in [0, 1]."
    )
    preprocess_std: float = Field(1.0, gt=0, description="TorchScript input: see preprocess_mean.")


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
        le=65536,
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
        le=65536,
        description=(
            "0: full rank. r > 0: each inner_width x inner_width layer factorised through rank r"
            " (needs inner_depth >= 2). Unset: the preset's."
        ),
    )
    epochs: int | None = Field(
        None, ge=1, le=100_000, description="Training epochs (paper: 80). Unset: the preset's."
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
            " always the old model (direct; refused at backfill if an item has no old embedding)."
        ),
    )
    seed: int = Field(
        0,
        ge=0,
        le=10**12,  # as the new model's seed
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
        le=2**63 - 1,
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
        le=2**63 - 1,
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


class PromotionConfig(dg.Config):
    """Which model version to serve."""

    version: str = Field(
        description=(
            "Model version to promote, e.g. v2. Its blocking checks must have passed on its latest"
            " materialisations."
        )
    )
