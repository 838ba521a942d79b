"""Resources: where fct keeps its state, which preset sizes the models, which device trains."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import dagster as dg
from pydantic import Field

# Generated state lives under the checkout's data/ (git-ignored) unless the environment says
# otherwise.
DATA_ROOT = Path(__file__).resolve().parent.parent / "data"


class FctResource(dg.ConfigurableResource):
    """Storage locations, the training preset and the device, for every fct asset."""

    lancedb_uri: str = Field(
        default_factory=lambda: os.environ.get("FCT_LANCEDB_URI", str(DATA_ROOT / "lancedb")),
        description=(
            "LanceDB database: a folder, or an object-store URI such as s3://bucket/fct. Env"
            " FCT_LANCEDB_URI."
        ),
    )
    preset: str = Field(
        default_factory=lambda: os.environ.get("FCT_PRESET", "demo"),
        description=(
            # fct_ml.presets.PRESETS (tests/test_registries.py checks this list against it).
            "Sizes of models and training when an asset's config leaves them unset: tiny | demo |"
            " cpu | cpu-hard | paper. Env FCT_PRESET."
        ),
    )
    device: str = Field(
        default_factory=lambda: os.environ.get("FCT_DEVICE", "auto"),
        description="auto (cuda when present) | cpu | cuda | cuda:N. Env FCT_DEVICE.",
    )
    data_dir: str | None = Field(
        default_factory=lambda: os.environ.get("FCT_DATA_DIR"),
        description=(
            "Dataset folder (default: the Debian package's for Fashion-MNIST). Env FCT_DATA_DIR."
        ),
    )

    def connect(self):
        """The LanceDB connection (imported lazily: a code location should load fast)."""
        import lancedb

        try:
            if "://" not in self.lancedb_uri:
                Path(self.lancedb_uri).mkdir(parents=True, exist_ok=True)
            return lancedb.connect(self.lancedb_uri)
        except (
            Exception
        ) as err:  # OSError, lancedb's ValueError (multi-line), ...: one line naming the URI
            cause = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(
                f"lancedb_uri {self.lancedb_uri!r}: cannot open ({cause}); "
                "expected a writable folder or an object-store URI such as s3://bucket/fct"
            ) from err

    def torch_device(self):
        from fct_ml.training import resolve_device

        return resolve_device(self.device)

    def run(self, seed: int):
        """How fct_ml.pipeline's stages run here: the run's seed on this resource's device."""
        from fct_ml.pipeline import Run

        return Run(seed=seed, device=self.torch_device())

    def experiment(self):
        """The preset's ExperimentConfig: defaults for every asset config field left unset."""
        from fct_ml.presets import preset

        return preset(self.preset)

    def load_dataset(self, spec: str, fingerprint: str | None = None):
        """The dataset behind `spec`, refusing one whose content changed since `fingerprint`."""
        data = _load_dataset_cached(spec, self.data_dir)
        if fingerprint is not None and data.fingerprint() != fingerprint:
            from fct_ml.data import DataError

            raise DataError(
                f"dataset {spec}: content fingerprint changed since it was materialised;"
                " re-materialise `dataset`"
            )
        return data


@lru_cache(maxsize=2)
def _load_dataset_cached(spec: str, data_dir: str | None):
    from fct_ml.data import load_dataset

    return load_dataset(spec, data_dir)
