"""Encoder features of a frozen encoder, computed once and memory-mapped in fp16.

With a frozen encoder (``fine_tune=False``) every epoch recomputes the same features; a
:class:`FeatureCache` computes them once — each DDP rank its share of the images, with a
progress bar — into ``root/features-<key>/array.npy`` of shape ``(N, P, C)`` float16, and
every later run with the same key maps that file (read-only, shared by all processes of a
machine through the page cache).

The key (:func:`feature_key`) is everything the features depend on: the encoder
architecture, its kept stages and grid G, a sha256 of the encoder's weights (its whole state
dict, batch-norm statistics included, as :func:`bbservice.hashing.content_hash` computes it),
the image side S, the preprocessing, and the ordered image list
(:func:`training.image_store.image_list_digest`). Another checkpoint, another
``--encoder-weights``, another image size or another subset gives another entry.

``cache[i]`` is the float32 tensor ``(P, C)`` of image i, what
``model.encoder(image[None])[0]`` gives up to fp16 rounding (relative error ≤ 2⁻¹¹ per value).
The decoder takes it directly (``AttentionDecoder.forward(features, ...)``,
``TorchCaptionStepper.start(features)``, :class:`training.scst.SCSTBatch`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from bbservice.errors import ConfigError
from bbservice.hashing import content_hash
from bbservice.models.caption import CaptionConfig
from training.image_store import PREPROCESSING, image_list_digest
from training.sharded_array import Ranks, build_or_open

__all__ = ["FeatureCache", "feature_key"]


def feature_key(
    config: CaptionConfig,
    encoder: nn.Module,
    paths: Sequence[str | Path],
    preprocessing: str = PREPROCESSING,
) -> dict[str, Any]:
    """The cache key of ``encoder``'s features of the images ``paths`` (see the module
    docstring); ``config`` gives the architecture, stages, grid and image size."""
    return {
        "encoder": config.encoder,
        "stages": config.encoder_stages,
        "grid_size": config.grid_size,
        "image_size": config.image_size,
        "weights_sha256": content_hash(encoder, {}),
        "preprocessing": preprocessing,
        "images": image_list_digest(paths),
        "count": len(paths),
        "dtype": "float16",
    }


class _Indexed(Dataset):
    def __init__(self, images: Dataset) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, self.images[i]


class FeatureCache:
    """``(N, P, C)`` float16 features, memory-mapped; ``cache[i]`` → float32 ``(P, C)``."""

    def __init__(self, array: np.ndarray, key: dict[str, Any], built: bool = False) -> None:
        self.array, self.key = array, key
        self.built = built  # whether the call that made it ran the encoder

    @classmethod
    def build(
        cls,
        model_config: CaptionConfig,
        encoder: nn.Module,
        images: Dataset,
        paths: Sequence[str | Path],
        root: str | Path,
        *,
        batch_size: int = 64,
        num_workers: int = 0,
        progress: bool = True,
        ranks: Ranks | None = None,
    ) -> FeatureCache:
        """Open the features of ``images`` under ``root``, running ``encoder`` first if no
        run has (each rank of an initialised process group on its share).

        Parameters
        ----------
        model_config : the caption model's config (encoder, stages, grid, image size).
        encoder : the frozen :class:`~bbservice.models.caption.ResNetEncoder`
            (``images (B, 3, S, S) -> features (B, P, C)``).
        images : ``images[i]`` → float32 ``(3, S, S)`` (an :class:`ImageStore` or
            ``caption_data``'s images), in the order of ``paths``.
        paths : the image files (for the key).
        root : cache folder.
        batch_size, num_workers : of the DataLoader over this rank's images.

        The encoder runs on its own device, in eval mode, under ``torch.inference_mode``.
        """
        if getattr(encoder, "fine_tune", False):
            raise ConfigError(
                "a feature cache needs a frozen encoder: features of a fine-tuned encoder "
                "change every step"
            )
        if len(images) != len(paths):  # type: ignore[arg-type]
            raise ConfigError(f"{len(images)} images but {len(paths)} paths")  # type: ignore[arg-type]
        ranks = ranks or Ranks.current()
        key = feature_key(model_config, encoder, paths)
        P, C = model_config.positions, model_config.feature_dim
        device = next(encoder.parameters()).device

        def fill(rows: range) -> Iterator[tuple[np.ndarray, np.ndarray]]:
            loader = DataLoader(
                Subset(_Indexed(images), list(rows)),
                batch_size=batch_size,
                num_workers=num_workers,
            )
            was_training = encoder.training
            encoder.eval()
            bar = tqdm(
                total=len(rows),
                desc=f"caching encoder features ({ranks.world_size} rank(s))",
                unit="img",
                disable=not (progress and ranks.rank == 0),
                dynamic_ncols=True,
            )
            try:
                with bar, torch.inference_mode():
                    for index, x in loader:
                        feats = encoder(x.to(device, torch.float32))  # (B, P, C)
                        yield index.numpy(), feats.to(torch.float16).cpu().numpy()
                        bar.update(len(index))
            finally:
                encoder.train(was_training)

        shape = (len(paths), P, C)
        array, built = build_or_open(root, "features", key, shape, np.float16, fill, ranks=ranks)
        return cls(array, key, built)

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.array[i].astype(np.float32))
