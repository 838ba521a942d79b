"""The dataset registry: every dataset fct can train on, with its default class split and its
augmentation policy, in one place.

A dataset spec is a key of DATASETS (`digits`), for a dataset that takes a path `KEY:PATH`
(`imagefolder:/data/photos`), or for a generated gallery `KEY:ITEMS`
(`fashion-mnist-augmented:1000000`, fct_ml/augmented.py). `load_dataset` below, the CLI help, the launchpad's
field descriptions and the tests read this registry. It imports neither torch nor the loaders
until a dataset is loaded, so a Dagster code location and `fct --help` can list it cheaply:
`fct_ml.data` imports torch, 1.4 to 2.6 s on this project's 2-core machine against 0.01 s for
this module (tests/test_registries.py checks that listing loads no torch). That start-up cost is
why the imports of fct_ml.data below sit inside the functions that load.

Adding a dataset: a loader (e.g. in fct_ml/data.py) returning a `Dataset`, one entry below, and
a test of the loader on a small file of the same format (tests/fct_ml/test_data.py).

Deferred imports: each loader imports fct_ml.data (torch, ~1.5 s) when it loads, so the
registry is read without torch (tests/test_registries.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fct_ml.augment import AugmentConfig, AugmentPolicy

if TYPE_CHECKING:
    from fct_ml.data import Dataset


@dataclass(frozen=True)
class DatasetEntry:
    description: str
    # Loads the dataset; its argument is the data folder (None: FCT_DATA_DIR or the loader's
    # default), or PATH for an entry with `takes_path`.
    load: Callable[[str | None], Dataset]
    augment: AugmentPolicy
    # Classes the old and side-info models see by default ("0-4", "1,3,5"); None: the first half.
    old_classes: str | None = None
    takes_path: bool = False  # spec KEY:PATH
    # A dataset whose gallery is generated, of ITEMS items (spec KEY:ITEMS): (ITEMS, the data
    # folder) -> Dataset; `load` then refuses the spec without ITEMS.
    load_items: Callable[[int, str | None], Dataset] | None = None

    @property
    def argument(self) -> str | None:
        """What follows `KEY:` in a spec of this dataset: PATH, ITEMS or nothing (None)."""
        return "PATH" if self.takes_path else "ITEMS" if self.load_items is not None else None


def _fashion_mnist(data_dir: str | None) -> Dataset:
    from fct_ml.data import load_fashion_mnist

    return load_fashion_mnist(data_dir)


def _digits(data_dir: str | None) -> Dataset:
    from fct_ml.data import load_digits_dataset

    return load_digits_dataset(data_dir)


def _cifar100(data_dir: str | None) -> Dataset:
    from fct_ml.data import load_cifar100

    return load_cifar100(data_dir)


def _augmented(base: str) -> Callable[[int, str | None], Dataset]:
    """The loader of `<base>-augmented:ITEMS`: the base dataset, its gallery ITEMS items made
    from its training images by fct_ml.augmented's recipe for it."""

    def load(items: int, data_dir: str | None) -> Dataset:
        from fct_ml.augmented import RECIPES, augmented  # torch: see the module docstring

        return augmented(DATASETS[base].load(data_dir), items, RECIPES[base])

    return load


def _needs_items(base: str) -> Callable[[str | None], Dataset]:
    def refuse(data_dir: str | None) -> Dataset:
        from fct_ml.data import DataError  # torch: see the module docstring

        raise DataError(f"{base}-augmented: expected {base}-augmented:ITEMS")

    return refuse


def _imagefolder(path: str | None) -> Dataset:
    from fct_ml.data import load_imagefolder

    return load_imagefolder(path)


# Photos and clothes may be flipped; digits must not be (a mirrored 2 is no digit). SimCLR needs
# strong crops and photometric jitter to learn anything useful.
_PHOTOS = AugmentPolicy(
    supervised=AugmentConfig(flip=True, translate=0.1),
    contrastive=AugmentConfig(
        flip=True,
        crop_scale=(0.2, 1.0),
        brightness=0.4,
        contrast=0.4,
        grayscale_p=0.2,
        jitter_p=0.8,
    ),
)
_CLOTHES = AugmentPolicy(
    supervised=AugmentConfig(flip=True, translate=0.1),
    contrastive=AugmentConfig(
        flip=True, crop_scale=(0.3, 1.0), brightness=0.4, contrast=0.4, jitter_p=0.8
    ),
)
_DIGITS = AugmentPolicy(
    supervised=AugmentConfig(translate=0.1),
    contrastive=AugmentConfig(crop_scale=(0.5, 1.0), brightness=0.3, contrast=0.3, jitter_p=0.8),
)

