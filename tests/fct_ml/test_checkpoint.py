"""Checkpoints: safetensors round trip, sha256 refusal, non-checkpoint files, content digest, the
checkpoints an h was trained for."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle

import pytest
import torch

from fct_ml.checkpoint import (
    CheckpointError,
    content_digest,
    load_checkpoint,
    save_checkpoint,
    sha256_file,
    space_id,
)
from fct_ml.models import EmbeddingModel, ModelConfig
from fct_ml.transformation import (
    BindingError,
    TrainedFor,
    Transformation,
    TransformationConfig,
    bind,
    require_trained_for,
    trained_for,
)


def _model(seed: int = 0) -> EmbeddingModel:
    torch.manual_seed(seed)
    return EmbeddingModel(
        ModelConfig(arch="cnn-xs", embed_dim=4, in_channels=1, num_classes=3)
    ).eval()


def test_round_trip_restores_weights_config_and_provenance(tmp_path):
    model = _model()
    info = save_checkpoint(
        tmp_path / "m.safetensors", model, name="old_model", metadata={"run_id": "r1"}
    )
    assert (
        info.sha256
        == sha256_file(info.path)
        == hashlib.sha256((tmp_path / "m.safetensors").read_bytes()).hexdigest()
    )
    assert info.space_id == f"old_model@{info.sha256[:12]}" == space_id("old_model", info.sha256)
    loaded, meta = load_checkpoint(info.path, info.sha256)
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(model(x), loaded(x))
    assert (
        meta["config"]["embed_dim"] == 4
        and meta["provenance"] == {"run_id": "r1"}
        and meta["kind"] == "embedding_model"
    )


def test_transformation_round_trip(tmp_path):
    h = Transformation(
        TransformationConfig(
            old_dim=3, side_info_dim=2, new_dim=4, branch_width=4, inner_width=4, uncertainty=True
        )
    ).eval()
    info = save_checkpoint(tmp_path / "h.safetensors", h, name="transformation:v2")
    loaded, _ = load_checkpoint(info.path, info.sha256)
    old, side = torch.rand(5, 3), torch.rand(5, 2)
    assert torch.equal(h(old, side), loaded(old, side))
    assert loaded.sigma_head is not None


def test_sha256_mismatch_is_refused_before_parsing(tmp_path):
    info = save_checkpoint(tmp_path / "m.safetensors", _model(), name="old_model")
    with pytest.raises(CheckpointError, match="differs from the recorded") as err:
        load_checkpoint(info.path, "0" * 64)
    assert "m.safetensors" in str(err.value) and "\n" not in str(err.value)


def test_a_pickle_is_not_a_checkpoint(tmp_path):
    # A pickled object (which could run code on load) is refused: nothing is unpickled.
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"weight": [1, 2, 3]}))
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        load_checkpoint(path, sha256_file(path))


def test_missing_file_and_unknown_module(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors", None)
    with pytest.raises(CheckpointError, match="cannot checkpoint a Linear"):
        save_checkpoint(tmp_path / "x.safetensors", torch.nn.Linear(2, 2), name="x")


def test_content_digest_tracks_weights_not_files():
    a, b = _model(0), _model(0)
    assert content_digest(a) == content_digest(b)
    with torch.no_grad():
        b.classifier.weight[0, 0] += 1.0
    assert content_digest(a) != content_digest(b)


@pytest.mark.parametrize("change", ["other_shapes", "no_config"])
def test_weights_that_do_not_fit_the_config_are_refused_in_one_line(tmp_path, change):
    # A header that describes another model than the tensors: inner width 8 in the header, 4 in
    # the weights; or no config at all (the default config's widths differ from the weights too).
    from safetensors.torch import save as save_safetensors

    small = TransformationConfig(
        old_dim=3, side_info_dim=2, new_dim=4, branch_width=4, inner_width=4
    )
    h = Transformation(small)
    header = {"kind": "transformation", "name": "h", "provenance": "{}"}
    if change == "other_shapes":
        header["config"] = json.dumps({**dataclasses.asdict(small), "inner_width": 8})
    blob = save_safetensors({k: v.contiguous() for k, v in h.state_dict().items()}, metadata=header)
    path = tmp_path / "h.safetensors"
    path.write_bytes(blob)
    with pytest.raises(CheckpointError, match=r"state dict does not match its config") as err:
        load_checkpoint(path, hashlib.sha256(blob).hexdigest())
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_a_transformation_saved_before_depth_and_rank_existed_loads(tmp_path):
    # Its config has no inner_depth or inner_rank: the defaults (2, full rank) are its layout,
    # so its tensors fit the h they build.
    from safetensors.torch import save as save_safetensors

    small = TransformationConfig(
        old_dim=3, side_info_dim=2, new_dim=4, branch_width=4, inner_width=4, uncertainty=True
    )
    h = Transformation(small).eval()
    before = {
        k: v for k, v in dataclasses.asdict(small).items() if k not in ("inner_depth", "inner_rank")
    }
    header = {
        "kind": "transformation",
        "name": "h",
        "provenance": "{}",
        "config": json.dumps(before),
    }
    blob = save_safetensors({k: v.contiguous() for k, v in h.state_dict().items()}, metadata=header)
    path = tmp_path / "h.safetensors"
    path.write_bytes(blob)
    loaded, meta = load_checkpoint(path, hashlib.sha256(blob).hexdigest())
    assert loaded.config == small and "inner_depth" not in meta["config"]
    old, side = torch.rand(5, 3), torch.rand(5, 2)
    with torch.no_grad():
        assert torch.equal(
            h.forward_with_sigma(old, side)[1], loaded.forward_with_sigma(old, side)[1]
        )
        assert torch.equal(h(old, side), loaded(old, side))


def test_an_h_carries_the_checkpoints_it_was_trained_for(tmp_path):
    # The binding travels in h's checkpoint (not in its weights: the content digest is h's
    # alone), and a loaded h refuses other spaces with one line naming both.
    h = Transformation(
        TransformationConfig(old_dim=3, side_info_dim=2, new_dim=4, branch_width=4, inner_width=4)
    ).eval()
    unbound = save_checkpoint(tmp_path / "plain.safetensors", h, name="transformation:v2")
    assert trained_for(load_checkpoint(unbound.path, unbound.sha256)[0]) is None
    digest = content_digest(h)
    spaces = TrainedFor("old_model@aaa", "side_info_model@bbb", "new_model:v2@ccc")
    info = save_checkpoint(tmp_path / "h.safetensors", bind(h, spaces), name="transformation:v2")
    assert info.sha256 != unbound.sha256 and content_digest(h) == digest
    loaded, meta = load_checkpoint(info.path, info.sha256)
    assert trained_for(loaded) == spaces == meta["trained_for"]
    assert require_trained_for(loaded, "h", target="new_model:v2@ccc") == spaces
    with pytest.raises(BindingError) as err:
        require_trained_for(
            loaded, "transformation[v2]", source="old_model@aaa", target="new_model:v2@ddd"
        )
    assert str(err.value) == (
        "transformation[v2] was trained for new_model:v2@ccc (the space it maps into), but"
        " new_model:v2@ddd is there now; train it again"
    )
    with pytest.raises(BindingError, match=r"^h was trained for side_info_model@bbb \(the space"):
        require_trained_for(loaded, "h", side_info="side_info_model@eee")
    with pytest.raises(BindingError, match="^h records no checkpoints it was trained for"):
        require_trained_for(h.__class__(h.config), "h")
