"""Tests for fct_ml.data: loaders of real on-disk formats, validation errors, splits."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fct_ml.data import (
    DataError,
    Dataset,
    ImageSet,
    load_imagefolder,
    parse_class_list,
    read_idx,
    split_validation,
)
from fct_ml.datasets import DATASETS, load_dataset

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def assert_one_line_naming(err: pytest.ExceptionInfo[DataError], *names: str) -> str:
    """The error message is one line and mentions every culprit name."""
    message = str(err.value)
    assert "\n" not in message
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    return message


# --------------------------------------------------------------------------- #
# IDX files
# --------------------------------------------------------------------------- #


def idx_bytes(array: np.ndarray, *, dtype_code: int = 0x08) -> bytes:
    """Hand-built IDX: 00 00 dtype ndim, big-endian uint32 dims, raw uint8 data."""
    header = bytes([0, 0, dtype_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data, mtime=0))
    else:
        path.write_bytes(data)
    return path


def write_fake_fashion(
    directory: Path, n_train: int = 12, n_test: int = 5, size: int = 4, gz: bool = False
) -> None:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    write_idx(
        directory / "train-images-idx3-ubyte", rng.integers(0, 256, (n_train, size, size)), gz=gz
    )
    write_idx(directory / "train-labels-idx1-ubyte", np.arange(n_train) % 10, gz=gz)
    write_idx(
        directory / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, size, size)), gz=gz
    )
    write_idx(directory / "t10k-labels-idx1-ubyte", np.arange(n_test) % 10, gz=gz)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_plain_and_gz(tmp_path: Path, gz: bool) -> None:
    images = np.arange(3 * 2 * 5, dtype=np.uint8).reshape(3, 2, 5)
    path = write_idx(tmp_path / "imgs", images, gz=gz)
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (3, 2, 5)
    np.testing.assert_array_equal(out, images)
    assert out.flags.writeable


def test_read_idx_truncated(tmp_path: Path) -> None:
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((4, 3, 3)))[:-5])
    with pytest.raises(DataError) as err:
        read_idx(path)
    msg = assert_one_line_naming(err, "short-idx3-ubyte", "truncated")
    assert "36" in msg and "31" in msg  # expected vs found byte counts


def test_read_idx_truncated_gz(tmp_path: Path) -> None:
    path = tmp_path / "short.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 3, 3)))[:-1]))
    with pytest.raises(DataError) as err:
        read_idx(path)
    assert_one_line_naming(err, "short.gz", "truncated")


def test_read_idx_trailing_garbage(tmp_path: Path) -> None:
    path = tmp_path / "long-idx1-ubyte"
    path.write_bytes(idx_bytes(np.zeros(4)) + b"xyz")
    with pytest.raises(DataError) as err:
        read_idx(path)
    assert_one_line_naming(err, "long-idx1-ubyte", "trailing", "3 extra")


def test_read_idx_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "notidx"
    path.write_bytes(b"PK\x03\x04" + bytes(20))
    with pytest.raises(DataError) as err:
        read_idx(path)
    assert_one_line_naming(err, "notidx", "magic")


def test_read_idx_unsupported_dtype(tmp_path: Path) -> None:
    path = tmp_path / "floats"
    path.write_bytes(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 2) + np.zeros(2, ">f4").tobytes())
    with pytest.raises(DataError) as err:
        read_idx(path)
    assert_one_line_naming(err, "floats", "0x0d", "uint8")


def test_fashion_mnist_from_env_dir_plain_and_gz(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_fake_fashion(tmp_path / "plain", gz=False)
    write_fake_fashion(tmp_path / "gz", gz=True)
    monkeypatch.setenv("FCT_DATA_DIR", str(tmp_path / "plain"))
    plain = load_dataset("fashion-mnist")
    monkeypatch.setenv("FCT_DATA_DIR", str(tmp_path / "gz"))
    gzipped = load_dataset("fashion-mnist")
    for ds in (plain, gzipped):
        assert ds.name == "fashion-mnist"
        assert ds.train.images.shape == (12, 1, 4, 4) and ds.train.images.dtype == torch.uint8
        assert ds.test.images.shape == (5, 1, 4, 4)
        assert ds.train.labels.dtype == torch.int64
        assert ds.train.labels.tolist() == [i % 10 for i in range(12)]
        assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
        assert (ds.num_classes, ds.channels, ds.image_size) == (10, 1, (4, 4))
    assert plain.fingerprint() == gzipped.fingerprint()
    # data_dir beats the environment variable
    monkeypatch.setenv("FCT_DATA_DIR", str(tmp_path / "nowhere"))
    assert load_dataset("fashion-mnist", tmp_path / "plain").fingerprint() == plain.fingerprint()


def test_fashion_mnist_missing_file(tmp_path: Path) -> None:
    write_fake_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", tmp_path)
    assert_one_line_naming(
        err, str(tmp_path / "t10k-labels-idx1-ubyte"), "dataset-fashion-mnist", "FCT_DATA_DIR"
    )


def test_fashion_mnist_count_mismatch(tmp_path: Path) -> None:
    write_fake_fashion(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11))
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", tmp_path)
    assert_one_line_naming(err, "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "12", "11")


def test_fashion_mnist_label_out_of_range(tmp_path: Path) -> None:
    write_fake_fashion(tmp_path)
    labels = np.arange(5) % 10
    labels[3] = 10
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", tmp_path)
    assert_one_line_naming(err, "t10k-labels-idx1-ubyte", "label 10", "index 3")


@pytest.mark.skipif(
    not REAL_FASHION_MNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed"
)
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FCT_DATA_DIR", raising=False)
    ds = load_dataset("fashion-mnist")
    assert (len(ds.train), len(ds.test)) == (60000, 10000)
    assert ds.train.images.shape[1:] == (1, 28, 28) and ds.test.images.shape[1:] == (1, 28, 28)
    assert sorted(ds.train.labels.unique().tolist()) == list(range(10))
    assert sorted(ds.test.labels.unique().tolist()) == list(range(10))


# --------------------------------------------------------------------------- #
# digits
# --------------------------------------------------------------------------- #


def test_digits_sizes_split_and_fingerprint() -> None:
    a = load_dataset("digits")
    b = DATASETS["digits"].load(None)
    assert len(a.train) + len(a.test) == 1797
    assert len(a.test) == pytest.approx(0.3 * 1797, abs=1)
    assert a.train.images.shape[1:] == (1, 8, 8) and a.train.images.dtype == torch.uint8
    assert int(a.train.images.max()) == 255 and int(a.train.images.min()) == 0
    assert a.class_names == tuple(str(d) for d in range(10))
    assert sorted(a.test.labels.unique().tolist()) == list(
        range(10)
    )  # stratified: every class in test
    # deterministic across calls
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 64
    # changing one pixel changes the fingerprint
    images = a.train.images.clone()
    images[0, 0, 0, 0] ^= 1
    changed = Dataset(a.name, a.class_names, ImageSet(images, a.train.labels), a.test)
    assert changed.fingerprint() != a.fingerprint()


# --------------------------------------------------------------------------- #
# image folders
# --------------------------------------------------------------------------- #


def write_png(path: Path, mode: str, value: int, size: tuple[int, int] = (6, 5)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, 7)
    Image.new(mode, size, color).save(path)


def test_imagefolder_grayscale_labels_and_split(tmp_path: Path) -> None:
    # "b_cat" sorts after "a_dog": label ids follow sorted folder names, not creation order.
    for i in range(7):
        write_png(tmp_path / "b_cat" / f"img{i:02d}.png", "L", 10 * i)
    for i in range(3):
        write_png(tmp_path / "a_dog" / f"x{i}.PNG", "L", 200 + i)
    (tmp_path / "a_dog" / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden").mkdir()
    ds = load_imagefolder(tmp_path, image_size=8)
    assert ds.name == "imagefolder:" + str(tmp_path.resolve())
    assert ds.class_names == ("a_dog", "b_cat")
    assert ds.channels == 1 and ds.image_size == (8, 8)
    # per class: index % 5 == 4 goes to test -> b_cat img04 only; a_dog has no test image
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert ds.test.labels.tolist() == [1]
    assert int(ds.test.images[0, 0, 0, 0]) == 40
    assert ds.train.images[:3, 0, 0, 0].tolist() == [200, 201, 202]
    # through the spec too, default size 32
    via_spec = load_dataset(f"imagefolder:{tmp_path}")
    assert via_spec.image_size == (32, 32) and via_spec.name == ds.name


def test_imagefolder_mixed_modes_become_rgb(tmp_path: Path) -> None:
    write_png(tmp_path / "gray" / "a.png", "L", 90)
    write_png(tmp_path / "gray" / "b.png", "L", 91)
    write_png(tmp_path / "color" / "a.png", "RGB", 30)
    ds = load_imagefolder(tmp_path, image_size=4)
    assert ds.channels == 3 and ds.train.images.shape == (3, 3, 4, 4)
    assert ds.train.images[0, :, 0, 0].tolist() == [30, 225, 7]  # "color" sorts first
    assert ds.train.images[1, :, 0, 0].tolist() == [90, 90, 90]


@pytest.mark.parametrize("kind", ["random-bytes", "truncated-png"])
def test_imagefolder_unreadable_image(tmp_path: Path, kind: str) -> None:
    write_png(tmp_path / "a" / "ok.png", "RGB", 1)
    write_png(tmp_path / "b" / "ok.png", "RGB", 2)
    bad = tmp_path / "b" / "zbad.png"
    if kind == "random-bytes":
        bad.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    else:
        noise = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(noise).save(bad)
        data = bad.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as err:
        load_imagefolder(tmp_path)
    assert_one_line_naming(err, str(bad))


def test_imagefolder_empty_class_and_too_few_classes(tmp_path: Path) -> None:
    write_png(tmp_path / "a" / "ok.png", "L", 1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError) as err:
        load_imagefolder(tmp_path)
    assert_one_line_naming(err, str(tmp_path / "empty"), "no images")

    (tmp_path / "empty" / "readme.txt").unlink()
    (tmp_path / "empty").rmdir()
    with pytest.raises(DataError) as err:
        load_imagefolder(tmp_path)
    assert_one_line_naming(err, str(tmp_path), "at least 2")


# --------------------------------------------------------------------------- #
# CIFAR-100
# --------------------------------------------------------------------------- #


def write_fake_cifar(root: Path, n_train: int = 20, n_test: int = 10, n_classes: int = 5) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        batch = {
            b"filenames": [f"img{i}.png".encode() for i in range(n)],
            b"fine_labels": [i % n_classes for i in range(n)],
            b"coarse_labels": [0] * n,
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {
        b"fine_label_names": [f"class{c}".encode() for c in range(n_classes)],
        b"coarse_label_names": [b"all"],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def test_cifar100_fake_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_fake_cifar(tmp_path)
    from_parent = load_dataset("cifar100", tmp_path)
    from_folder = load_dataset("cifar100", folder)
    monkeypatch.setenv("FCT_DATA_DIR", str(tmp_path))
    from_env = load_dataset("cifar100")
    ds = from_parent
    assert ds.name == "cifar100" and ds.class_names == tuple(f"class{c}" for c in range(5))
    assert ds.train.images.shape == (20, 3, 32, 32) and ds.test.images.shape == (10, 3, 32, 32)
    assert ds.train.labels.tolist() == [i % 5 for i in range(20)]
    # channel-major layout: row 0's first 1024 bytes are the red plane
    raw = pickle.loads((folder / "train").read_bytes())[b"data"]
    np.testing.assert_array_equal(ds.train.images[0, 0].numpy().ravel(), raw[0, :1024])
    np.testing.assert_array_equal(ds.train.images[0, 2].numpy().ravel(), raw[0, 2048:])
    assert from_folder.fingerprint() == ds.fingerprint() == from_env.fingerprint()


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_cifar100_malicious_pickle_refused(tmp_path: Path) -> None:
    folder = write_fake_cifar(tmp_path)
    marker = tmp_path / "pwned"
    (folder / "train").write_bytes(pickle.dumps({b"data": _Evil(marker)}, protocol=2))
    with pytest.raises(DataError) as err:
        load_dataset("cifar100", folder)
    assert_one_line_naming(err, str(folder / "train"), "system", "refused")
    assert not marker.exists()


def test_cifar100_missing_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FCT_DATA_DIR", raising=False)
    with pytest.raises(DataError) as err:
        load_dataset("cifar100")
    assert_one_line_naming(err, "FCT_DATA_DIR")
    with pytest.raises(DataError) as err:
        load_dataset("cifar100", tmp_path)
    assert_one_line_naming(err, str(tmp_path), "meta")


# --------------------------------------------------------------------------- #
# class lists, ImageSet, registry
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0-4", (0, 1, 2, 3, 4)),
        ("1,3,5,7,9", (1, 3, 5, 7, 9)),
        ("0-2,7", (0, 1, 2, 7)),
        (" 7 , 0 - 2 ,1 ", (0, 1, 2, 7)),
        ("3,3,2-3", (2, 3)),
        ("0-9", tuple(range(10))),  # all classes is allowed
        ("4-4", (4,)),
    ],
)
def test_parse_class_list(text: str, expected: tuple[int, ...]) -> None:
    assert parse_class_list(text, 10) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        # Each fragment names the reason (and the culprit item), not just the input text.
        ("", "class list is empty"),
        ("   ", "class list is empty"),
        ("1,x", "item 'x' is not an integer or a range"),
        ("1.5", "item '1.5' is not an integer or a range"),
        ("1,,2", "item '' is not an integer or a range"),
        ("-1", "item '-1' is not an integer or a range"),
        ("5-2", "reversed range '5-2'; write it as 2-5"),
        ("0-10", "class 10 is out of range [0, 10)"),
        ("12", "class 12 is out of range [0, 10)"),
    ],
)
def test_parse_class_list_errors(text: str, fragment: str) -> None:
    with pytest.raises(DataError) as err:
        parse_class_list(text, 10)
    message = assert_one_line_naming(err, fragment)
    assert repr(text) in message


def test_parse_class_list_names_option() -> None:
    with pytest.raises(DataError) as err:
        parse_class_list("", 10, what="old_classes")
    assert_one_line_naming(err, "old_classes is empty")


def test_imageset_subset_and_with_classes() -> None:
    images = torch.arange(6 * 1 * 2 * 2, dtype=torch.uint8).reshape(6, 1, 2, 2)
    labels = torch.tensor([0, 3, 1, 3, 2, 0])
    s = ImageSet(images, labels)
    assert len(s) == 6
    kept = s.with_classes([3, 0])
    assert kept.labels.tolist() == [0, 3, 3, 0]  # original ids, original order
    assert torch.equal(kept.images, images[[0, 1, 3, 5]]) and kept.images.is_contiguous()
    assert s.subset(torch.tensor([4, 2])).labels.tolist() == [2, 1]
    assert s.subset(labels == 3).labels.tolist() == [3, 3]
    with pytest.raises(DataError) as err:
        s.with_classes([5, 4])
    assert_one_line_naming(err, "[4, 5]", "no items")


def test_imageset_and_dataset_validation() -> None:
    with pytest.raises(DataError):
        ImageSet(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.int64))  # float images
    with pytest.raises(DataError) as err:
        ImageSet(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))
    assert_one_line_naming(err, "2 images", "3 labels")
    ok = ImageSet(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 2]))
    with pytest.raises(DataError) as err:
        Dataset("toy", ("a", "b"), ok, ok)
    assert_one_line_naming(err, "toy", "label 2", "index 1")


def test_unknown_spec_and_error_is_one_line() -> None:
    with pytest.raises(DataError) as err:
        load_dataset("mnist")
    assert_one_line_naming(err, "'mnist'", "fashion-mnist", "imagefolder:PATH")
    assert isinstance(err.value, ValueError)
    assert "\n" not in str(DataError("a\nb\r\n c"))
    assert set(DATASETS) == {
        "fashion-mnist",
        "digits",
        "cifar100",
        "imagefolder",
        "fashion-mnist-augmented",
        "digits-augmented",
    }


# --------------------------------------------------------------------------- #
# validation split
# --------------------------------------------------------------------------- #


def _labelled(labels: list[int]) -> ImageSet:
    n = len(labels)
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).contiguous()
    return ImageSet(images, torch.tensor(labels, dtype=torch.int64))


def test_split_validation_stratified_disjoint_and_deterministic() -> None:
    # class 0: 10 items -> 2 in validation; class 1: 5 items -> round(1.0) = 1; class 2: 2 -> 1
    train = _labelled([0] * 10 + [1] * 5 + [2] * 2)
    rest, val = split_validation(train, 0.2, seed=0)
    assert sorted(val.labels.tolist()) == [0, 0, 1, 2]
    assert len(rest) == 13
    # every item lands in exactly one split (the image bytes are the item ids 0..16)
    ids = sorted(rest.images.flatten().tolist() + val.images.flatten().tolist())
    assert ids == list(range(17))
    again = split_validation(train, 0.2, seed=0)[1]
    assert again.images.flatten().tolist() == val.images.flatten().tolist()
    other = split_validation(train, 0.2, seed=1)[1]
    assert sorted(other.labels.tolist()) == [0, 0, 1, 2]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_validation_bad_fraction(fraction: float) -> None:
    with pytest.raises(DataError, match="validation fraction"):
        split_validation(_labelled([0, 0, 1, 1]), fraction)


def test_split_validation_class_with_one_item() -> None:
    with pytest.raises(DataError, match="class 1 has 1 training item"):
        split_validation(_labelled([0, 0, 1]), 0.5)
