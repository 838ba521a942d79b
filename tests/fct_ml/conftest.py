"""One `fct reproduce` tiny run on digits (seed 0), shared by the CLI and reproduction tests."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import pytest
import torch

from fct_ml import reproduce
from fct_ml.cli import main
from fct_ml.data import load_dataset


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """{code, stdout, stderr, result, out, vectors, labels} of `fct reproduce --preset tiny`.

    `vectors`: the test-set embeddings (old, side, new, bct) and h's outputs (one per variant of
    reproduce.H_VARIANTS) as pipeline.embed and apply_transformation returned them to the run,
    in the order it called them (numpy); `labels`: the test labels."""
    embedded: list[torch.Tensor] = []
    transformed: list[torch.Tensor] = []
    real_embed, real_apply = reproduce.pipeline.embed, reproduce.apply_transformation

    def embed(*args, **kwargs):
        embedded.append(real_embed(*args, **kwargs))
        return embedded[-1]

    def apply_transformation(*args, **kwargs):
        out = real_apply(*args, **kwargs)
        transformed.append(out[0])
        return out

    out_path = tmp_path_factory.mktemp("run") / "sub" / "result.json"
    argv = ["reproduce", "--dataset", "digits", "--preset", "tiny", "--seed", "0"]
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reproduce.pipeline, "embed", embed)
        patch.setattr(reproduce, "apply_transformation", apply_transformation)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main([*argv, "--out", str(out_path), "--quiet"])
    vectors = dict(zip(("old", "side", "new", "bct"), embedded))
    vectors.update(zip(reproduce.H_VARIANTS, transformed))
    return {
        "code": code,
        "stdout": stdout.getvalue(),
        "stderr": stderr.getvalue(),
        "result": json.loads(out_path.read_text()) if out_path.exists() else None,
        "out": out_path,
        "vectors": {name: v.numpy() for name, v in vectors.items()},
        "calls": (len(embedded), len(transformed)),
        "labels": load_dataset("digits").test.labels.numpy(),
    }
