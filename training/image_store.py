"""Resized images of a caption split as one memory-mapped uint8 array, decoded once.

``training.caption_data``'s in-memory cache decodes every image in every DDP rank and keeps
its own copy there (about 17 GB per rank for COCO's 123k images at 224 px). An
:class:`ImageStore` decodes each image once, across all ranks (each decodes its share, in
``num_workers`` DataLoader workers, with a progress bar), into ``root/images-<key>/array.npy``
of shape ``(N, S, S, 3)`` uint8, and later runs open it again: every process maps the same
file, so the operating system's page cache holds it once per machine.

The key is the ordered list of image paths with their sizes in bytes, the side S and the
preprocessing (:data:`PREPROCESSING`: ``bbservice.images.load_image`` + ``resize_image``
without cropping, as ``caption_data`` does); ``store[i]`` gives what ``caption_data``'s
``_Images`` gives: the ImageNet-normalised float32 tensor ``(3, S, S)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from bbservice.images import load_image, normalize, resize_image
from training.sharded_array import Ranks, build_or_open

__all__ = ["PREPROCESSING", "ImageStore", "image_list_digest"]

PREPROCESSING = "load_image+resize_image(crop=False)"


def image_list_digest(paths: Sequence[str | Path]) -> str:
    """sha256 of the ordered image paths and their file sizes (a changed or replaced file of
    another size, a reordering or another subset all give another digest)."""
    digest = hashlib.sha256()
    for p in paths:
        p = Path(p)
        digest.update(f"{p.resolve()}|{p.stat().st_size}\n".encode())
    return digest.hexdigest()


class _Decode(Dataset):
    def __init__(self, paths: Sequence[Path], rows: range, size: int) -> None:
        self.paths, self.rows, self.size = paths, rows, size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> tuple[int, np.ndarray]:
        i = self.rows[k]
        return i, resize_image(load_image(self.paths[i]), self.size)


def _stack(batch):
    index, arrays = zip(*batch, strict=True)
    return np.asarray(index), np.stack(arrays)


class ImageStore:
    """``(N, S, S, 3)`` uint8 images, memory-mapped; ``store[i]`` → float32 ``(3, S, S)``.

    Use :meth:`build` (or open an existing entry with the same key); ``array`` is the raw
    read-only uint8 map.
    """

    def __init__(self, array: np.ndarray, built: bool = False) -> None:
        self.array = array
        self.built = built  # whether the call that made it decoded the images

    @classmethod
    def build(
        cls,
        paths: Sequence[str | Path],
        image_size: int,
        root: str | Path,
        *,
        num_workers: int = 0,
        batch_size: int = 64,
        progress: bool = True,
        ranks: Ranks | None = None,
    ) -> ImageStore:
        """Open the store of ``paths`` at ``image_size`` under ``root``, decoding it first
        if no run has (split across the ranks of an initialised process group)."""
        paths = [Path(p) for p in paths]
        if not paths:
            raise ValueError("ImageStore: no images")
        ranks = ranks or Ranks.current()
        key = {
            "images": image_list_digest(paths),
            "count": len(paths),
            "image_size": int(image_size),
            "preprocessing": PREPROCESSING,
        }

        def fill(rows: range) -> Iterator[tuple[np.ndarray, np.ndarray]]:
            loader = DataLoader(
                _Decode(paths, rows, image_size),
                batch_size=batch_size,
                num_workers=num_workers,
                collate_fn=_stack,
            )
            bar = tqdm(
                total=len(rows),
                desc=f"decoding images ({ranks.world_size} rank(s))",
                unit="img",
                disable=not (progress and ranks.rank == 0),
                dynamic_ncols=True,
            )
            with bar:
                for index, arrays in loader:
                    yield index, arrays
                    bar.update(len(index))

        shape = (len(paths), image_size, image_size, 3)
        array, built = build_or_open(root, "images", key, shape, np.uint8, fill, ranks=ranks)
        return cls(array, built)

    def __len__(self) -> int:
        return self.array.shape[0]

    @property
    def image_size(self) -> int:
        return self.array.shape[1]

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(normalize(self.array[i]))
