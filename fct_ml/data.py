"""Image datasets for FCT training: loading, validation and deterministic splits.

Every loader returns a :class:`Dataset` holding two :class:`ImageSet` splits of
``(N, C, H, W)`` uint8 images and ``(N,)`` int64 labels. Nothing here downloads
anything: data comes from local files (or, for ``digits``, from the copy that
ships inside scikit-learn). Bad input raises :class:`DataError` with a single
line naming the culprit, so callers can show it to a user unchanged.

Supported specs (loaded by spec with :func:`fct_ml.datasets.load_dataset`):

* ``fashion-mnist`` -- IDX files (plain or ``.gz``), 10 classes, 1x28x28.
* ``digits``        -- scikit-learn's 8x8 digits, 10 classes, 1x8x8.
* ``cifar100``      -- the "python version" ``cifar-100-python/`` folder, 3x32x32.
* ``imagefolder:PATH`` -- one sub-folder per class of ordinary image files.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = [
    "DataError",
    "Dataset",
    "ImageSet",
    "load_imagefolder",
    "parse_class_list",
    "read_idx",
]

DATA_DIR_ENV = "FCT_DATA_DIR"
FASHION_MNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
IMAGEFOLDER_PREFIX = "imagefolder:"


class DataError(ValueError):
    """Bad input data.

    The message is ONE line naming the file/field/item and what was expected.
    Line breaks (e.g. from an embedded library error) are folded into spaces so
    the one-line promise holds whatever gets interpolated.
    """

    def __init__(self, message: object) -> None:
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", str(message)).strip())


# --------------------------------------------------------------------------- #
# Containers
# --------------------------------------------------------------------------- #


# eq=False: the generated __eq__ would compare tensors elementwise and then fail
# on bool(); identity equality (and the default hash) is what we want.
@dataclass(frozen=True, eq=False)
class ImageSet:
    """One split: images and their integer class labels.

    images: (N, C, H, W) uint8, contiguous
    labels: (N,) int64, values in [0, num_classes) (range checked by Dataset)
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if (
            not isinstance(self.images, torch.Tensor)
            or self.images.dtype != torch.uint8
            or self.images.dim() != 4
        ):
            raise DataError(
                "ImageSet.images: expected a (N, C, H, W) uint8 tensor, got"
                f" {_describe(self.images)}"
            )
        if (
            not isinstance(self.labels, torch.Tensor)
            or self.labels.dtype != torch.int64
            or self.labels.dim() != 1
        ):
            raise DataError(
                f"ImageSet.labels: expected a (N,) int64 tensor, got {_describe(self.labels)}"
            )
        if self.images.shape[0] != self.labels.shape[0]:
            raise DataError(
                f"ImageSet: {self.images.shape[0]} images but {self.labels.shape[0]} labels;"
                " expected equal counts"
            )
        # Frozen dataclass: bypass __setattr__ once to normalise the layout, so
        # fingerprint() and downstream .view() calls can rely on contiguity.
        object.__setattr__(self, "images", self.images.contiguous())
        object.__setattr__(self, "labels", self.labels.contiguous())

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor) -> ImageSet:
        """Rows selected by a 1-D integer index tensor or an (N,) bool mask."""
        index = torch.as_tensor(index)
        if index.dim() != 1:
            raise DataError(
                f"ImageSet.subset: expected a 1-D index or mask, got shape {tuple(index.shape)}"
            )
        if index.dtype == torch.bool and index.shape[0] != len(self):
            raise DataError(
                f"ImageSet.subset: mask has {index.shape[0]} entries, expected {len(self)}"
            )
        return ImageSet(self.images[index].contiguous(), self.labels[index].contiguous())

    def with_classes(self, classes: Sequence[int]) -> ImageSet:
        """Rows whose label is in ``classes``; labels keep their original class ids."""
        wanted = sorted({int(c) for c in classes})
        mask = torch.isin(self.labels, torch.tensor(wanted, dtype=torch.int64))
        if not bool(mask.any()):
            raise DataError(f"no items of classes {wanted} in this split ({len(self)} items)")
        return self.subset(mask)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A named labelled image dataset with a train and a test split.

    Both splits share C, H and W; labels are in [0, len(class_names)).
    """

    name: str  # e.g. "fashion-mnist", "digits", "cifar100", "imagefolder:/abs/path"
    class_names: tuple[str, ...]
    train: ImageSet
    test: ImageSet

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        if not self.class_names:
            raise DataError(f"{self.name}: no class names")
        if self.train.images.shape[1:] != self.test.images.shape[1:]:
            raise DataError(
                f"{self.name}: train images are {tuple(self.train.images.shape[1:])} but test"
                f" images are {tuple(self.test.images.shape[1:])}; expected the same (C, H, W)"
            )
        for split_name, split in (("train", self.train), ("test", self.test)):
            _check_label_range(
                split.labels.numpy(), self.num_classes, f"{self.name} {split_name} split"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W)."""
        return int(self.train.images.shape[2]), int(self.train.images.shape[3])

    @property
    def gallery_size(self) -> int:
        """Items of the gallery the base assets store: the test split's (a generated gallery's
        in `fct_ml.augmented.AugmentedDataset`)."""
        return len(self.test)

    def gallery_batches(self, size: int) -> Iterator[ImageSet]:
        """The gallery in order, as ImageSets of at most `size` items: slices of the test split
        here; a generated gallery streams its items instead of holding them."""
        for start in range(0, len(self.test), size):
            yield self.test.subset(torch.arange(start, min(start + size, len(self.test))))

    def fingerprint(self) -> str:
        """sha256 hex digest of name, class names and the four tensors (shape, dtype, bytes).

        Every field is length-prefixed so different splits of the same bytes
        (e.g. moving one image from train to test) cannot collide.
        """
        h = hashlib.sha256()

        def put(blob: bytes) -> None:
            h.update(struct.pack(">Q", len(blob)))
            h.update(blob)

        put(self.name.encode())
        put(repr(self.class_names).encode())
        for t in (self.train.images, self.train.labels, self.test.images, self.test.labels):
            put(f"{t.dtype}{tuple(t.shape)}".encode())
            put(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _check_label_range(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Raise DataError naming the first label outside [0, num_classes) and its index."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{where}: label {int(labels[i])} at index {i} is outside [0, {num_classes})"
            f" ({bad.size} bad labels in total)"
        )


def _env_data_dir() -> Path | None:
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value) if value else None


