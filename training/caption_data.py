"""Caption data sets: Karpathy-split JSON and raw COCO captions, a vocabulary, torch datasets.

Decisions
---------
* Karpathy's COCO "restval" split is folded into "train" (the usual 113,287-image train set).
* `CaptionTrainDataset` yields one item per image per epoch with one of its captions drawn at
  random each time (``flatten=False``, default): an epoch costs one image decode per image and
  every caption is still seen over the epochs. ``flatten=True`` gives one item per
  (image, caption) pair instead.
* Captions are ``<start> w1 .. wk <end>`` with k <= max_len (longer ones are truncated), padded
  with ``<pad>`` = 0 to max_len + 2; the collate function trims a batch to its longest caption.
* Images go through `bbservice.images.load_image` + a direct resize to ``image_size`` and
  ImageNet normalisation; ``cache=True`` keeps every resized image in memory as uint8.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from bbservice.errors import DataError
from bbservice.images import load_image, normalize, resize_image
from bbservice.vocab import Vocabulary

__all__ = [
    "CaptionEvalDataset",
    "CaptionItem",
    "CaptionTrainDataset",
    "collate_eval",
    "collate_train",
    "get_split",
    "load_coco_captions",
    "load_karpathy",
    "tokenize",
]

_PUNCT = str.maketrans("", "", string.punctuation)


def tokenize(text: str) -> list[str]:
    """Lowercase, delete ASCII punctuation (as Karpathy's preprocessing does), split on spaces.

    "A man's T-shirt." -> ["a", "mans", "tshirt"].
    """
    return text.lower().translate(_PUNCT).split()


@dataclass(frozen=True)
class CaptionItem:
    """One image with its tokenised reference captions."""

    image_path: Path
    captions: list[list[str]]
    image_id: int | str


# ----------------------------------------------------------------------------- loading


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with path.open("rb") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc


def _check_images(items: Iterable[CaptionItem], source: Path) -> None:
    for item in items:
        if not item.image_path.is_file():
            raise DataError(f"{item.image_path}: image file not found (listed in {source})")


def _sentence_tokens(sent: Any, where: str) -> list[str]:
    if isinstance(sent, Mapping):
        tokens = sent.get("tokens")
        if isinstance(tokens, list) and all(isinstance(t, str) for t in tokens):
            return [t.lower() for t in tokens]
        if isinstance(sent.get("raw"), str):
            return tokenize(sent["raw"])
    raise DataError(f"{where}: a sentence needs a 'tokens' list of strings or a 'raw' string")


def load_karpathy(
    json_path: str | Path, image_root: str | Path | None = None, *, check_images: bool = True
) -> dict[str, list[CaptionItem]]:
    """Read a Karpathy-split JSON (COCO, Flickr8k, Flickr30k or `training.scenes`).

    Parameters
    ----------
    json_path : path
        ``dataset_coco.json``, ``dataset_flickr8k.json``, ``dataset_flickr30k.json`` or
        ``dataset_scenes.json``.
    image_root : path, optional
        Folder the image paths are relative to (default: the JSON's folder). An image's path
        is ``image_root / filepath / filename`` when the entry has "filepath" (COCO:
        "val2014/COCO_val2014_...jpg"), else ``image_root / filename`` (Flickr).
    check_images : bool
        Raise DataError at once if an image file is missing.

    Returns
    -------
    dict[str, list[CaptionItem]]
        Split name -> items in file order; "restval" is merged into "train". image_id is the
        entry's "cocoid" if present, else "imgid", else its position.
    """
    path = Path(json_path)
    root = Path(image_root) if image_root is not None else path.parent
    data = _read_json(path)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DataError(f"{path}: expected an object with an 'images' list (Karpathy format)")
    if not images:
        raise DataError(f"{path}: the 'images' list is empty")
    splits: dict[str, list[CaptionItem]] = {}
    for i, entry in enumerate(images):
        where = f"{path}: images[{i}]"
        if not isinstance(entry, dict):
            raise DataError(f"{where} is not an object")
        filename, split, sentences = (
            entry.get("filename"),
            entry.get("split"),
            entry.get("sentences"),
        )
        if not isinstance(filename, str) or not filename:
            raise DataError(f"{where} has no 'filename' string")
        if not isinstance(split, str) or not split:
            raise DataError(f"{where} ({filename}) has no 'split' string")
        if not isinstance(sentences, list) or not sentences:
            raise DataError(f"{where} ({filename}) has no 'sentences' list")
        captions = [_sentence_tokens(s, f"{where} ({filename})") for s in sentences]
        filepath = entry.get("filepath")
        image_path = root / filepath / filename if isinstance(filepath, str) else root / filename
        image_id = entry.get("cocoid", entry.get("imgid", i))
        split = "train" if split == "restval" else split
        splits.setdefault(split, []).append(CaptionItem(image_path, captions, image_id))
    if check_images:
        for items in splits.values():
            _check_images(items, path)
    return splits


def load_coco_captions(
    captions_json: str | Path, image_dir: str | Path, *, check_images: bool = True
) -> list[CaptionItem]:
    """Read a raw COCO captions file (``captions_train2014.json``: "images" + "annotations").

    Parameters
    ----------
    captions_json : path
        COCO caption annotation file.
    image_dir : path
        Folder holding the images' ``file_name`` (e.g. ``train2014/``).
    check_images : bool
        Raise DataError at once if an image file is missing.

    Returns
    -------
    list[CaptionItem]
        One item per image that has captions, in the file's image order; image_id is COCO's id.
        Captions are tokenised with `tokenize`. Images without any caption are left out.
    """
    path = Path(captions_json)
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: expected an object with 'images' and 'annotations' lists")
    if not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: no 'annotations' list (is this an instances file?)")
    files: dict[Any, str] = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise DataError(f"{path}: images[{i}] needs an 'id' and a 'file_name'")
        files[im["id"]] = im["file_name"]
    caps: dict[Any, list[list[str]]] = {}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str):
            raise DataError(f"{path}: annotations[{i}] needs a 'caption' string")
        if ann.get("image_id") not in files:
            raise DataError(
                f"{path}: annotations[{i}] refers to unknown image_id {ann.get('image_id')!r}"
            )
        caps.setdefault(ann["image_id"], []).append(tokenize(ann["caption"]))
    items = [CaptionItem(Path(image_dir) / f, caps[k], k) for k, f in files.items() if k in caps]
    if not items:
        raise DataError(f"{path}: no image has a caption")
    if check_images:
        _check_images(items, path)
    return items


def get_split(
    splits: Mapping[str, list[CaptionItem]], split: str, source: str | Path
) -> list[CaptionItem]:
    """``splits[split]``, or DataError naming `source` if that split is absent or empty."""
    items = splits.get(split)
    if not items:
        have = ", ".join(f"{k} ({len(v)})" for k, v in splits.items()) or "none"
        raise DataError(f"{source}: split {split!r} is empty or absent (splits: {have})")
    return items


# ----------------------------------------------------------------------------- datasets


class _Images:
    """Loads (and optionally caches) resized uint8 images; returns normalised tensors."""

    def __init__(self, paths: Sequence[Path], image_size: int, cache: bool) -> None:
        self.paths, self.image_size = list(paths), image_size
        self.cache: np.ndarray | None = None
        if cache:
            self.cache = np.empty((len(self.paths), image_size, image_size, 3), dtype=np.uint8)
            for i, p in enumerate(self.paths):
                self.cache[i] = resize_image(load_image(p), image_size)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.cache is not None:
            arr = self.cache[i]
        else:
            arr = resize_image(load_image(self.paths[i]), self.image_size)
        return torch.from_numpy(normalize(arr))


def _nonempty(items: Sequence[CaptionItem], name: str) -> list[CaptionItem]:
    items = list(items)
    if not items:
        raise DataError(f"{name}: the split is empty (no images)")
    return items


class CaptionTrainDataset(Dataset):
    """Training pairs: ``(image (3, S, S) float32, caption (max_len + 2,) int64, length, index)``.

    Parameters
    ----------
    items : sequence of CaptionItem
        One split, e.g. ``load_karpathy(...)["train"]``.
    vocab : Vocabulary
    max_len : int
        Caption words kept (without ``<start>``/``<end>``).
    image_size : int
        Side S of the square image tensor.
    flatten : bool
        False: one item per image, a random caption each time (uses torch's RNG, so
        ``torch.manual_seed`` and DataLoader worker seeding make it reproducible).
        True: one item per (image, caption) pair.
    cache : bool
        Decode and resize every image once at construction and keep them as uint8.
    name : str
        Used in error messages.
    """

    def __init__(
        self,
        items: Sequence[CaptionItem],
        vocab: Vocabulary,
        max_len: int = 20,
        image_size: int = 224,
        *,
        flatten: bool = False,
        cache: bool = False,
        name: str = "train",
    ) -> None:
        self.items = _nonempty(items, name)
        self.vocab, self.max_len, self.flatten = vocab, max_len, flatten
        self.images = _Images([it.image_path for it in self.items], image_size, cache)
        self.pairs = [(i, j) for i, it in enumerate(self.items) for j in range(len(it.captions))]

    def __len__(self) -> int:
        return len(self.pairs) if self.flatten else len(self.items)

    def targets_per_epoch(self) -> float:
        """Expected predicted tokens (words kept + ``<end>``) of one pass over the dataset: per
        image the mean over its captions, or every caption with ``flatten``."""
        per_image = [[min(len(c), self.max_len) + 1 for c in it.captions] for it in self.items]
        if self.flatten:
            return float(sum(sum(n) for n in per_image))
        return float(sum(sum(n) / len(n) for n in per_image))

    def encode(self, tokens: Sequence[str]) -> tuple[torch.Tensor, int]:
        """Token ids padded to (max_len + 2,), and the unpadded length."""
        ids = self.vocab.encode(tokens, self.max_len)
        out = torch.full((self.max_len + 2,), self.vocab.pad_id, dtype=torch.long)
        out[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out, len(ids)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        if self.flatten:
            i, j = self.pairs[k]
        else:
            i = k
            j = int(torch.randint(len(self.items[i].captions), (1,)).item())
        caption, length = self.encode(self.items[i].captions[j])
        return self.images[i], caption, length, i


class CaptionEvalDataset(Dataset):
    """Evaluation items: ``(image (3, S, S) float32, references list[list[str]], index)``."""

    def __init__(
        self,
        items: Sequence[CaptionItem],
        image_size: int = 224,
        *,
        cache: bool = False,
        name: str = "eval",
    ) -> None:
        self.items = _nonempty(items, name)
        self.images = _Images([it.image_path for it in self.items], image_size, cache)

    def __len__(self) -> int:
        return len(self.items)

    def references(self) -> dict[int, list[str]]:
        """Index -> reference captions as strings (input of `caption_metrics.score_captions`)."""
        return {i: [" ".join(c) for c in it.captions] for i, it in enumerate(self.items)}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, list[list[str]], int]:
        return self.images[i], self.items[i].captions, i


def collate_train(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor, int, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack a training batch.

    Returns
    -------
    images : (B, 3, S, S) float32
    captions : (B, L) int64, L = longest length in the batch (<= max_len + 2)
    lengths : (B,) int64, including ``<start>`` and ``<end>``
    indices : (B,) int64, item index of each image
    """
    images, caps, lengths, idx = zip(*batch, strict=True)
    lengths_t = torch.tensor(lengths, dtype=torch.long)
    longest = int(lengths_t.max())
    return (
        torch.stack(images),
        torch.stack(caps)[:, :longest].contiguous(),
        lengths_t,
        torch.tensor(idx, dtype=torch.long),
    )


def collate_eval(
    batch: Sequence[tuple[torch.Tensor, list[list[str]], int]],
) -> tuple[torch.Tensor, list[list[list[str]]], torch.Tensor]:
    """Stack an evaluation batch: images (B, 3, S, S), references (B lists), indices (B,)."""
    images, refs, idx = zip(*batch, strict=True)
    return torch.stack(images), list(refs), torch.tensor(idx, dtype=torch.long)
