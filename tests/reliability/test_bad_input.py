"""Bad input: every kind is refused with ONE line naming the culprit and what was expected, and
nothing is written (no table, no checkpoint, no partial file). Real code paths, small files in
tmp_path; the serving cases use a real LanceDB folder and a real Dagster instance, built from
tiny random models (no training) so the whole file runs in seconds."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from safetensors.torch import save as save_safetensors

from fct_assets.cli import main as fct_main
from fct_assets.lib import records, storage
from fct_assets.lib.partitions import VersionError, check_version
from fct_assets.lib.resources import FctResource
from fct_assets.upgrade.backfill import backfill_version
from fct_ml.backfill import apply_transformation
from fct_ml.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, sha256_file
from fct_ml.config import ConfigError, from_dict
from fct_ml.data import DataError, parse_class_list
from fct_ml.datasets import load_dataset
from fct_ml.models import EmbeddingModel, ModelConfig, build_model
from fct_ml.presets import preset
from fct_ml.retrieval import retrieve
from fct_ml.trainers import train_transformation
from fct_ml.training import TrainConfig
from fct_ml.transformation import Transformation, TransformationConfig
from tests.support.env import synthetic_store

CATEGORY = "bad input"


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def one_line(err: pytest.ExceptionInfo | BaseException, *names: str) -> str:
    """The error's message, asserted to be one line naming every fragment in `names`."""
    message = str(err.value if isinstance(err, pytest.ExceptionInfo) else err)
    assert message and "\n" not in message and "\r" not in message, repr(message)
    for name in names:
        assert name in message, f"{name!r} not named in {message!r}"
    return message


def tree(root: Path) -> list[tuple[str, int]]:
    """Every path under root with its size (-1 for folders): equal before/after = nothing written."""
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")
    )


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    """An empty working directory for pure-function cases: it must still be empty afterwards."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def write_png(path: Path, value: int, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L").save(path)


def image_folder(root: Path) -> Path:
    for c in ("a", "b"):
        for i in range(3):
            write_png(root / c / f"{i}.png", i)
    return root


def idx_bytes(array: np.ndarray) -> bytes:
    return (
        struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.tobytes()
    )


def fashion_folder(root: Path, *, n_train: int = 6, n_test: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        (root / f"{prefix}-images-idx3-ubyte").write_bytes(
            idx_bytes(rng.integers(0, 256, (n, 4, 4), dtype=np.uint8))
        )
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(
            idx_bytes(np.arange(n, dtype=np.uint8) % 10)
        )
    return root


class _Evil:
    """Unpickling this runs `touch marker`: a loader that executes it has lost."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def small_h(**kw) -> Transformation:
    torch.manual_seed(0)
    cfg = dict(old_dim=4, side_info_dim=4, new_dim=4, branch_width=4, inner_width=4)
    return Transformation(TransformationConfig(**{**cfg, **kw})).eval()


def small_model() -> EmbeddingModel:
    torch.manual_seed(0)
    return EmbeddingModel(
        ModelConfig(arch="cnn-xs", embed_dim=4, in_channels=1, num_classes=10)
    ).eval()


# --------------------------------------------------------------------------- #
# A served gallery: LanceDB gallery_store (item 3's image corrupt), new_model checkpoint,
# gallery_v2, and a Dagster instance recording them, as the assets would have.
# --------------------------------------------------------------------------- #

N_ITEMS = 8
CORRUPT_ITEM = 3
OLD_SPACE, SIDE_SPACE = "old_model@aaaaaaaaaaaa", "side_info_model@bbbbbbbbbbbb"


