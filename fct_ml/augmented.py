"""The augmented gallery: a gallery of any size made from a dataset's training images by seeded
augmentation, generated block by block and never held whole, for measuring the system at scale.

    data = load_dataset("fashion-mnist-augmented:1000000")   # fct_ml.datasets' spec (RECIPES)
    data.gallery_size                                        # 1000000
    for part in data.gallery_batches(4096):                  # ImageSets, in item order
        ...

The dataset's train and test splits are the source dataset's own (the models train as they do
on it); only the gallery the base assets store is generated. Item i is the training image
order[i % S] (order: a seeded permutation of the S training images, so every image is used
before any is used again) with its label, then, on the whole block of items at once:

- a random square crop of `crop_area` of the image's area, resized back to its size, and shifted
  by up to `shift_px` pixels (one bilinear affine grid, fct_ml.augment);
- a mirror image with probability 1/2, only for the classes in `flip_classes` (`FLIPPABLE`);
- Gaussian noise of `noise_std` grey levels, rounded back to uint8: no two items share their
  pixels, even two views of one image under the same crop.

Block k (items [k * block, (k + 1) * block)) draws its randomness from its own generator,
seeded by (seed, k): a block is the same whatever else is generated, so a consumer may stream
the gallery in any batch size and get the same items.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import cached_property

import numpy as np
import torch

from fct_ml.augment import AugmentConfig, augment, to_float
from fct_ml.data import DataError, Dataset, ImageSet

# Bumped whenever the same recipe would generate other pixels (a change here or in
# fct_ml.augment's affine grid): a stored gallery's dataset fingerprint then changes with it.
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class AugmentRecipe:
    """How each gallery item is made from its training image (see the module docstring)."""

    shift_px: int = 2
    crop_area: tuple[float, float] = (0.8, 1.0)  # of the image's area, square crops
    noise_std: float = 4.0  # grey levels (of 255)
    flip_classes: tuple[int, ...] = ()
    seed: int = 0
    block: int = 4096  # items per generator (and per generated ImageSet)

    def __post_init__(self) -> None:
        low, high = self.crop_area
        if not 0.0 < low <= high <= 1.0:
            raise DataError(f"crop_area {self.crop_area}: expected 0 < low <= high <= 1")
        if self.shift_px < 0 or self.noise_std < 0 or self.block < 1:
            raise DataError(
                f"augment recipe: shift_px {self.shift_px}, noise_std {self.noise_std} and block"
                f" {self.block}: expected shift_px >= 0, noise_std >= 0, block >= 1"
            )


@dataclass(frozen=True, eq=False)
class AugmentedGallery:
    """`items` gallery items made from `source` (the training images) by `recipe`."""

    source: ImageSet
    items: int
    recipe: AugmentRecipe = field(default_factory=AugmentRecipe)

    def __post_init__(self) -> None:
        if self.items < 1:
            raise DataError(f"augmented gallery: {self.items} items; expected at least 1")
        if len(self.source) < 1:
            raise DataError("augmented gallery: the source split holds no image")

    def __len__(self) -> int:
        return self.items

    @property
    def blocks(self) -> int:
        return math.ceil(self.items / self.recipe.block)

    @cached_property
    def order(self) -> torch.Tensor:
        """(S,) int64: the training images in the order items use them."""
        generator = torch.Generator().manual_seed(self.recipe.seed)
        return torch.randperm(len(self.source), generator=generator)

    def block(self, k: int) -> ImageSet:
        """Items [k * block, min((k + 1) * block, items)) as (B, C, H, W) uint8 and (B,) labels."""
        if not 0 <= k < self.blocks:
            raise IndexError(f"augmented gallery: block {k} of {self.blocks}")
        r = self.recipe
        start, stop = k * r.block, min((k + 1) * r.block, self.items)
        rows = self.order[torch.arange(start, stop) % len(self.source)]
        labels = self.source.labels[rows]
        x = to_float(self.source.images[rows])  # (B, C, H, W) in [0, 1]
        seed = int(np.random.SeedSequence([r.seed, k]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        x = augment(
            x,
            AugmentConfig(
                crop_scale=r.crop_area, crop_ratio=(1.0, 1.0), translate=r.shift_px / x.shape[-1]
            ),
            generator,
        )
        coin = torch.rand(len(rows), generator=generator) < 0.5
        flip = coin & torch.isin(labels, torch.tensor(r.flip_classes, dtype=labels.dtype))
        x[flip] = x[flip].flip(-1)
        noise = torch.randn(x.shape, generator=generator).mul_(r.noise_std / 255.0)
        images = x.add_(noise).clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
        return ImageSet(images, labels.clone())

    def batches(self) -> Iterator[ImageSet]:
        """Every block in order."""
        for k in range(self.blocks):
            yield self.block(k)

    def fingerprint(self) -> str:
        """sha256 of what decides the items: the source's tensors, `items`, the recipe and the
        generator's version."""
        h = hashlib.sha256()
        for t in (self.source.images, self.source.labels):
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.contiguous().numpy().tobytes())
        h.update(
            json.dumps(
                {"items": self.items, "recipe": asdict(self.recipe), "v": GENERATOR_VERSION},
                sort_keys=True,
            ).encode()
        )
        return h.hexdigest()

    def describe(self, class_names: tuple[str, ...] = ()) -> str:
        """How the items were made, in one paragraph (for results and the dataset's record)."""
        r = self.recipe
        uses = math.ceil(self.items / len(self.source))
        flips = ", ".join(
            class_names[c] if c < len(class_names) else str(c) for c in r.flip_classes
        )
        return (
            f"{self.items:,} items from the {len(self.source):,} training images, each image used"
            f" {'at most ' if self.items % len(self.source) else ''}{uses} time(s) in a seeded"
            f" order; each item a random square crop of {r.crop_area[0]:.0%}-{r.crop_area[1]:.0%}"
            f" of the area resized back, shifted by up to {r.shift_px} px, "
            + (f"mirrored with p = 0.5 only for {flips}" if flips else "never mirrored")
            + f", plus Gaussian noise of {r.noise_std:g} grey levels;"
            f" seed {r.seed}, blocks of {r.block:,} items, generated as they are stored"
        )