DATASETS: dict[str, DatasetEntry] = {
    "fashion-mnist": DatasetEntry(
        "Fashion-MNIST: 10 classes of clothes, 1x28x28, 60000 train / 10000 test",
        _fashion_mnist,
        _CLOTHES,
        # Sandal, Shirt, Sneaker, Bag, Ankle boot: chosen on the validation split (10 % of the
        # training set), by the criterion fixed beforehand, the largest side-info gain on
        # unseen-class mAP (demo preset, seed 0): 5,6,7,8,9 +3.60, 1,3,5,7,9 +2.61, 0-4 +0.59,
        # 0,2,4,6,8 +0.35 (benchmarks/results/split_choice.md). The old model never sees
        # T-shirt, Pullover or Coat, which look like the Shirt it knows: side-info has to tell
        # them apart.
        old_classes="5,6,7,8,9",
    ),
    "digits": DatasetEntry(
        "scikit-learn's digits: 10 classes, 1x8x8, 1797 images (ships with scikit-learn)",
        _digits,
        _DIGITS,
        old_classes="0-4",
    ),
    "cifar100": DatasetEntry(
        "CIFAR-100 (python version): 100 classes, 3x32x32, 50000 train / 10000 test",
        _cifar100,
        AugmentPolicy(
            supervised=AugmentConfig(flip=True, translate=0.125),
            contrastive=_PHOTOS.contrastive,
        ),
        old_classes="0-49",
    ),
    "imagefolder": DatasetEntry(
        "imagefolder:PATH: one sub-folder of images per class, resized to 32x32",
        _imagefolder,
        _PHOTOS,
        takes_path=True,
    ),
    # `make scale-check`'s gallery: the models train as on fashion-mnist; the gallery is ITEMS
    # distinct images made from the training images by seeded augmentation.
    "fashion-mnist-augmented": DatasetEntry(
        "fashion-mnist-augmented:ITEMS: Fashion-MNIST, its gallery ITEMS augmented copies of the"
        " training images (generated as stored; fct_ml/augmented.py)",
        _needs_items("fashion-mnist"),
        _CLOTHES,
        old_classes="5,6,7,8,9",  # fashion-mnist's split (its models, its reasons)
        load_items=_augmented("fashion-mnist"),
    ),
    # The same on digits, whose models train in seconds: the scale check's fast test.
    "digits-augmented": DatasetEntry(
        "digits-augmented:ITEMS: scikit-learn's digits, its gallery ITEMS augmented copies of the"
        " training images",
        _needs_items("digits"),
        _DIGITS,
        old_classes="0-4",
        load_items=_augmented("digits"),
    ),
}


def dataset_names() -> str:
    """`fashion-mnist | digits | ... | imagefolder:PATH`: the registered specs, for help texts."""
    return " | ".join(f"{k}:{e.argument}" if e.argument else k for k, e in DATASETS.items())


def default_splits() -> str:
    """`fashion-mnist 5,6,7,8,9; digits 0-4; ...`: each dataset's default split, for help texts."""
    return "; ".join(
        f"{k} {e.old_classes or 'the first half'}" for k, e in DATASETS.items() if not e.argument
    )


def entry(spec: str) -> DatasetEntry:
    """The registry entry of a dataset spec or name ("imagefolder:/x" -> imagefolder's)."""
    from fct_ml.data import DataError  # torch: see the module docstring

    key = spec.split(":", 1)[0]
    if key not in DATASETS:
        raise DataError(f"unknown dataset {spec!r}; expected one of {dataset_names()}")
    return DATASETS[key]


def default_old_classes(spec: str, num_classes: int) -> str:
    """The dataset's default class split for the old model: its entry's, else the first half."""
    return entry(spec).old_classes or f"0-{max(num_classes // 2, 1) - 1}"


def policy_for(dataset_name: str) -> AugmentPolicy:
    """The augmentation policy of a dataset, by name or spec ("imagefolder:/x" -> imagefolder's)."""
    key = dataset_name.split(":", 1)[0]
    if key not in DATASETS:
        raise ValueError(
            f"augmentation: no policy for dataset {dataset_name!r} (known: {', '.join(DATASETS)})"
        )
    return DATASETS[key].augment


def load_dataset(spec: str, data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """Load a dataset by spec: a key of DATASETS, KEY:PATH for a dataset that takes a path
    (``imagefolder:PATH``, loaded at 32x32; call fct_ml.data.load_imagefolder for another size),
    or KEY:ITEMS for one whose gallery is generated (``fashion-mnist-augmented:1000000``).

    ``data_dir`` is passed to the other loaders; relative paths are resolved against the working
    directory.
    """
    from fct_ml.data import DataError  # torch: see the module docstring

    found = entry(spec)
    key, _, path = spec.partition(":")
    if found.takes_path:
        if not path.strip():
            raise DataError(f"dataset spec {spec!r}: expected {key}:PATH with a non-empty PATH")
        return found.load(path)
    if found.load_items is not None:
        if not (path.isdecimal() and int(path) > 0):
            raise DataError(
                f"dataset spec {spec!r}: expected {key}:ITEMS with ITEMS a positive whole number"
            )
        return found.load_items(int(path), str(data_dir) if data_dir is not None else None)
    if path:
        raise DataError(f"dataset spec {spec!r}: {key} takes no path; pass a data folder instead")
    return found.load(str(data_dir) if data_dir is not None else None)