def _store_batch(n: int = N_ITEMS, corrupt: int | None = CORRUPT_ITEM) -> pa.RecordBatch:
    rng = np.random.default_rng(1)
    images = [storage.encode_png(rng.integers(0, 256, (1, 8, 8), dtype=np.uint8)) for _ in range(n)]
    if corrupt is not None:
        images[corrupt] = b"\x89PNG\r\n\x1a\n" + b"garbage" * 4

    def vec():
        return pa.FixedSizeListArray.from_arrays(pa.array(rng.random(n * 4).astype(np.float32)), 4)

    schema = storage.gallery_store_schema(4, 4, OLD_SPACE, SIDE_SPACE)
    return pa.record_batch(
        [
            pa.array(np.arange(n, dtype=np.int64)),
            pa.array((np.arange(n) % 10).astype(np.int32)),
            pa.array(images, pa.binary()),
            vec(),
            vec(),
            pa.array([OLD_SPACE] * n),
            pa.array([SIDE_SPACE] * n),
        ],
        schema=schema,
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    fct = FctResource(lancedb_uri=str(root / "lancedb"), preset="tiny", device="cpu", data_dir=None)
    db = fct.connect()
    schema = storage.gallery_store_schema(4, 4, OLD_SPACE, SIDE_SPACE)
    published = storage.publish(db, storage.GALLERY_STORE, schema, [_store_batch()])
    store = synthetic_store(published, OLD_SPACE, SIDE_SPACE, 4)
    model = small_model()
    info = save_checkpoint(
        root / "checkpoints" / "new_model" / "v2.safetensors", model, name="new_model:v2"
    )
    new_model = records.Checkpoint(model, info.sha256, info.space_id)
    h = small_h()
    # reembed_fraction=0: no stored image is read, so gallery_v2 is published despite item 3.
    table = backfill_version(fct, "v2", store, h, new_model, 0.0, 4, log=lambda _: None)
    home = root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    instance = dg.DagsterInstance.from_config(str(home))
    instance.add_dynamic_partitions("model_version", ["v2"])
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            "new_model",
            partition="v2",
            metadata={"path": info.path, "sha256": info.sha256, "space_id": info.space_id},
        )
    )
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            "backfilled_gallery",
            partition="v2",
            metadata=table.model_dump(exclude={"ann_params"}),
        )
    )
    return {
        "root": root,
        "fct": fct,
        "db": db,
        "store": store,
        "h": h,
        "new_model": new_model,
        "home": home,
    }


def table_state(db, name: str) -> tuple[int, int]:
    table = db.open_table(name)
    return table.version, table.count_rows()


