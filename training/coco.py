"""COCO in Karpathy's split: ``dataset_coco.json`` plus the ``train2014/`` and ``val2014/``
image folders, as a caption corpus (splits + vocabulary), and a tiny fixture of that layout.

Reading the JSON itself is :func:`training.caption_data.load_karpathy`'s job (it already
follows each entry's ``filepath``, takes ``cocoid`` as the image id and folds ``restval`` into
``train``: 113,287 / 5,000 / 5,000 images on the real file). :func:`load_coco` adds what a
COCO run needs on top: the three splits must be there, every missing image is counted in one
error (not only the first, with a hint about the folder layout), and the vocabulary is built
from the training captions.

:func:`write_coco_fixture` writes a few rendered shape scenes (``training.scenes``) as JPEGs
in COCO's folders and names, with a ``dataset_coco.json`` in Karpathy's exact schema
(``filepath``, ``filename``, ``imgid``, ``cocoid``, ``split`` with ``restval``, ``sentids``,
``sentences`` with ``tokens``/``raw``/``imgid``/``sentid``), so the whole COCO path can be
tested without COCO.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bbservice.errors import DataError
from bbservice.vocab import Vocabulary
from training.caption_data import CaptionItem, get_split, load_karpathy
from training.scenes import COLOURS, SHAPES, caption_scene, make_scene, render_scene

__all__ = ["COCO_SPLITS", "CaptionCorpus", "load_coco", "write_coco_fixture"]

COCO_SPLITS = ("train", "val", "test")  # after restval is folded into train
_NO_PUNCT = str.maketrans("", "", string.punctuation)


@dataclass
class CaptionCorpus:
    """Splits of a caption data set and the vocabulary of its training captions."""

    source: Path
    splits: dict[str, list[CaptionItem]]
    vocab: Vocabulary

    def summary(self) -> dict:
        """Images and captions per split and the vocabulary size (for logs)."""
        return {
            "source": str(self.source),
            "images": {k: len(v) for k, v in self.splits.items()},
            "captions": {k: sum(len(it.captions) for it in v) for k, v in self.splits.items()},
            "vocabulary": len(self.vocab),
        }


def load_coco(
    json_path: str | Path,
    image_root: str | Path | None = None,
    *,
    min_count: int = 5,
    check_images: bool = True,
) -> CaptionCorpus:
    """Read Karpathy's ``dataset_coco.json`` and check its images.

    Parameters
    ----------
    json_path : the Karpathy JSON (``dataset_coco.json``).
    image_root : the folder holding ``train2014/`` and ``val2014/`` (default: the JSON's).
    min_count : a word enters the vocabulary when it occurs this often in training captions.
    check_images : every listed image must exist (one error counts all that do not).

    Returns
    -------
    CaptionCorpus with splits "train" (restval included), "val", "test" and any others.
    """
    path = Path(json_path)
    root = Path(image_root) if image_root is not None else path.parent
    splits = load_karpathy(path, root, check_images=False)
    for split in COCO_SPLITS:
        get_split(splits, split, path)
    if check_images:
        missing = [it.image_path for items in splits.values() for it in items]
        missing = [p for p in missing if not p.is_file()]
        if missing:
            total = sum(len(v) for v in splits.values())
            examples = ", ".join(str(p) for p in missing[:3])
            raise DataError(
                f"{path}: {len(missing)} of {total} images are missing under {root} (e.g. "
                f"{examples}); the image root must hold the folders the entries' 'filepath' "
                "names (train2014/, val2014/)"
            )
    vocab = Vocabulary.build((c for it in splits["train"] for c in it.captions), min_count)
    if len(vocab) <= len(Vocabulary.SPECIALS):
        raise DataError(f"{path}: no word occurs {min_count} times in the training captions")
    return CaptionCorpus(path, splits, vocab)


def write_coco_fixture(
    out_dir: str | Path,
    sizes: Mapping[str, int] | None = None,
    *,
    image_size: int = 64,
    captions: int = 5,
    seed: int = 0,
) -> Path:
    """Write a tiny COCO-layout data set; returns the path of its ``dataset_coco.json``.

    ``sizes``: images per Karpathy split (default train 8, restval 2, val 3, test 3). As in
    COCO, "train" images live in ``train2014/`` and the others in ``val2014/``, named
    ``COCO_<folder>_<cocoid:012d>.jpg``. Each image is a rendered shape scene with
    ``captions`` true captions; the same arguments give the same files.
    """
    sizes = dict(sizes or {"train": 8, "restval": 2, "val": 3, "test": 3})
    out = Path(out_dir)
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    images, imgid, sentid = [], 0, 0
    for split, count in sizes.items():
        folder = "train2014" if split == "train" else "val2014"
        (out / folder).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            rng = random.Random(f"coco-fixture/{seed}/{split}/{index}")
            scene = make_scene(rng, combos)
            cocoid = 100_000 + imgid * 7  # COCO's ids are sparse, never the row number
            filename = f"COCO_{folder}_{cocoid:012d}.jpg"
            render_scene(scene, image_size).save(out / folder / filename, format="JPEG")
            sentences = [
                {
                    "tokens": c.translate(_NO_PUNCT).split(),
                    "raw": c[0].upper() + c[1:] + ".",
                    "imgid": imgid,
                    "sentid": sentid + k,
                }
                for k, c in enumerate(caption_scene(scene, rng, captions))
            ]
            images.append(
                {
                    "filepath": folder,
                    "sentids": [s["sentid"] for s in sentences],
                    "filename": filename,
                    "imgid": imgid,
                    "split": split,
                    "sentences": sentences,
                    "cocoid": cocoid,
                }
            )
            imgid += 1
            sentid += len(sentences)
    path = out / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path
