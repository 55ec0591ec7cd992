"""training.image_store: decoded once into a uint8 memory map, the same tensors as
caption_data's images, reused by key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_random_images as write_images
from PIL import Image

from training.caption_data import _Images
from training.image_store import ImageStore, image_list_digest


def test_store_matches_caption_data_images_and_is_reused(tmp_path):
    paths = write_images(tmp_path / "img", 5)
    store = ImageStore.build(paths, 24, tmp_path / "cache", progress=False)
    assert store.built and len(store) == 5 and store.image_size == 24
    assert store.array.dtype == np.uint8 and store.array.shape == (5, 24, 24, 3)
    reference = _Images(paths, 24, cache=False)
    for i in range(5):
        torch.testing.assert_close(store[i], reference[i], rtol=0, atol=0)
    again = ImageStore.build(paths, 24, tmp_path / "cache", progress=False)
    assert not again.built
    np.testing.assert_array_equal(again.array, store.array)
    assert ImageStore.build(paths, 32, tmp_path / "cache", progress=False).built  # other size
    assert ImageStore.build(paths[:4], 24, tmp_path / "cache", progress=False).built  # subset


def test_the_key_follows_the_files(tmp_path):
    paths = write_images(tmp_path / "img", 3)
    before = image_list_digest(paths)
    assert image_list_digest(paths[::-1]) != before
    Image.new("RGB", (7, 9), "red").save(paths[1])  # replaced by a file of another size
    assert image_list_digest(paths) != before
    with pytest.raises(ValueError, match="no images"):
        ImageStore.build([], 24, tmp_path / "cache")