def _empty_images(channels: int, h: int, w: int) -> torch.Tensor:
    return torch.empty((0, channels, h, w), dtype=torch.uint8)


def _image_set(images: np.ndarray, labels: np.ndarray) -> ImageSet:
    # np.ascontiguousarray also makes read-only/borrowed buffers safe for torch.
    return ImageSet(
        torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
        torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
    )


# --------------------------------------------------------------------------- #
# IDX (MNIST / Fashion-MNIST)
# --------------------------------------------------------------------------- #

_IDX_DTYPES = {
    0x08: "uint8",
    0x09: "int8",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (plain or gzip, detected by content) into a writable uint8 array.

    Layout: 2 zero bytes, dtype byte (only 0x08 = uint8 supported), ndim byte,
    ndim big-endian uint32 dims, then exactly prod(dims) bytes of data.
    Returns an array of shape dims, e.g. (N, H, W) for images, (N,) for labels.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read IDX file: {e.strerror or e}") from None
    if raw[:2] == b"\x1f\x8b":  # gzip magic; plain IDX always starts with 00 00
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt gzip data: {e}") from None

    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(
            f"{path}: bad IDX magic {raw[:4].hex() or '(empty file)'}; expected 0000 0803/0801 (00"
            " 00 dtype ndim)"
        )
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        kind = _IDX_DTYPES.get(dtype_code, "unknown")
        raise DataError(
            f"{path}: unsupported IDX dtype 0x{dtype_code:02x} ({kind}); only 0x08 (uint8) is"
            " supported"
        )
    if ndim == 0:
        raise DataError(f"{path}: IDX header says 0 dimensions; expected at least 1")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(
            f"{path}: truncated IDX header: expected {header_len} bytes for {ndim} dims, found"
            f" {len(raw)}"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    expected = int(np.prod(dims, dtype=np.int64))
    found = len(raw) - header_len
    if found < expected:
        raise DataError(
            f"{path}: truncated IDX data: dims {dims} need {expected} bytes, found {found}"
        )
    if found > expected:
        raise DataError(
            f"{path}: trailing garbage after IDX data: dims {dims} need {expected} bytes, found"
            f" {found} ({found - expected} extra)"
        )
    # .copy(): frombuffer over bytes is read-only, and torch.from_numpy warns on that.
    return (
        np.frombuffer(raw, dtype=np.uint8, count=expected, offset=header_len).reshape(dims).copy()
    )


def _find_idx(directory: Path, base: str) -> Path:
    """``directory/base`` or ``directory/base.gz``, preferring the plain file."""
    for candidate in (directory / base, directory / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"missing {directory / base} (or .gz): install the Debian package dataset-fashion-mnist "
        f"or set {DATA_DIR_ENV} to a folder holding the Fashion-MNIST IDX files"
    )


def _read_idx_pair(images_path: Path, labels_path: Path, num_classes: int) -> ImageSet:
    """Images (N, H, W) + labels (N,) IDX files -> ImageSet with (N, 1, H, W) images."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(
            f"{images_path}: expected 3 IDX dims (N, H, W), found {images.ndim} {images.shape}"
        )
    if labels.ndim != 1:
        raise DataError(
            f"{labels_path}: expected 1 IDX dim (N,), found {labels.ndim} {labels.shape}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"count mismatch: {images_path} has {images.shape[0]} images but {labels_path} has "
            f"{labels.shape[0]} labels"
        )
    _check_label_range(labels, num_classes, str(labels_path))
    return _image_set(images[:, None, :, :], labels.astype(np.int64))


def _fashion_mnist_dir(data_dir: Path | None) -> Path:
    directory = data_dir or _env_data_dir() or FASHION_MNIST_DEFAULT_DIR
    # Accept a general data root too (same convention as cifar100): if the
    # files are not here but a fashion-mnist/ sub-folder exists, use that.
    has_files = any((directory / f"train-images-idx3-ubyte{s}").is_file() for s in ("", ".gz"))
    if not has_files and (directory / "fashion-mnist").is_dir():
        return directory / "fashion-mnist"
    return directory


def load_fashion_mnist(data_dir: Path | None = None) -> Dataset:
    """Fashion-MNIST from IDX files: train (60000, 1, 28, 28), test (10000, 1, 28, 28), 10 classes.

    Folder: ``data_dir``, else ``$FCT_DATA_DIR``, else /usr/share/datasets/fashion-mnist
    (a ``fashion-mnist/`` sub-folder of the chosen folder is also accepted).
    """
    directory = _fashion_mnist_dir(Path(data_dir) if data_dir is not None else None)
    n = len(FASHION_MNIST_CLASSES)
    train = _read_idx_pair(
        _find_idx(directory, "train-images-idx3-ubyte"),
        _find_idx(directory, "train-labels-idx1-ubyte"),
        n,
    )
    test = _read_idx_pair(
        _find_idx(directory, "t10k-images-idx3-ubyte"),
        _find_idx(directory, "t10k-labels-idx1-ubyte"),
        n,
    )
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(
            f"{directory}: train images are {tuple(train.images.shape[2:])} but t10k images are "
            f"{tuple(test.images.shape[2:])}; expected the same size"
        )
    return Dataset("fashion-mnist", FASHION_MNIST_CLASSES, train, test)


# --------------------------------------------------------------------------- #
# scikit-learn digits
# --------------------------------------------------------------------------- #


def load_digits_dataset(data_dir: Path | None = None) -> Dataset:
    """scikit-learn's 1797 8x8 digits as (N, 1, 8, 8) uint8 in 0..255, 30% stratified test split.

    ``data_dir`` is ignored: the data ships inside scikit-learn (no download).
    """
    try:
        # Deferred: scikit-learn (~1 s) only for the digits dataset.
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:  # an extra since the core does not need it
        raise DataError("dataset 'digits' needs scikit-learn: pip install 'fct[digits]'") from None

    bunch = load_digits()
    # Values are 0..16; round(v * 255 / 16) maps them onto the full uint8 range.
    images = np.rint(bunch.images.astype(np.float64) * 255.0 / 16.0).astype(np.uint8)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.3, stratify=labels, random_state=0
    )
    # Sorting keeps each split in the original file order (the split itself is
    # already fixed by random_state); it only makes the layout easier to read.
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return Dataset(
        "digits",
        tuple(str(d) for d in range(10)),
        _image_set(images[train_idx], labels[train_idx]),
        _image_set(images[test_idx], labels[test_idx]),
    )


# --------------------------------------------------------------------------- #
# CIFAR-100 (python version)
# --------------------------------------------------------------------------- #

# numpy moved multiarray to numpy._core in 2.0; take _reconstruct from an
# array's own __reduce__ so this works on both without touching the
# deprecated numpy.core shim.
_np_reconstruct = np.zeros(0, dtype=np.uint8).__reduce__()[0]


def _latin1_encode(obj: object, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Stand-in for ``_codecs.encode`` limited to what pickle protocol 2 needs.

    Python 3 writes ``bytes`` at protocol < 3 as ``_codecs.encode(text, "latin1")``;
    anything else (other codecs can run arbitrary registered code) is refused.
    """
    if (
        not isinstance(obj, str)
        or encoding.replace("-", "").lower() != "latin1"
        or errors != "strict"
    ):
        raise pickle.UnpicklingError(
            f"refused _codecs.encode({type(obj).__name__}, {encoding!r}, {errors!r})"
        )
    return obj.encode("latin1")


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays, builtin containers and scalars.

    Pickle runs whatever callable a file names; CIFAR files come from the
    internet, so every global outside a small allow-list is refused.
    """

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        # encoding="bytes": the real files were written by Python 2, whose str
        # objects (dict keys, numpy buffers) must come back as bytes.
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._path}: refused to unpickle global {module}.{name}; only numpy array"
                " globals are allowed"
            ) from None


def _safe_unpickle(path: Path) -> dict[Any, Any]:
    try:
        with path.open("rb") as f:
            obj = _SafeUnpickler(f, path).load()
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(
            f"missing {path}: expected the CIFAR-100 python version (cifar-100-python/{path.name})"
        ) from None
    except (
        Exception
    ) as e:  # pickle can fail in many ways on corrupt input; report them all the same way
        raise DataError(f"{path}: cannot unpickle: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return obj


def _pickle_field(d: dict[Any, Any], key: str, path: Path) -> Any:
    # encoding="bytes" gives bytes keys for the real files; accept str keys too.
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DataError(f"{path}: missing key {key!r}; found keys {sorted(str(k) for k in d)}")


def _cifar_split(path: Path, num_classes: int) -> ImageSet:
    """CIFAR pickle {data: (N, 3072) uint8, fine_labels: N ints} -> ImageSet of (N, 3, 32, 32)."""
    d = _safe_unpickle(path)
    data = _pickle_field(d, "data", path)
    labels = np.asarray(_pickle_field(d, "fine_labels", path))
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3 * 32 * 32
    ):
        found = (
            f"{data.dtype} array {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise DataError(f"{path}: field 'data' should be a (N, 3072) uint8 array, found {found}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path}: field 'fine_labels' should be a list of ints, found {labels.dtype}"
            f" {labels.shape}"
        )
    if labels.shape[0] != data.shape[0]:
        raise DataError(
            f"{path}: {data.shape[0]} images in 'data' but {labels.shape[0]} 'fine_labels'"
        )
    _check_label_range(labels, num_classes, f"{path} fine_labels")
    # Rows are 1024 R, then 1024 G, then 1024 B values, each plane row-major.
    return _image_set(data.reshape(-1, 3, 32, 32), labels.astype(np.int64))


def _cifar_dir(data_dir: Path | None) -> Path:
    root = data_dir or _env_data_dir()
    if root is None:
        raise DataError(
            f"cifar100 needs a data_dir or {DATA_DIR_ENV} pointing at the cifar-100-python folder "
            "(or its parent); nothing is downloaded"
        )
    for candidate in (root, root / "cifar-100-python"):
        if (candidate / "meta").is_file():
            return candidate
    raise DataError(
        f"no CIFAR-100 meta file in {root} or {root / 'cifar-100-python'}; expected"
        " cifar-100-python/{train,test,meta}"
    )


def load_cifar100(data_dir: Path | None = None) -> Dataset:
    """CIFAR-100 (fine labels) from the python-version pickles: (N, 3, 32, 32) uint8, 50000/10000."""
    directory = _cifar_dir(Path(data_dir) if data_dir is not None else None)
    meta_path = directory / "meta"
    names = _pickle_field(_safe_unpickle(meta_path), "fine_label_names", meta_path)
    if (
        not isinstance(names, list | tuple)
        or not names
        or not all(isinstance(n, bytes | str) for n in names)
    ):
        raise DataError(
            f"{meta_path}: field 'fine_label_names' should be a non-empty list of strings"
        )
    class_names = tuple(n.decode("utf-8") if isinstance(n, bytes) else n for n in names)
    return Dataset(
        "cifar100",
        class_names,
        _cifar_split(directory / "train", len(class_names)),
        _cifar_split(directory / "test", len(class_names)),
    )


# --------------------------------------------------------------------------- #
# Image folder
# --------------------------------------------------------------------------- #


def _read_image(path: Path, size: int) -> tuple[np.ndarray, bool]:
    """One image file -> ((size, size) or (size, size, 3) uint8 array, is_gray)."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now so truncated/corrupt pixel data fails here, not later
            gray = img.mode in ("L", "1")
            img = img.convert("L" if gray else "RGB").resize(
                (size, size), Image.Resampling.BILINEAR
            )
            return np.asarray(img, dtype=np.uint8), gray
    except (
        Exception
    ) as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad files
        raise DataError(
            f"{path}: unreadable image ({type(e).__name__}: {e}); expected a readable PNG, JPEG,"
            " BMP, GIF or WebP file"
        ) from None


def load_imagefolder(path: str | os.PathLike[str], image_size: int = 32) -> Dataset:
    """A folder with one sub-folder per class -> Dataset of (N, C, image_size, image_size) uint8.

    Class ids follow the sorted sub-folder names (hidden entries ignored). All
    images become "L" (C=1) if every file is mode L/1, else "RGB" (C=3), and are
    resized bilinearly. Split: per class, files sorted by name, every 5th one
    (index % 5 == 4) goes to test, the rest to train.
    """
    if image_size < 1:
        raise DataError(f"image_size must be >= 1, got {image_size}")
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"imagefolder {root}: not a directory")
    class_dirs = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )
    if len(class_dirs) < 2:
        raise DataError(
            f"imagefolder {root}: found {len(class_dirs)} class folder(s); expected at least 2"
        )

    arrays: list[np.ndarray] = []
    labels: list[int] = []
    is_test: list[bool] = []
    all_gray = True
    for label, class_dir in enumerate(class_dirs):
        files = sorted(
            (
                p
                for p in class_dir.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
            ),
            key=lambda p: p.name,
        )
        if not files:
            raise DataError(
                f"class folder {class_dir} has no images; expected files ending in"
                f" {', '.join(sorted(IMAGE_SUFFIXES))}"
            )
        for i, file in enumerate(files):
            array, gray = _read_image(file, image_size)
            all_gray &= gray
            arrays.append(array)
            labels.append(label)
            is_test.append(i % 5 == 4)

    if all_gray:
        images = np.stack(arrays)[:, None, :, :]  # (N, 1, S, S)
    else:
        # Per-channel bilinear resize commutes with L->RGB replication, so
        # repeating an L array equals converting that file to RGB first.
        rgb = [a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2) for a in arrays]
        images = np.stack(rgb).transpose(0, 3, 1, 2)  # (N, S, S, 3) -> (N, 3, S, S)
    label_array = np.asarray(labels, dtype=np.int64)
    test_mask = np.asarray(is_test, dtype=bool)
    return Dataset(
        IMAGEFOLDER_PREFIX + str(root),
        tuple(p.name for p in class_dirs),
        _image_set(images[~test_mask], label_array[~test_mask]),
        _image_set(images[test_mask], label_array[test_mask]),
    )