@dataclass(frozen=True, eq=False)
class AugmentedDataset(Dataset):
    """A Dataset whose gallery is generated (`gallery`), not its test split."""

    gallery: AugmentedGallery

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.gallery, AugmentedGallery):
            raise DataError(f"{self.name}: no augmented gallery")
        if self.gallery.source.images.shape[1:] != self.train.images.shape[1:]:
            raise DataError(
                f"{self.name}: gallery images are {tuple(self.gallery.source.images.shape[1:])},"
                f" the training images {tuple(self.train.images.shape[1:])}; expected the same"
            )

    @property
    def gallery_size(self) -> int:
        return len(self.gallery)

    def gallery_batches(self, size: int) -> Iterator[ImageSet]:
        """The generated gallery in item order, in ImageSets of at most `size` items."""
        images: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        held = 0
        for block in self.gallery.batches():
            images.append(block.images)
            labels.append(block.labels)
            held += len(block)
            while held >= size:
                all_images, all_labels = torch.cat(images), torch.cat(labels)
                yield ImageSet(all_images[:size], all_labels[:size])
                images, labels = [all_images[size:]], [all_labels[size:]]
                held -= size
        if held:
            yield ImageSet(torch.cat(images), torch.cat(labels))

    def fingerprint(self) -> str:
        return hashlib.sha256(
            (super().fingerprint() + self.gallery.fingerprint()).encode()
        ).hexdigest()

    def describe(self) -> str:
        return self.gallery.describe(self.class_names)


def augmented(data: Dataset, items: int, recipe: AugmentRecipe) -> AugmentedDataset:
    """`data` with a gallery of `items` items made from its training split by `recipe`; the
    name becomes `<name>-augmented:<items>` (the spec it is loaded by)."""
    return AugmentedDataset(
        f"{data.name}-augmented:{items}",
        data.class_names,
        data.train,
        data.test,
        gallery=AugmentedGallery(data.train, items, recipe),
    )


# Each source dataset's recipe (fct_ml.datasets registers `<name>-augmented:ITEMS` for each).
RECIPES = {
    # Mirrored: the classes whose mirror image is still an item of the class as Fashion-MNIST
    # shows it. It photographs every sandal, sneaker and ankle boot (5, 7, 9) with its toe to the
    # left: a mirrored shoe is an image the catalogue never holds, and the gallery should look
    # like the catalogue. Tops, trousers, dresses, coats, shirts and bags are left-right
    # symmetric up to details (a pocket, a zip) whose side varies among the real images anyway.
    "fashion-mnist": AugmentRecipe(flip_classes=(0, 1, 2, 3, 4, 6, 8)),
    # scikit-learn's 8x8 digits (the fast tests' gallery): a pixel is an eighth of the image, and
    # no digit is mirrored (a mirrored 2 is no digit).
    "digits": AugmentRecipe(shift_px=1),
}
