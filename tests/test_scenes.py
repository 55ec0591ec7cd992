"""Tests of training.scenes: determinism, truthful captions, holdout, Karpathy structure.

Caption truth is checked by an independent parser with its own (looser) geometry: a relation
holds if the displacement points within 45 degrees of the axis, regions use thirds with slack.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bbservice.errors import ConfigError
from training.scenes import COLOURS, generate_scenes

SIZES = {"small": "small", "little": "small", "large": "large", "big": "large"}
SHAPES = {
    "circle": "circle",
    "disk": "circle",
    "square": "square",
    "triangle": "triangle",
    "star": "star",
    "diamond": "diamond",
    "hexagon": "hexagon",
}
RELS = {
    "to the left of": "left",
    "on the left of": "left",
    "left of": "left",
    "to the right of": "right",
    "on the right of": "right",
    "right of": "right",
    "above": "above",
    "over": "above",
    "below": "below",
    "under": "below",
    "beneath": "below",
    "next to": "near",
    "beside": "near",
}
PRONOUNS = {
    "to its left": "left",
    "on its left": "left",
    "to its right": "right",
    "on its right": "right",
    "above it": "above",
    "below it": "below",
    "under it": "below",
}
_C = "|".join(COLOURS)
_S = "|".join(SHAPES)
_Z = "|".join(SIZES)
NP = rf"(?:a|an|the) (?:(?:{_Z}) )?(?:{_C}) (?:{_S})"
NP_PARTS = re.compile(rf"^(a|an|the) (?:({_Z}) )?({_C}) ({_S})$")
REL_RE = "|".join(sorted(map(re.escape, RELS), key=len, reverse=True))
PRON_RE = "|".join(map(re.escape, PRONOUNS))
NUM = {"two": 2, "three": 3}


# ----------------------------------------------------------------------------- geometry


def holds(rel: str, a: dict, b: dict, objects: list[dict]) -> bool:
    """Is `a` <rel> `b`? Dominant-axis test (within 45 degrees)."""
    dx, dy = b["x"] - a["x"], b["y"] - a["y"]
    if rel == "left":
        return dx > 0 and abs(dx) > abs(dy)
    if rel == "right":
        return dx < 0 and abs(dx) > abs(dy)
    if rel == "above":
        return dy > 0 and abs(dy) > abs(dx)
    if rel == "below":
        return dy < 0 and abs(dy) > abs(dx)
    assert rel == "near"
    gap = math.hypot(dx, dy) - a["r"] - b["r"]
    lo, hi = sorted((a["x"], b["x"]))
    between = any(lo < o["x"] < hi for o in objects if o is not a and o is not b)
    return abs(dx) > abs(dy) and gap < 0.25 and not between


def matches(np_text: str, objects: list[dict]) -> list[dict]:
    m = NP_PARTS.match(np_text)
    assert m, np_text
    det, size, colour, shape = m.groups()
    found = [
        o
        for o in objects
        if o["colour"] == colour
        and o["shape"] == SHAPES[shape]
        and (size is None or o["size"] == SIZES[size])
    ]
    if det == "the":  # a definite description must be unique (ignoring size)
        same = [o for o in objects if (o["colour"], o["shape"]) == (colour, SHAPES[shape])]
        assert len(same) == 1, f"'{np_text}' is not unique"
    return found


def exists_pair(rel: str, np1: str, np2: str, objects: list[dict]) -> bool:
    return any(
        holds(rel, a, b, objects)
        for a in matches(np1, objects)
        for b in matches(np2, objects)
        if a is not b
    )


def check_caption(caption: str, objects: list[dict]) -> int:
    """Assert every checkable claim of `caption`; return how many claims were checked."""
    checked = 0
    n = len(objects)
    # Every colour and shape word names something present.
    for word in caption.replace(",", "").replace(":", "").split():
        if word in COLOURS:
            assert any(o["colour"] == word for o in objects), word
        base = word[:-1] if word.endswith("s") and word[:-1] in SHAPES else word
        if base in SHAPES:
            assert any(o["shape"] == SHAPES[base] for o in objects), word
    # Noun phrases exist.
    for np_text in re.findall(rf"\b{NP}\b", caption):
        assert matches(np_text, objects), np_text
        checked += 1
    # Exact counts.
    for num, size, colour, noun in re.findall(
        rf"\b(two|three) (?:({_Z}) )?(?:({_C}) )?(\w+s)\b", caption
    ):
        base = noun[:-1]
        if base not in SHAPES and noun not in ("shapes", "objects"):
            continue
        count = sum(
            (not colour or o["colour"] == colour)
            and (base not in SHAPES or o["shape"] == SHAPES[base])
            and (not size or o["size"] == SIZES[size])
            for o in objects
        )
        assert count == NUM[num], f"count '{num} {colour} {noun}'"
        checked += 1
    for colour, shape in re.findall(
        rf"\b(?:one|a single|only one) (?:(?:{_Z}) )?({_C}) ({_S})", caption
    ):
        assert sum(o["colour"] == colour and o["shape"] == SHAPES[shape] for o in objects) == 1
        checked += 1
    for shape in re.findall(rf"\b(?:a|an) ({_S})\b", caption):  # "two circles and a square"
        assert sum(o["shape"] == SHAPES[shape] for o in objects) == 1, caption
        checked += 1
    for colour in re.findall(rf"\b(?:a|an) ({_C}) shape\b", caption):  # "... and a blue shape"
        assert sum(o["colour"] == colour for o in objects) == 1, caption
        checked += 1
    if re.match(r"(one|a single|only one) ", caption) or re.search(rf"({_S}) shape$", caption):
        assert n == 1
    # Relations.
    for np1, rel, np2 in re.findall(rf"({NP}) (?:is )?({REL_RE}) ({NP})", caption):
        assert exists_pair(RELS[rel], np1, np2, objects), f"'{np1} {rel} {np2}'"
        checked += 1
    for np1, np2, pron in re.findall(rf"({NP}) with ({NP}) ({PRON_RE})", caption):
        assert exists_pair(PRONOUNS[pron], np2, np1, objects), caption
        checked += 1
    for mid, first, last in re.findall(rf"({NP}) between ({NP}) and ({NP})", caption):
        ok = any(
            holds(rel, p, m, objects) and holds(rel, m, q, objects)
            for rel in ("left", "above")
            for m in matches(mid, objects)
            for p in matches(first, objects) + matches(last, objects)
            for q in matches(first, objects) + matches(last, objects)
            if len({id(m), id(p), id(q)}) == 3
        )
        assert ok, caption
        checked += 1
    m = re.match(r"from (left to right|top to bottom):? (.*)$", caption)
    if m:
        key, rel = ("x", "left") if m.group(1) == "left to right" else ("y", "above")
        nps = re.findall(NP, m.group(2))
        order = sorted(objects, key=lambda o: o[key])
        assert len(nps) == n == 3
        assert all(o in matches(t, objects) for t, o in zip(nps, order, strict=True)), caption
        assert holds(rel, order[0], order[1], objects) and holds(rel, order[1], order[2], objects)
        checked += 1
    if caption.endswith("side by side") or caption.endswith("one above the other"):
        rel = "left" if caption.endswith("side by side") else "above"
        assert n == 2
        a, b = objects
        assert holds(rel, a, b, objects) or holds(rel, b, a, objects), caption
        checked += 1
    # Image regions (single-object scenes).
    region = re.search(r"(in the (top|bottom) (left|right) corner|at the (top|bottom)|"
                       r"on the (left|right)$|in the center)", caption)  # fmt: skip
    if region:
        assert n == 1
        o = objects[0]
        words = region.group(0).split()
        tests = {
            "top": o["y"] < 0.35,
            "bottom": o["y"] > 0.65,
            "left": o["x"] < 0.35,
            "right": o["x"] > 0.65,
            "center": 0.35 <= o["x"] <= 0.65 and 0.35 <= o["y"] <= 0.65,
        }
        assert all(tests[w] for w in words if w in tests), caption
        checked += 1
    return checked


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("scenes")
    path = generate_scenes(
        out, 240, 30, 30, seed=7, image_size=64, holdout=[("red", "triangle"), ("blue", "star")]
    )
    return path, json.loads(path.read_text())


def test_karpathy_structure(scenes: tuple[Path, dict]) -> None:
    path, data = scenes
    assert path.name == "dataset_scenes.json" and data["dataset"] == "scenes"
    splits = [im["split"] for im in data["images"]]
    assert {s: splits.count(s) for s in set(splits)} == {
        "train": 240,
        "val": 30,
        "test": 30,
        "test_holdout": 30,
    }
    sentid = 0
    for imgid, im in enumerate(data["images"]):
        assert im["imgid"] == imgid
        assert (path.parent / im["filepath"] / im["filename"]).is_file()
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        assert im["sentids"][0] == sentid
        sentid += len(im["sentids"])
        for s in im["sentences"]:
            assert s["raw"][0].isupper() and s["raw"].endswith(".")
            assert s["tokens"] == re.sub(r"[.,:]", "", s["raw"].lower()).split()
            assert all(re.fullmatch(r"[a-z]+", t) for t in s["tokens"]), s["tokens"]


def test_five_distinct_captions_per_image(scenes: tuple[Path, dict]) -> None:
    for im in scenes[1]["images"]:
        raws = [s["raw"] for s in im["sentences"]]
        assert len(raws) >= 5 and len(set(raws)) == len(raws), raws


def test_captions_are_true_of_the_scene(scenes: tuple[Path, dict]) -> None:
    relation_claims = 0
    for im in scenes[1]["images"]:
        objects = im["scene"]["objects"]
        assert 1 <= len(objects) <= 3
        for s in im["sentences"]:
            caption = s["raw"][:-1].lower()  # keeps "from left to right: ..." punctuation
            checked = check_caption(caption, objects)
            assert checked >= 1 or re.fullmatch(r"(there are )?(two|three) shapes.*", caption), (
                f"nothing checkable in '{caption}'"
            )
            relation_claims += bool(re.search(rf"\b({REL_RE}|{PRON_RE}|between)\b", caption))
    assert relation_claims > 300  # relations are common, so they were really checked
    kinds = " ".join(s["raw"].lower() for im in scenes[1]["images"] for s in im["sentences"])
    for phrase in ("from left to right:", "between", "side by side", "corner", "two", "three"):
        assert phrase in kinds, phrase


def test_rendered_pixels_match_the_scene(scenes: tuple[Path, dict]) -> None:
    path, data = scenes
    for im in data["images"][:60]:
        pixels = np.asarray(Image.open(path.parent / im["filepath"] / im["filename"]))
        assert pixels.shape == (64, 64, 3)
        bg = im["scene"]["background"]
        assert tuple(pixels[0, 0]) == (bg, bg, bg) or len(im["scene"]["objects"]) > 0
        for o in im["scene"]["objects"]:
            x, y = int(o["x"] * 64), int(o["y"] * 64)
            got = pixels[y, x].astype(int)
            assert np.abs(got - np.array(COLOURS[o["colour"]])).max() <= 40, (im["filename"], o)
            # Big objects cover more pixels of their colour than small ones.
            near = np.abs(pixels.astype(int) - np.array(COLOURS[o["colour"]])).max(axis=2) < 40
            area = near.sum() / (64 * 64)
            assert area >= 0.3 * math.pi * o["r"] ** 2  # star, triangle: ~0.4 of the circle


def test_holdout_combinations(scenes: tuple[Path, dict]) -> None:
    held = {("red", "triangle"), ("blue", "star")}
    for im in scenes[1]["images"]:
        combos = {(o["colour"], o["shape"]) for o in im["scene"]["objects"]}
        text = " ".join(s["raw"].lower() for s in im["sentences"])
        if im["split"] == "test_holdout":
            assert combos & held
        else:
            assert not combos & held, im["filename"]
            assert not re.search(r"red (small |little |large |big )?triangle", text)
            assert not re.search(r"blue (small |little |large |big )?star", text)


def test_deterministic(tmp_path: Path) -> None:
    a = generate_scenes(
        tmp_path / "a", 20, 3, 3, seed=5, image_size=48, holdout=[("green", "star")]
    )
    b = generate_scenes(
        tmp_path / "b", 20, 3, 3, seed=5, image_size=48, holdout=[("green", "star")]
    )
    c = generate_scenes(
        tmp_path / "c", 20, 3, 3, seed=6, image_size=48, holdout=[("green", "star")]
    )
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    names = sorted(p.name for p in (a.parent / "images").iterdir())
    assert len(names) == 29 and names == sorted(p.name for p in (b.parent / "images").iterdir())
    for name in names:
        assert (a.parent / "images" / name).read_bytes() == (
            b.parent / "images" / name
        ).read_bytes()


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="holdout"):
        generate_scenes(tmp_path, 1, 0, 0, holdout=[("pink", "circle")])
    with pytest.raises(ConfigError, match="n_val"):
        generate_scenes(tmp_path, 1, -1, 0)
    with pytest.raises(ConfigError, match="image_size"):
        generate_scenes(tmp_path, 1, 0, 0, image_size=8)
    with pytest.raises(ConfigError, match="all split sizes are 0"):
        generate_scenes(tmp_path, 0, 0, 0)


def test_checker_rejects_false_captions() -> None:
    """The truth checker above is not vacuous: false statements about a scene fail it."""
    red = {"shape": "circle", "colour": "red", "size": "small", "x": 0.2, "y": 0.5, "r": 0.08}
    blue = {"shape": "square", "colour": "blue", "size": "large", "x": 0.7, "y": 0.5, "r": 0.15}
    objects = [red, blue]
    assert check_caption("a red circle to the left of a blue square", objects) == 3
    false = [
        "a red circle to the right of a blue square",
        "a red circle above a blue square",
        "a blue square with a red circle on its right",
        "a large red circle and a blue square",
        "three shapes",
        "two red circles",
        "a green circle",
        "a red triangle and a blue square",
        "the red circle is below the blue square",
        "a red circle and a blue square one above the other",
    ]
    for caption in false:
        with pytest.raises(AssertionError):
            check_caption(caption, objects)
