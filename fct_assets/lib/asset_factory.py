"""How fct declares an asset: the code version (a digest of the asset's own code), owners and
tags, the base and upgrade asset decorators, and the output of an asset that holds a model.

Shared by the base, upgrade and ingest domains, so each declares its assets alike."""

from typing import Any

import dagster as dg

from fct_assets.lib.config import ModelTrainingConfig
from fct_assets.lib.cost import measured
from fct_assets.lib.keys import GPU_POOL
from fct_assets.lib.partitions import model_version
from fct_assets.lib.provenance import code_version, history_metadata, source_version

# The checkout's git commit, recorded as metadata on every materialisation (lineage). Each asset's
# Dagster code version is the digest of its own code instead (`versioned`).
CODE_VERSION = code_version()


# Who answers for these assets, as the UI shows it (Dagster takes "team:NAME" or an e-mail).
OWNERS = ["team:retrieval"]


# The kind of artifact, as a tag: the catalog filters on it ("fct/artifact=model").
ARTIFACT = {"pytorch": "model", "lancedb": "table", "python": "record"}


def versioned(decorator, **kwargs):
    """`decorator(**kwargs)` (dg.asset, dg.graph_asset) with the code version set to the digest of
    the decorated function's source and of the project code it reaches (provenance.source_version)."""

    def decorate(fn):
        # A plain asset records what it cost (cost/wall_s, cost/cpu_s, cost/peak_rss_mb); the graph
        # asset's ops record their own (backfill_ops).
        compute = measured(fn) if decorator is dg.asset else fn
        return decorator(code_version=source_version(fn), **kwargs)(compute)

    return decorate


def base_asset(*, kind: str, io_manager_key: str, runs_model: bool = False):
    """An asset built once per old model (group `base`, unpartitioned). One that trains or runs a
    model is in the `gpu` pool (and deploy/k8s_executor.yaml gives its step a GPU)."""
    return versioned(
        dg.asset,
        group_name="base",
        kinds={kind},
        io_manager_key=io_manager_key,
        pool=GPU_POOL if runs_model else None,
        owners=OWNERS,
        tags={"fct/artifact": ARTIFACT[kind]},
    )


def upgrade_asset(
    *, kind: str, io_manager_key: str, runs_model: bool = False, output_required: bool = True
):
    """An asset of one upgrade: partitioned by model version, materialised by itself (eager) when
    a version is added or an input changes; in the `gpu` pool when it trains or runs a model."""
    return versioned(
        dg.asset,
        output_required=output_required,
        group_name="upgrade",
        kinds={kind},
        partitions_def=model_version,
        io_manager_key=io_manager_key,
        pool=GPU_POOL if runs_model else None,
        automation_condition=dg.AutomationCondition.eager(),
        owners=OWNERS,
        tags={"fct/artifact": ARTIFACT[kind]},
    )


def preset_overrides(exp, config, model: str, train: str):
    """The preset `exp` with the launchpad's choices for one model (`model`, `train`: the
    ExperimentConfig fields, nested as `a__b`); fields left unset keep the preset's."""
    # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
    from fct_ml.config import replace

    chosen = {
        f"{model}__arch": getattr(config, "arch", None),
        f"{model}__embed_dim": getattr(config, "embed_dim", None),
        f"{model}__inner_width": getattr(config, "inner_width", None),
        f"{model}__inner_depth": getattr(config, "inner_depth", None),
        f"{model}__inner_rank": getattr(config, "inner_rank", None),
        f"{train}__epochs": config.epochs,
    }
    return replace(exp, **{k: v for k, v in chosen.items() if v is not None})


def model_output(model, history, context: dg.AssetExecutionContext, **metadata: Any) -> dg.Output:
    # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
    from fct_ml.checkpoint import content_digest

    digest = content_digest(model)
    return dg.Output(
        model.cpu().eval(),
        data_version=dg.DataVersion(digest[:16]),
        metadata={
            "content_digest": digest,
            "code_version": CODE_VERSION,
            "run_id": context.run.run_id,
            **history_metadata(history),
            **metadata,
        },
    )


def external_output(
    context: dg.AssetExecutionContext, config: ModelTrainingConfig, data, **metadata: Any
) -> dg.Output:
    """A model from outside (config.source checkpoint:PATH | torchscript:PATH), checked on a probe
    batch of the gallery's images; refused with one line, publishing nothing, when it cannot be
    used."""
    # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
    from fct_ml.external import Preprocessing, load_external, parse_source

    source = parse_source(config.source)
    model, digest = load_external(
        source,
        in_channels=data.channels,
        probe=data.test.images[:16],
        embed_dim=config.embed_dim,
        preprocessing=Preprocessing(
            size=config.preprocess_size,
            channels=config.preprocess_channels,
            mean=config.preprocess_mean,
            std=config.preprocess_std,
        ),
        expected_sha256=config.sha256,
    )
    context.log.info(f"{context.asset_key.to_user_string()}: {source} (sha256 {digest}) accepted")
    return model_output(
        model,
        [],
        context,
        source=str(source),
        source_sha256=digest,
        embed_dim=int(model.config.embed_dim),
        **metadata,
    )
