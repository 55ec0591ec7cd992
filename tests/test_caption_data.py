"""Tests of training.caption_data on tiny fixtures in exactly the Karpathy and raw-COCO formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from bbservice.errors import DataError
from bbservice.vocab import Vocabulary
from training.caption_data import (
    CaptionEvalDataset,
    CaptionTrainDataset,
    collate_eval,
    collate_train,
    get_split,
    load_coco_captions,
    load_karpathy,
    tokenize,
)
from training.scenes import generate_scenes


def _sentence(raw: str, imgid: int, sentid: int) -> dict:
    return {"tokens": tokenize(raw), "raw": raw, "imgid": imgid, "sentid": sentid}


def _image(path: Path, colour: tuple[int, int, int] = (200, 30, 30), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (40, 30), colour if mode == "RGB" else 128).save(path)


COCO_ENTRIES = [  # (filepath, filename, split, cocoid, captions)
    (
        "val2014",
        "COCO_val2014_000000391895.jpg",
        "test",
        391895,
        [
            "A man with a red helmet on a small moped on a dirt road.",
            "Man riding a motor bike on a dirt road on the countryside.",
        ],
    ),
    (
        "val2014",
        "COCO_val2014_000000522418.jpg",
        "restval",
        522418,
        [
            "A woman wearing a net on her head cutting a cake.",
            "A woman cutting a large white sheet cake.",
        ],
    ),
    (
        "train2014",
        "COCO_train2014_000000057870.jpg",
        "train",
        57870,
        [
            "A restaurant has modern wooden tables and chairs.",
            "A long restaurant table with rattan rounded back chairs.",
        ],
    ),
    (
        "val2014",
        "COCO_val2014_000000184613.jpg",
        "val",
        184613,
        [
            "A child holding a flowered umbrella and petting a yak.",
            "A young man holding an umbrella next to a herd of cattle.",
        ],
    ),
]


def _coco_karpathy(tmp_path: Path) -> Path:
    images, sentid = [], 770337
    for imgid, (filepath, filename, split, cocoid, raws) in enumerate(COCO_ENTRIES):
        _image(tmp_path / "coco" / filepath / filename)
        sents = [_sentence(r, imgid, sentid + k) for k, r in enumerate(raws)]
        images.append(
            {
                "filepath": filepath,
                "sentids": [s["sentid"] for s in sents],
                "filename": filename,
                "imgid": imgid,
                "split": split,
                "sentences": sents,
                "cocoid": cocoid,
            }
        )
        sentid += len(raws)
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def _flickr8k(tmp_path: Path) -> Path:
    raws = {
        "1000268201_693b08cb0e.jpg": ("train", ["A child in a pink dress is climbing up stairs."]),
        "1001773457_577c3a7d70.jpg": ("train", ["A black dog and a spotted dog are fighting"]),
        "1002674143_1b742ab4b8.jpg": ("val", ["A little girl covered in paint sits in front."]),
        "1003163366_44323f5815.jpg": ("test", ["A man lays on a bench while his dog sits by him."]),
    }
    images = []
    for imgid, (filename, (split, caps)) in enumerate(raws.items()):
        _image(tmp_path / "Flicker8k_Dataset" / filename, mode="L")
        sents = [_sentence(c, imgid, imgid * 5 + k) for k, c in enumerate(caps)]
        images.append(
            {
                "sentids": [s["sentid"] for s in sents],
                "imgid": imgid,
                "sentences": sents,
                "split": split,
                "filename": filename,
            }
        )
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    return path


RAW_COCO_ANNOTATIONS = [  # (image_id, id, caption), as in captions_train2014.json
    (57870, 787980, "A restaurant has modern wooden tables and chairs."),
    (384029, 814, "A man preparing desserts in a kitchen covered in frosting."),
    (57870, 789366, "A long restaurant table with rattan rounded back chairs."),
    (384029, 864, "A chef is preparing and decorating many small pastries."),
]


def _raw_coco(tmp_path: Path) -> Path:
    data = {
        "info": {"description": "COCO 2014 Dataset", "year": 2014, "version": "1.0"},
        "images": [
            {
                "license": 5,
                "file_name": "COCO_train2014_000000057870.jpg",
                "coco_url": "http://x",
                "height": 480,
                "width": 640,
                "date_captured": "2013-11-14 16:28:13",
                "flickr_url": "http://y",
                "id": 57870,
            },
            {
                "license": 5,
                "file_name": "COCO_train2014_000000384029.jpg",
                "coco_url": "http://x",
                "height": 429,
                "width": 640,
                "date_captured": "2013-11-14 16:29:45",
                "flickr_url": "http://y",
                "id": 384029,
            },
            {
                "license": 1,
                "file_name": "COCO_train2014_000000222016.jpg",
                "coco_url": "http://x",
                "height": 640,
                "width": 480,
                "date_captured": "2013-11-14 16:37:59",
                "flickr_url": "http://y",
                "id": 222016,
            },
        ],
        "licenses": [
            {
                "url": "http://creativecommons.org/licenses/by-nc-sa/2.0/",
                "id": 1,
                "name": "Attribution-NonCommercial-ShareAlike License",
            }
        ],
        "annotations": [
            {"image_id": image_id, "id": ann_id, "caption": caption}
            for image_id, ann_id, caption in RAW_COCO_ANNOTATIONS
        ],
    }
    for im in data["images"][:2]:
        _image(tmp_path / "train2014" / im["file_name"])
    path = tmp_path / "captions_train2014.json"
    path.write_text(json.dumps(data))
    return path


# ----------------------------------------------------------------------------- loaders


def test_load_karpathy_coco(tmp_path: Path) -> None:
    splits = load_karpathy(_coco_karpathy(tmp_path), image_root=tmp_path / "coco")
    assert sorted(splits) == ["test", "train", "val"]  # restval folded into train
    assert [it.image_id for it in splits["train"]] == [522418, 57870]
    item = splits["test"][0]
    assert item.image_path == tmp_path / "coco" / "val2014" / "COCO_val2014_000000391895.jpg"
    assert item.captions[0][:4] == ["a", "man", "with", "a"]
    assert len(item.captions) == 2


def test_load_karpathy_flickr(tmp_path: Path) -> None:
    path = _flickr8k(tmp_path)
    splits = load_karpathy(path, image_root=tmp_path / "Flicker8k_Dataset")
    assert {k: len(v) for k, v in splits.items()} == {"train": 2, "val": 1, "test": 1}
    first = splits["train"][0]
    assert first.image_path.name == "1000268201_693b08cb0e.jpg" and first.image_id == 0
    assert first.captions == ["a child in a pink dress is climbing up stairs".split()]
    with pytest.raises(DataError, match="1000268201_693b08cb0e.jpg: image file not found"):
        load_karpathy(path)  # default image_root is the JSON's folder: images are not there


def test_load_karpathy_scenes(tmp_path: Path) -> None:
    path = generate_scenes(tmp_path / "s", 6, 2, 2, seed=3, image_size=48)
    splits = load_karpathy(path)
    assert {k: len(v) for k, v in splits.items()} == {"train": 6, "val": 2, "test": 2}
    assert all(len(it.captions) >= 5 and it.image_path.is_file() for it in splits["train"])


def test_load_coco_captions(tmp_path: Path) -> None:
    items = load_coco_captions(_raw_coco(tmp_path), tmp_path / "train2014")
    assert [it.image_id for it in items] == [57870, 384029]  # 222016 has no caption: left out
    assert items[0].captions[1] == "a long restaurant table with rattan rounded back chairs".split()
    assert items[1].image_path == tmp_path / "train2014" / "COCO_train2014_000000384029.jpg"


def test_tokenize() -> None:
    assert tokenize("A man's T-shirt, (red)!  OK.") == ["a", "mans", "tshirt", "red", "ok"]


# ----------------------------------------------------------------------------- vocabulary


def test_vocabulary_build_encode_decode_json(tmp_path: Path) -> None:
    caps = [["a", "red", "circle"], ["a", "blue", "circle"], ["a", "red", "star"]]
    vocab = Vocabulary.build(caps, min_count=2)
    assert vocab.itos == ["<pad>", "<start>", "<end>", "<unk>", "a", "circle", "red"]
    assert (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id) == (0, 1, 2, 3)
    ids = vocab.encode(["a", "blue", "circle"])
    assert ids == [1, 4, 3, 5, 2]
    assert vocab.encode(["a", "red", "circle"], max_len=2) == [1, 4, 6, 2]
    assert vocab.decode(ids) == ["a", "<unk>", "circle"]
    assert vocab.decode([1, 6, 5, 2, 4, 4, 0]) == ["red", "circle"]  # stops at <end>
    vocab.to_json(tmp_path / "vocab.json")
    assert Vocabulary.from_json(tmp_path / "vocab.json") == vocab
    assert len(Vocabulary.build(caps, min_count=1)) == 4 + 5


def test_vocabulary_bad_json(tmp_path: Path) -> None:
    (tmp_path / "v.json").write_text(json.dumps({"itos": ["a", "b"]}))
    with pytest.raises(DataError, match="first four words"):
        Vocabulary.from_json(tmp_path / "v.json")
    with pytest.raises(DataError, match="file not found"):
        Vocabulary.from_json(tmp_path / "missing.json")


# ----------------------------------------------------------------------------- datasets


def test_train_dataset_and_collate(tmp_path: Path) -> None:
    splits = load_karpathy(_coco_karpathy(tmp_path), image_root=tmp_path / "coco")
    train = splits["train"]
    vocab = Vocabulary.build((c for it in train for c in it.captions), min_count=1)
    ds = CaptionTrainDataset(train, vocab, max_len=6, image_size=32)
    assert len(ds) == 2
    image, caption, length, index = ds[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert caption.shape == (8,) and caption.dtype == torch.long
    assert caption[0] == vocab.start_id and length == 8 and caption[7] == vocab.end_id  # truncated
    assert index == 0
    flat = CaptionTrainDataset(train, vocab, max_len=30, image_size=32, flatten=True, cache=True)
    assert len(flat) == 4
    lengths = sorted(flat[k][2] for k in range(4))
    assert lengths == sorted(len(c) + 2 for it in train for c in it.captions)
    images, caps, lens, idx = next(iter(DataLoader(flat, batch_size=4, collate_fn=collate_train)))
    assert images.shape == (4, 3, 32, 32)
    assert caps.shape == (4, int(lens.max())) and idx.tolist() == [0, 0, 1, 1]
    assert (caps[lens.argmin(), lens.min() :] == vocab.pad_id).all()
    _, first, _, _ = flat[0]
    assert vocab.decode(first.tolist()) == train[0].captions[0]


def test_random_caption_is_reproducible(tmp_path: Path) -> None:
    path = generate_scenes(tmp_path / "s", 4, 0, 0, seed=1, image_size=32)
    train = load_karpathy(path)["train"]
    vocab = Vocabulary.build((c for it in train for c in it.captions), min_count=1)
    ds = CaptionTrainDataset(train, vocab, image_size=32, cache=True)
    torch.manual_seed(0)
    a = [ds[i % 4][1].tolist() for i in range(20)]
    torch.manual_seed(0)
    b = [ds[i % 4][1].tolist() for i in range(20)]
    assert a == b
    assert len({tuple(x) for x in a[0::4]}) > 1  # several captions of image 0 drawn


def test_eval_dataset(tmp_path: Path) -> None:
    splits = load_karpathy(_flickr8k(tmp_path), image_root=tmp_path / "Flicker8k_Dataset")
    ds = CaptionEvalDataset(splits["train"], image_size=24)
    images, refs, idx = collate_eval([ds[0], ds[1]])
    assert images.shape == (2, 3, 24, 24) and idx.tolist() == [0, 1]
    assert refs[1] == [tokenize("A black dog and a spotted dog are fighting")]
    assert ds.references()[0] == ["a child in a pink dress is climbing up stairs"]


# ----------------------------------------------------------------------------- errors


def test_json_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.json: file not found"):
        load_karpathy(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(DataError, match="bad.json: not valid JSON"):
        load_karpathy(bad)
    cases = {
        "[1, 2]": "'images' list",
        '{"images": []}': "empty",
        '{"images": [{"split": "train", "sentences": [{"tokens": ["a"]}]}]}': "no 'filename'",
        '{"images": [{"filename": "x.jpg", "sentences": [{"tokens": ["a"]}]}]}': "no 'split'",
        '{"images": [{"filename": "x.jpg", "split": "train"}]}': "no 'sentences'",
        '{"images": [{"filename": "x.jpg", "split": "train", "sentences": [{"t": 1}]}]}': "tokens",
    }
    for text, message in cases.items():
        bad.write_text(text)
        with pytest.raises(DataError, match=message) as info:
            load_karpathy(bad, check_images=False)
        assert "bad.json" in str(info.value)


def test_raw_coco_errors(tmp_path: Path) -> None:
    path = _raw_coco(tmp_path)
    data = json.loads(path.read_text())
    data["annotations"].append({"image_id": 1, "id": 2, "caption": "x"})
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="unknown image_id 1"):
        load_coco_captions(path, tmp_path / "train2014")
    path.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(DataError, match="annotations"):
        load_coco_captions(path, tmp_path)


def test_missing_image_and_empty_split(tmp_path: Path) -> None:
    path = _coco_karpathy(tmp_path)
    missing = tmp_path / "coco" / "val2014" / "COCO_val2014_000000184613.jpg"
    missing.unlink()
    with pytest.raises(DataError, match="COCO_val2014_000000184613.jpg: image file not found"):
        load_karpathy(path, image_root=tmp_path / "coco")
    splits = load_karpathy(path, image_root=tmp_path / "coco", check_images=False)
    ds = CaptionEvalDataset(splits["val"], image_size=16)
    with pytest.raises(DataError, match="COCO_val2014_000000184613.jpg: file not found"):
        ds[0]
    with pytest.raises(DataError, match="split 'test2' is empty or absent"):
        get_split(splits, "test2", path)
    with pytest.raises(DataError, match="val2: the split is empty"):
        CaptionEvalDataset([], name="val2")
    corrupt = tmp_path / "coco" / "train2014" / "COCO_train2014_000000057870.jpg"
    corrupt.write_bytes(b"not a jpeg")
    vocab = Vocabulary.build([["a"]], min_count=1)
    with pytest.raises(DataError, match="COCO_train2014_000000057870.jpg: not an image"):
        CaptionTrainDataset(splits["train"], vocab, cache=True)