# --------------------------------------------------------------------------- #
# Class lists
# --------------------------------------------------------------------------- #


_CLASS_ITEM = re.compile(r"(\d+)(?:\s*-\s*(\d+))?")


def parse_class_list(text: str, num_classes: int, *, what: str = "class list") -> tuple[int, ...]:
    """Parse "0-4", "1,3,5", "0-2, 7" into sorted unique class ids in [0, num_classes).

    ``what`` names the option in error messages (e.g. "old_classes").
    """
    if num_classes < 1:
        raise DataError(f"{what}: num_classes must be >= 1, got {num_classes}")
    if not text or not text.strip():
        raise DataError(f"{what} is empty: {text!r}; expected e.g. '0-4' or '1,3,5'")
    result: set[int] = set()
    for raw_item in text.split(","):
        item = raw_item.strip()
        match = _CLASS_ITEM.fullmatch(item)
        if match is None:
            raise DataError(f"{what} {text!r}: item {item!r} is not an integer or a range like 2-5")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise DataError(f"{what} {text!r}: reversed range {item!r}; write it as {hi}-{lo}")
        if hi >= num_classes:
            raise DataError(f"{what} {text!r}: class {hi} is out of range [0, {num_classes})")
        result.update(range(lo, hi + 1))
    return tuple(sorted(result))


# --------------------------------------------------------------------------- #
# Validation split
# --------------------------------------------------------------------------- #


def split_validation(
    train: ImageSet, fraction: float, *, seed: int = 0
) -> tuple[ImageSet, ImageSet]:
    """Carve a stratified validation split from the training set: (train minus val, val).

    Every hyper-parameter, preset value, class split and loss weight is chosen on the
    validation split; the test split only reports. The split depends on `seed` and the
    labels alone (not on the run's seed), so every run of a study sees the same one.
    Each class keeps round(fraction * its count) items in validation, at least one.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"validation fraction: expected a number in (0, 1), got {fraction!r}")
    generator = torch.Generator().manual_seed(seed)
    val_index = []
    for c in torch.unique(train.labels).tolist():
        members = (train.labels == c).nonzero().squeeze(1)
        if len(members) < 2:
            raise DataError(
                f"validation split: class {c} has {len(members)} training item(s); expected >= 2"
            )
        k = min(len(members) - 1, max(1, round(fraction * len(members))))
        val_index.append(members[torch.randperm(len(members), generator=generator)[:k]])
    is_val = torch.zeros(len(train), dtype=torch.bool)
    is_val[torch.cat(val_index)] = True
    return train.subset(~is_val), train.subset(is_val)
