"""training.coco: a COCO-layout fixture written here (JPEGs in train2014/ and val2014/, a
Karpathy dataset_coco.json) loads into splits, a vocabulary and caption datasets."""

from __future__ import annotations

import json

import pytest
import torch

from bbservice.errors import DataError
from training.caption_data import CaptionEvalDataset, CaptionTrainDataset, collate_train
from training.coco import load_coco, write_coco_fixture
from training.image_store import ImageStore


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_coco_fixture(tmp_path_factory.mktemp("coco"))


def test_fixture_has_karpathys_schema_and_coco_layout(coco):
    data = json.loads(coco.read_text())
    assert data["dataset"] == "coco" and len(data["images"]) == 16
    entry = data["images"][0]
    assert set(entry) == {
        "filepath",
        "sentids",
        "filename",
        "imgid",
        "split",
        "sentences",
        "cocoid",
    }
    assert set(entry["sentences"][0]) == {"tokens", "raw", "imgid", "sentid"}
    for e in data["images"]:
        folder = "train2014" if e["split"] == "train" else "val2014"
        assert e["filepath"] == folder and e["filename"].startswith(f"COCO_{folder}_")
        assert (coco.parent / folder / e["filename"]).is_file()
    assert write_coco_fixture(coco.parent / "again").read_text() == coco.read_text()


def test_load_coco_folds_restval_builds_the_vocabulary_and_feeds_datasets(coco, tmp_path):
    corpus = load_coco(coco, min_count=2)
    assert corpus.summary()["images"] == {"train": 10, "val": 3, "test": 3}
    assert corpus.summary()["captions"]["train"] == 50
    train = corpus.splits["train"]
    assert all(isinstance(it.image_id, int) and it.image_id >= 100_000 for it in train)
    assert {it.image_path.parent.name for it in train} == {"train2014", "val2014"}  # restval
    vocab = corpus.vocab
    assert vocab.itos[:4] == ["<pad>", "<start>", "<end>", "<unk>"] and len(vocab) > 10
    words = {w for it in train for c in it.captions for w in c}
    assert set(vocab.itos[4:]) <= words
    ds = CaptionTrainDataset(train, vocab, max_len=12, image_size=32)
    images, captions, lengths, _ = collate_train([ds[i] for i in range(4)])
    assert images.shape == (4, 3, 32, 32) and captions[:, 0].eq(vocab.start_id).all()
    assert len(CaptionEvalDataset(corpus.splits["test"], 32)) == 3
    store = ImageStore.build(
        [it.image_path for it in train], 32, tmp_path / "cache", progress=False
    )
    torch.testing.assert_close(store[3], ds.images[3])


def test_missing_images_and_splits_are_clear_errors(coco, tmp_path):
    data = json.loads(coco.read_text())
    moved = tmp_path / "elsewhere.json"
    moved.write_text(coco.read_text())
    with pytest.raises(DataError, match=r"16 of 16 images are missing .*train2014/, val2014/"):
        load_coco(moved)
    assert len(load_coco(moved, coco.parent, min_count=2).splits["val"]) == 3  # --image-root
    no_test = tmp_path / "no_test.json"
    no_test.write_text(json.dumps({"images": [e for e in data["images"] if e["split"] != "test"]}))
    with pytest.raises(DataError, match="split 'test' is empty or absent"):
        load_coco(no_test, coco.parent)
    with pytest.raises(DataError, match="no word occurs 1000 times"):
        load_coco(coco, min_count=1000)
