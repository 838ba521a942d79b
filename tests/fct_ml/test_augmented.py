"""fct_ml.augmented: a generated gallery, block by block, checked on a hand-made source."""

from __future__ import annotations

import pytest
import torch

from fct_ml.augmented import RECIPES, AugmentedGallery, AugmentRecipe, augmented
from fct_ml.data import DataError, Dataset, ImageSet
from fct_ml.datasets import DATASETS, dataset_names, load_dataset


def _source(n: int = 6) -> ImageSet:
    """n 1x8x8 images, each a bright column at its own place (no two alike, none symmetric),
    labels 0, 1, 2, 0, 1, 2, ..."""
    images = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
    for i in range(n):
        images[i, 0, :, i % 8] = 200
        images[i, 0, i % 8, :2] = 100
    return ImageSet(images, torch.arange(n) % 3)


def _items(gallery: AugmentedGallery) -> ImageSet:
    blocks = list(gallery.batches())
    return ImageSet(torch.cat([b.images for b in blocks]), torch.cat([b.labels for b in blocks]))


def test_blocks_labels_and_the_order_of_sources():
    source = _source()
    gallery = AugmentedGallery(source, 20, AugmentRecipe(block=8))
    assert (len(gallery), gallery.blocks) == (20, 3)
    assert [len(b) for b in gallery.batches()] == [8, 8, 4]
    items = _items(gallery)
    assert items.images.shape == (20, 1, 8, 8) and items.images.dtype == torch.uint8
    # Item i is source order[i % 6], with that image's label; every source is used before any
    # is used again.
    order = gallery.order
    assert sorted(order.tolist()) == list(range(6))
    expected = source.labels[order[torch.arange(20) % 6]]
    assert items.labels.tolist() == expected.tolist()


def test_the_same_items_in_any_batch_size_and_on_every_call():
    source = _source()
    gallery = AugmentedGallery(source, 20, AugmentRecipe(block=8))
    data = augmented(Dataset("toy", ("a", "b", "c"), source, source), 20, AugmentRecipe(block=8))
    assert data.gallery_size == 20 and data.name == "toy-augmented:20"
    for size in (5, 7, 20, 64):
        parts = list(data.gallery_batches(size))
        assert [len(p) for p in parts][:-1] == [size] * (len(parts) - 1)
        assert torch.equal(torch.cat([p.images for p in parts]), _items(gallery).images), size
    again = AugmentedGallery(source, 20, AugmentRecipe(block=8))
    assert torch.equal(_items(again).images, _items(gallery).images)
    assert again.fingerprint() == gallery.fingerprint()
    # Another seed, size or recipe is another gallery.
    for other in (
        AugmentedGallery(source, 20, AugmentRecipe(block=8, seed=1)),
        AugmentedGallery(source, 21, AugmentRecipe(block=8)),
        AugmentedGallery(source, 20, AugmentRecipe(block=8, noise_std=2.0)),
    ):
        assert other.fingerprint() != gallery.fingerprint()
    assert data.fingerprint() != Dataset("toy", ("a", "b", "c"), source, source).fingerprint()


def test_every_item_is_distinct_and_near_its_source():
    source = _source()
    items = _items(AugmentedGallery(source, 60, AugmentRecipe(block=16)))
    flat = {bytes(i.numpy().tobytes()) for i in items.images}
    assert len(flat) == 60  # ten views of each of six images, no two alike
    # Noise of 4 grey levels and small crops: the mean brightness stays near the source's.
    assert abs(items.images.float().mean() - source.images.float().mean()) < 15


def test_only_the_flippable_classes_are_mirrored():
    # No crop, no shift, no noise: an item is its source image or (class 0 only) its mirror.
    source = _source()
    recipe = AugmentRecipe(crop_area=(1.0, 1.0), shift_px=0, noise_std=0.0, flip_classes=(0,))
    gallery = AugmentedGallery(source, 120, recipe)
    items = _items(gallery)
    rows = gallery.order[torch.arange(120) % 6]
    mirrored = 0
    for item, row in zip(items.images, rows):
        original = source.images[row]
        if int(source.labels[row]) == 0 and not torch.equal(item, original):
            assert torch.equal(item, original.flip(-1))
            mirrored += 1
        else:
            assert torch.equal(item, original)
    assert 10 < mirrored < 30  # p = 1/2 of the 40 items of class 0
    # Fashion-MNIST's shoes (sandal 5, sneaker 7, ankle boot 9) face left in every photo.
    assert set(RECIPES["fashion-mnist"].flip_classes).isdisjoint({5, 7, 9})
    assert RECIPES["digits"].flip_classes == ()  # a mirrored 2 is no digit


def test_bad_recipes_and_sizes_are_refused_in_one_line():
    with pytest.raises(DataError, match=r"crop_area \(0\.0, 1\.0\): expected 0 < low"):
        AugmentRecipe(crop_area=(0.0, 1.0))
    with pytest.raises(DataError, match="block 0: expected"):
        AugmentRecipe(block=0)
    with pytest.raises(DataError, match="0 items; expected at least 1"):
        AugmentedGallery(_source(), 0)


def test_the_registry_names_it_and_its_spec_needs_items():
    assert dataset_names().endswith(" | fashion-mnist-augmented:ITEMS | digits-augmented:ITEMS")
    assert DATASETS["fashion-mnist-augmented"].argument == "ITEMS"
    assert DATASETS["imagefolder"].argument == "PATH" and DATASETS["digits"].argument is None
    for spec in (
        "fashion-mnist-augmented",
        "fashion-mnist-augmented:0",
        "fashion-mnist-augmented:x",
    ):
        with pytest.raises(DataError, match="fashion-mnist-augmented:ITEMS") as err:
            load_dataset(spec)
        assert "\n" not in str(err.value)
    # digits ships with scikit-learn: the spec loads here, its gallery 8x8 like its images.
    data = load_dataset("digits-augmented:50")
    assert (data.name, data.gallery_size, data.num_classes) == ("digits-augmented:50", 50, 10)
    assert data.test is not None and len(data.train) == 1257
    first = next(data.gallery_batches(50))
    assert first.images.shape == (50, 1, 8, 8)


def test_a_plain_dataset_streams_its_test_split_as_the_gallery():
    source = _source(7)
    data = Dataset("toy", ("a", "b", "c"), source, source)
    parts = list(data.gallery_batches(3))
    assert data.gallery_size == 7 and [len(p) for p in parts] == [3, 3, 1]
    assert torch.equal(torch.cat([p.images for p in parts]), source.images)