def table_absent(db, name: str, folder: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        db.open_table(name)
    assert not (folder / f"{name}.lance").exists(), f"a partial {name}.lance folder was left behind"


# --------------------------------------------------------------------------- #
# 1-3. Images
# --------------------------------------------------------------------------- #


def test_imagefolder_corrupt_image(tmp_path, reliability):
    root = image_folder(tmp_path / "imgs")
    bad = root / "b" / "9.png"
    bad.write_bytes(np.random.default_rng(0).bytes(300))  # random bytes named .png
    before = tree(tmp_path)
    with pytest.raises(DataError) as err:
        load_dataset(f"imagefolder:{root}")
    message = one_line(err, str(bad), "unreadable image")
    assert tree(tmp_path) == before
    reliability(
        CATEGORY,
        "corrupt image (random bytes named .png) in an image folder",
        f"refused: {message}",
    )


def test_imagefolder_truncated_png(tmp_path, reliability):
    root = image_folder(tmp_path / "imgs")
    bad = root / "a" / "1.png"
    bad.write_bytes(bad.read_bytes()[:120])  # header intact, pixel data cut
    before = tree(tmp_path)
    with pytest.raises(DataError) as err:
        load_dataset(f"imagefolder:{root}")
    message = one_line(err, str(bad), "unreadable image")
    assert tree(tmp_path) == before
    reliability(CATEGORY, "truncated PNG in an image folder", f"refused: {message}")


def test_stored_image_not_a_png(cwd, reliability):
    with pytest.raises(ValueError) as err:
        storage.decode_png(b"GIF89a this is not a png", 1)
    message = one_line(
        err, "stored image", "not a readable PNG", "b'GIF89a t'", "expected PNG bytes"
    )
    assert not any(cwd.iterdir())
    reliability(
        CATEGORY, "stored image bytes that are not a PNG (decode_png)", f"refused: {message}"
    )


def test_search_unreadable_query_image(served, tmp_path, monkeypatch, capsys, reliability):
    # A wrong-size or wrong-mode query image is resized/converted like the gallery's by design;
    # a file that is no image at all is refused with one line and exit code 1.
    bad = tmp_path / "query.png"
    bad.write_bytes(b"definitely not an image")
    monkeypatch.setenv("DAGSTER_HOME", str(served["home"]))
    monkeypatch.setenv("FCT_LANCEDB_URI", served["fct"].lancedb_uri)
    monkeypatch.setenv("FCT_DEVICE", "cpu")
    before = tree(served["root"] / "lancedb"), tree(tmp_path)
    code = fct_main(["search", "--image", str(bad), "--version", "v2"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("fct: error: ") and "\n" not in err, err
    assert str(bad) in err and "unreadable image (not an image" in err
    assert (tree(served["root"] / "lancedb"), tree(tmp_path)) == before
    reliability(CATEGORY, "fct search --image with an unreadable file", f"refused: {err}")


# --------------------------------------------------------------------------- #
# 4-6. IDX files
# --------------------------------------------------------------------------- #


def test_idx_truncated(tmp_path, reliability):
    folder = fashion_folder(tmp_path / "fm")
    bad = folder / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-10])
    before = tree(tmp_path)
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", folder)
    message = one_line(err, str(bad), "truncated", "need 96 bytes")
    assert tree(tmp_path) == before
    reliability(CATEGORY, "truncated IDX file", f"refused: {message}")


def test_idx_count_mismatch(tmp_path, reliability):
    folder = fashion_folder(tmp_path / "fm")
    labels = folder / "train-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.arange(5, dtype=np.uint8)))  # 6 images, 5 labels
    before = tree(tmp_path)
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", folder)
    message = one_line(
        err, str(folder / "train-images-idx3-ubyte"), str(labels), "6 images", "5 labels"
    )
    assert tree(tmp_path) == before
    reliability(CATEGORY, "IDX images/labels count mismatch", f"refused: {message}")


def test_idx_label_out_of_range(tmp_path, reliability):
    folder = fashion_folder(tmp_path / "fm")
    labels = folder / "t10k-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.array([0, 10, 2], dtype=np.uint8)))
    before = tree(tmp_path)
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", folder)
    message = one_line(err, str(labels), "label 10 at index 1", "[0, 10)")
    assert tree(tmp_path) == before
    reliability(CATEGORY, "IDX label outside the classes", f"refused: {message}")


# --------------------------------------------------------------------------- #
# 7-8. Class splits
# --------------------------------------------------------------------------- #


def test_empty_class_split(cwd, reliability):
    with pytest.raises(DataError) as err:
        parse_class_list("", 10, what="old_classes")
    message = one_line(err, "old_classes", "empty", "expected")
    assert not any(cwd.iterdir())
    reliability(CATEGORY, "empty class split", f"refused: {message}")


def test_class_split_names_missing_class(cwd, reliability):
    with pytest.raises(DataError) as err:
        parse_class_list("0-12", 10, what="old_classes")
    message = one_line(err, "old_classes", "'0-12'", "class 12", "[0, 10)")
    assert not any(cwd.iterdir())
    reliability(
        CATEGORY,
        "class split naming a class that does not exist (0-12 of 10)",
        f"refused: {message}",
    )


# --------------------------------------------------------------------------- #
# 9-12. Vectors
# --------------------------------------------------------------------------- #


def test_nan_in_retrieval_embeddings(cwd, reliability):
    gallery = torch.rand(6, 4)
    gallery[2, 1] = float("nan")
    labels = torch.arange(6) % 2
    with pytest.raises(ValueError) as err:
        retrieve(torch.rand(3, 4), labels[:3], gallery, labels)
    message = one_line(err, "gallery", "NaN")
    assert not any(cwd.iterdir())
    reliability(CATEGORY, "NaN in gallery embeddings given to retrieval", f"refused: {message}")


@pytest.mark.parametrize("field", ["old_embedding", "side_info"])
def test_inf_in_stored_vectors_for_h(field, cwd, reliability):
    old, side = torch.rand(5, 4), torch.rand(5, 4)
    (old if field == "old_embedding" else side)[3, 0] = float("inf")
    with pytest.raises(ValueError) as err:
        apply_transformation(small_h(), old, side)
    message = one_line(err, field, "row 3", "NaN or Inf", "expected finite")
    assert not any(cwd.iterdir())
    reliability(CATEGORY, f"Inf in stored {field} given to h", f"refused: {message}")


def test_nan_in_transformation_training_features(cwd, reliability):
    old = torch.rand(16, 4)
    old[5, 2] = float("nan")
    h = small_h()
    with pytest.raises(ValueError) as err:
        train_transformation(
            old,
            torch.rand(16, 4),
            torch.rand(16, 4),
            torch.arange(16) % 2,
            h.config,
            TrainConfig(epochs=1, batch_size=8),
            device=torch.device("cpu"),
            seed=0,
            progress=False,
        )
    message = one_line(err, "old_embedding", "NaN or Inf")
    assert not any(cwd.iterdir())
    reliability(CATEGORY, "NaN in the transformation's training features", f"refused: {message}")


def test_stored_vector_dims_do_not_match_h(cwd, reliability):
    with pytest.raises(ValueError) as err:
        apply_transformation(small_h(), torch.rand(5, 7), torch.rand(5, 4))
    message = one_line(err, "old_embedding", "expected (N, 4)", "(5, 7)")
    assert not any(cwd.iterdir())
    reliability(CATEGORY, "stored vectors of dim 7 for an h expecting 4", f"refused: {message}")


# --------------------------------------------------------------------------- #
# 13-15. Checkpoints
# --------------------------------------------------------------------------- #


def test_checkpoint_sha256_differs(tmp_path, reliability):
    info = save_checkpoint(tmp_path / "new_model.safetensors", small_model(), name="new_model")
    with open(info.path, "ab") as f:
        f.write(b"\0")  # tampered after its sha256 was recorded
    before = tree(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(info.path, info.sha256)
    message = one_line(err, info.path, "sha256", info.sha256[:12], "differs from the recorded")
    assert tree(tmp_path) == before
    reliability(
        CATEGORY, "checkpoint whose sha256 differs from the recorded one", f"refused: {message}"
    )


def test_checkpoint_is_a_pickle(tmp_path, reliability):
    marker = tmp_path / "pwned"
    path = tmp_path / "new_model.safetensors"
    path.write_bytes(pickle.dumps({"weight": _Evil(marker)}))
    before = tree(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, sha256_file(path))  # even with the right sha256: never unpickled
    message = one_line(err, str(path), "not a safetensors checkpoint")
    assert not marker.exists(), "the pickle's code was executed"
    assert tree(tmp_path) == before
    reliability(
        CATEGORY,
        "checkpoint that is a pickle of code (os.system)",
        f"refused, not executed: {message}",
    )


def test_checkpoint_header_config_unknown_key(tmp_path, reliability):
    model = small_model()
    config = {**json.loads(json.dumps(model.config.__dict__)), "dropout_rate": 0.5}
    blob = save_safetensors(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        metadata={"kind": "embedding_model", "name": "new_model", "config": json.dumps(config)},
    )
    path = tmp_path / "new_model.safetensors"
    path.write_bytes(blob)
    before = tree(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, sha256_file(path))
    message = one_line(err, str(path), "dropout_rate", "unknown key for ModelConfig", "known:")
    assert tree(tmp_path) == before
    reliability(CATEGORY, "checkpoint header config with an unknown key", f"refused: {message}")


# --------------------------------------------------------------------------- #
# 16-18. Configuration
# --------------------------------------------------------------------------- #


def test_unknown_config_key(cwd, reliability):
    with pytest.raises(ConfigError) as err:
        from_dict(ModelConfig, {"archh": "cnn-xs"})
    message = one_line(err, "archh", "unknown key for ModelConfig", "arch")
    assert not any(cwd.iterdir())
    reliability(CATEGORY, "unknown config key (archh)", f"refused: {message}")


def test_ill_typed_config_value(cwd, reliability):
    with pytest.raises(ConfigError) as err:
        from_dict(ModelConfig, {"embed_dim": "128"})
    message = one_line(err, "embed_dim", "expected an integer", "'128'")
    assert not any(cwd.iterdir())
    reliability(CATEGORY, "ill-typed config value (embed_dim: '128')", f"refused: {message}")


@pytest.mark.parametrize("what", ["preset", "arch"])
def test_unknown_preset_or_arch(what, cwd, reliability):
    with pytest.raises(ValueError) as err:
        if what == "preset":
            preset("huge")
        else:
            build_model(from_dict(ModelConfig, {"arch": "resnet9000"}))
    name = "'huge'" if what == "preset" else "'resnet9000'"
    message = one_line(err, what, name, "tiny" if what == "preset" else "cnn-xs")
    assert not any(cwd.iterdir())
    reliability(CATEGORY, f"unknown {what} name", f"refused: {message}")


# --------------------------------------------------------------------------- #
# 19. Model-version names
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "version",
    ["../v2", "v2;rm -rf /", "v2\n", "v2/../../etc", "", "/abs", "v2\x00"],
    ids=["dotdot", "shell", "newline", "slash", "empty", "absolute", "nul"],
)
def test_version_name_with_path_or_shell_characters(version, cwd, reliability):
    with pytest.raises(VersionError) as err:
        check_version(version)
    message = one_line(err, repr(version), "expected a letter")
    with pytest.raises(VersionError):
        storage.version_table(version)  # no table name (nor file path) is ever made from it
    assert not any(cwd.iterdir())
    reliability(CATEGORY, f"model version {version!r}", f"refused: {message}")


def test_cli_add_version_path_name(tmp_path, monkeypatch, capsys, reliability):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    code = fct_main(["add-version", "../x"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("fct: error: ") and "\n" not in err, err
    assert "'../x'" in err and "expected a letter" in err
    assert dg.DagsterInstance.from_config(str(home)).get_dynamic_partitions("model_version") == []
    assert not (tmp_path / "x").exists()
    reliability(CATEGORY, "fct add-version '../x'", f"refused (exit 1, no partition added): {err}")


# --------------------------------------------------------------------------- #
# 20-21. LanceDB
# --------------------------------------------------------------------------- #


def _backfilled_batch(space: str, n: int = 3) -> pa.RecordBatch:
    schema = storage.backfilled_schema(2, "new_model:v9@cccccccccccc")
    return pa.record_batch(
        [
            pa.array(np.arange(n, dtype=np.int64)),
            pa.array(np.zeros(n, np.int32)),
            pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(2 * n, np.float32)), 2),
            pa.array(np.zeros(n, np.float32)),
            pa.array(["transformed"] * n),
            pa.array([space] * n),
        ],
        schema=schema,
    )


@pytest.mark.parametrize("existing", [False, True], ids=["new-table", "existing-table"])
def test_foreign_space_id_refused(existing, tmp_path, reliability):
    db = FctResource(lancedb_uri=str(tmp_path / "db")).connect()
    own, foreign = "new_model:v9@cccccccccccc", "new_model:v8@dddddddddddd"
    schema = storage.backfilled_schema(2, own)
    if existing:
        storage.publish(db, "gallery_v9", schema, [_backfilled_batch(own, 4)])
        before = table_state(db, "gallery_v9")
    # The first batch is of the right space: the foreign one comes mid-stream.
    with pytest.raises(storage.SpaceMismatchError) as err:
        storage.publish(
            db, "gallery_v9", schema, [_backfilled_batch(own), _backfilled_batch(foreign)]
        )
    message = one_line(err, "gallery_v9.space_id", foreign, own)
    if existing:
        assert table_state(db, "gallery_v9") == before
    else:
        table_absent(db, "gallery_v9", tmp_path / "db")
    where = (
        "an existing table (kept its version and rows)" if existing else "a new table (not created)"
    )
    reliability(
        CATEGORY, f"vectors of a foreign space_id published to {where}", f"refused: {message}"
    )


@pytest.mark.parametrize("kind", ["under-a-file", "unknown-scheme"])
def test_unreachable_lancedb_uri(kind, tmp_path, cwd, reliability):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    uri = str(afile / "db") if kind == "under-a-file" else "nosuch://bucket/x"
    with pytest.raises(ValueError) as err:
        FctResource(lancedb_uri=uri).connect()
    message = one_line(err, f"lancedb_uri {uri!r}", "cannot open", "expected")
    assert afile.read_text() == "not a folder" and not any(cwd.iterdir())
    reliability(CATEGORY, f"unreachable LanceDB URI ({kind})", f"refused: {message}")


# --------------------------------------------------------------------------- #
# 22. CIFAR pickle
# --------------------------------------------------------------------------- #


def test_cifar_pickle_forbidden_global(tmp_path, reliability):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    marker = tmp_path / "pwned"
    meta = {b"fine_label_names": [b"a", b"b"]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    (folder / "train").write_bytes(
        pickle.dumps({b"data": _Evil(marker), b"fine_labels": [0]}, protocol=2)
    )
    (folder / "test").write_bytes(
        pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0]}, protocol=2)
    )
    before = tree(tmp_path)
    with pytest.raises(DataError) as err:
        load_dataset("cifar100", tmp_path)
    message = one_line(
        err, str(folder / "train"), "refused to unpickle global", "system", "only numpy"
    )
    assert not marker.exists(), "the pickle's code was executed"
    assert tree(tmp_path) == before
    reliability(
        CATEGORY,
        "CIFAR pickle naming a forbidden global (os.system)",
        f"refused, not executed: {message}",
    )


# --------------------------------------------------------------------------- #
# 23. Corrupt stored image when re-embedding
# --------------------------------------------------------------------------- #


def test_backfill_reembeds_corrupt_stored_image(served, reliability):
    db, folder = served["db"], Path(served["fct"].lancedb_uri)
    before_v2 = table_state(db, "gallery_v2")
    for version in ("v2", "v3"):  # v2's table exists (re-published), v3's does not (first publish)
        with pytest.raises(ValueError) as err:
            backfill_version(
                served["fct"],
                version,
                served["store"],
                served["h"],
                served["new_model"],
                1.0,
                4,
                log=lambda _: None,
            )
        message = one_line(err, f"gallery_store item {CORRUPT_ITEM}", "not a readable PNG")
    assert table_state(db, "gallery_v2") == before_v2
    table_absent(db, "gallery_v3", folder)
    reliability(
        CATEGORY,
        "corrupt stored image re-embedded during backfill",
        f"refused, nothing published (gallery_v2 unchanged, no gallery_v3): {message}",
    )
