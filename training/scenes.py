"""Seeded generator of rendered shape scenes with true captions, in Karpathy JSON form.

Each image holds 1-3 non-overlapping objects with a shape, a colour, a size (small/large) and a
position. Every pair of objects in a multi-object scene is placed so that exactly one spatial
relation (left of / right of / above / below) clearly holds; captions only state facts that the
scene description (saved in the JSON under ``"scene"``) makes true.

Layout of ``generate_scenes(out_dir, ...)``::

    out_dir/dataset_scenes.json         Karpathy format, "dataset": "scenes"
    out_dir/images/{split}_{index:05d}.png

Splits are "train", "val", "test" and, when ``holdout`` is given, "test_holdout". Held-out
(colour, shape) combinations never appear in train/val/test images; every "test_holdout" image
contains at least one of them (its other objects may be any combination). This measures
compositional generalisation: the colour and the shape were each seen in training, never together.

Coordinates: x, y and the radius r are fractions of the image side, origin top-left, y down.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from bbservice.errors import ConfigError

__all__ = [
    "COLOURS",
    "SHAPES",
    "Scene",
    "SceneObject",
    "caption_scene",
    "generate_scenes",
    "make_scene",
    "next_to",
    "relation",
    "render_scene",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "hexagon")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 200, 30),
    "purple": (135, 55, 175),
    "orange": (240, 130, 25),
}
RADII: dict[str, tuple[float, float]] = {"small": (0.065, 0.09), "large": (0.14, 0.175)}
DOMINANCE = 2.5  # a relation holds along an axis only if |d_axis| >= DOMINANCE * |d_other|
MIN_SEPARATION = 0.15  # ... and |d_axis| >= this (image fractions)
NEAR_GAP = 0.2  # "next to": horizontal neighbours with at most this gap between outlines
MARGIN = 0.02
_NO_PUNCT = str.maketrans("", "", string.punctuation)

SHAPE_WORDS = {s: (s,) for s in SHAPES} | {"circle": ("circle", "disk")}  # synonyms
PLURAL = {w: w + "s" for words in SHAPE_WORDS.values() for w in words}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
REL_WORDS = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "next to": ("next to", "beside"),
}
REL_PRONOUN = {
    "left of": ("to its left", "on its left"),
    "right of": ("to its right", "on its right"),
    "above": ("above it",),
    "below": ("below it", "under it"),
}
NUMBERS = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class SceneObject:
    """One drawn object; x, y, r are fractions of the image side (y down)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    r: float
    angle: float = 0.0


@dataclass(frozen=True)
class Scene:
    """Objects plus the background grey level (0-255)."""

    objects: tuple[SceneObject, ...]
    background: int = 240

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects], "background": self.background}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(tuple(SceneObject(**o) for o in d["objects"]), int(d["background"]))


# ----------------------------------------------------------------------------- geometry


def relation(a: SceneObject, b: SceneObject) -> str | None:
    """The relation of `a` to `b` ("left of", "right of", "above", "below"), or None."""
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dx) >= DOMINANCE * abs(dy) and abs(dx) >= MIN_SEPARATION:
        return "left of" if dx > 0 else "right of"
    if abs(dy) >= DOMINANCE * abs(dx) and abs(dy) >= MIN_SEPARATION:
        return "above" if dy > 0 else "below"
    return None


def next_to(a: SceneObject, b: SceneObject, objects: Sequence[SceneObject]) -> bool:
    """True if a and b are horizontal neighbours, close, with no object between them in x."""
    if relation(a, b) not in ("left of", "right of"):
        return False
    gap = math.hypot(a.x - b.x, a.y - b.y) - a.r - b.r
    lo, hi = sorted((a.x, b.x))
    return gap <= NEAR_GAP and not any(lo < o.x < hi for o in objects if o is not a and o is not b)


def _region(o: SceneObject) -> str | None:
    col = "left" if o.x < 0.3 else "right" if o.x > 0.7 else "center" if 0.4 <= o.x <= 0.6 else None
    row = "top" if o.y < 0.3 else "bottom" if o.y > 0.7 else "middle" if 0.4 <= o.y <= 0.6 else None
    if col is None or row is None:
        return None
    if row == "middle":
        return {"left": "on the left", "right": "on the right", "center": "in the center"}[col]
    if col == "center":
        return f"at the {row}"
    return f"in the {row} {col} corner"


# ----------------------------------------------------------------------------- sampling


def make_scene(
    rng: random.Random,
    combos: Sequence[tuple[str, str]],
    required: Sequence[tuple[str, str]] = (),
) -> Scene:
    """Sample a scene with 1-3 objects whose (colour, shape) come from `combos`.

    If `required` is non-empty the first object's (colour, shape) is drawn from it instead.
    """
    for _ in range(1000):
        n = rng.choices((1, 2, 3), weights=(0.25, 0.4, 0.35))[0]
        kinds = [rng.choice(required) if required else rng.choice(combos)]
        for _ in range(n - 1):
            kinds.append(rng.choice(kinds) if rng.random() < 0.25 else rng.choice(combos))
        sizes = [rng.choice(("small", "large")) for _ in range(n)]
        radii = [round(rng.uniform(*RADII[s]), 4) for s in sizes]
        for _ in range(200):
            objs = tuple(
                SceneObject(
                    shape=shape,
                    colour=colour,
                    size=size,
                    x=round(rng.uniform(r + MARGIN, 1 - r - MARGIN), 4),
                    y=round(rng.uniform(r + MARGIN, 1 - r - MARGIN), 4),
                    r=r,
                    angle=round(rng.uniform(-12, 12), 1),
                )
                for (colour, shape), size, r in zip(kinds, sizes, radii, strict=True)
            )
            if _valid_layout(objs):
                return Scene(objs, background=rng.randint(225, 250))
    raise RuntimeError("could not place objects")  # pragma: no cover - never reached in practice


def _valid_layout(objs: Sequence[SceneObject]) -> bool:
    for i, a in enumerate(objs):
        for b in objs[i + 1 :]:
            if math.hypot(a.x - b.x, a.y - b.y) < a.r + b.r + 0.04 or relation(a, b) is None:
                return False
    return True


# ----------------------------------------------------------------------------- rendering


def _polygon(o: SceneObject, cx: float, cy: float, rad: float) -> list[tuple[float, float]]:
    def ring(n: int, start: float, radii: Sequence[float]) -> list[tuple[float, float]]:
        pts = []
        for k in range(n * len(radii)):
            a = math.radians(start + o.angle + k * 360 / (n * len(radii)))
            rr = rad * radii[k % len(radii)]
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts

    if o.shape == "square":
        return ring(4, 45, (1.0,))
    if o.shape == "triangle":
        return ring(3, -90, (1.0,))
    if o.shape == "star":
        return ring(5, -90, (1.0, 0.45))
    if o.shape == "hexagon":
        return ring(6, 0, (1.0,))
    if o.shape == "diamond":
        t = math.radians(o.angle)
        pts = [(0, -1), (0.62, 0), (0, 1), (-0.62, 0)]
        return [
            (
                cx + rad * (u * math.cos(t) - v * math.sin(t)),
                cy + rad * (u * math.sin(t) + v * math.cos(t)),
            )
            for u, v in pts
        ]
    raise ValueError(f"unknown shape {o.shape!r}")


def render_scene(scene: Scene, image_size: int = 128, supersample: int = 4) -> Image.Image:
    """Draw a scene, anti-aliased by supersampling.

    Returns
    -------
    PIL.Image.Image
        RGB, (image_size, image_size).
    """
    side = image_size * supersample
    g = scene.background
    canvas = Image.new("RGB", (side, side), (g, g, g))
    draw = ImageDraw.Draw(canvas)
    for o in scene.objects:
        fill = COLOURS[o.colour]
        cx, cy, rad = o.x * side, o.y * side, o.r * side
        if o.shape == "circle":
            draw.ellipse((cx - rad, cy - rad, cx + rad, cy + rad), fill=fill)
        else:
            draw.polygon(_polygon(o, cx, cy, rad), fill=fill)
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


# ----------------------------------------------------------------------------- captions


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class _Words:
    """Random word choices for one caption family."""

    def __init__(self, rng: random.Random, objects: Sequence[SceneObject]) -> None:
        self.rng, self.objects = rng, objects

    def unique(self, o: SceneObject) -> bool:
        return sum((p.colour, p.shape) == (o.colour, o.shape) for p in self.objects) == 1

    def np(self, o: SceneObject, det: str = "a", size: bool | None = None) -> str:
        if size is None:
            size = self.rng.random() < 0.5
        words = ([self.rng.choice(SIZE_WORDS[o.size])] if size else []) + [
            o.colour,
            self.rng.choice(SHAPE_WORDS[o.shape]),
        ]
        if det == "a":
            det = _a(words[0])
        return " ".join([det, *words]) if det else " ".join(words)

    def the(self, o: SceneObject) -> str:
        return self.np(o, "the", size=False)

    def rel(self, r: str) -> str:
        return self.rng.choice(REL_WORDS[r])


def _count_phrase(groups: Counter, noun_of: Callable[[Any, int], str]) -> str:
    """ "two red circles and a blue square" from {key: count} and a noun for (key, count)."""
    parts = []
    for key, count in sorted(groups.items(), key=lambda kv: (-kv[1], kv[0])):
        noun = noun_of(key, count)
        parts.append(f"{NUMBERS[count]} {noun}" if count > 1 else f"{_a(noun)} {noun}")
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _families(scene: Scene, rng: random.Random) -> tuple[list[list[str]], list[list[str]]]:
    """(must-have families, other families): lists of candidate captions."""
    objs = scene.objects
    w = _Words(rng, objs)
    n = len(objs)
    must: list[list[str]] = []
    other: list[list[str]] = []
    if n == 1:
        o = objs[0]
        other += [
            [w.np(o, size=True), w.np(o, size=False)],
            [f"there is {w.np(o)}", f"there is {w.np(o)} in the picture"],
            [f"{w.np(o)} on a plain background", f"{w.np(o)} on a light gray background"],
            [f"one {w.np(o, '')}", f"a single {w.np(o, '')}", f"only one {w.np(o, '')}"],
            [f"{p} {w.np(o)}" for p in ("a picture of", "an image of", "a drawing of")],
            [
                f"{w.np(o, size=True)} shape",
                f"{_a(o.shape)} {rng.choice(SHAPE_WORDS[o.shape])} that is {o.colour}",
            ],
        ]
        region = _region(o)
        if region:
            must.append([f"{w.np(o)} {region}", f"there is {w.np(o)} {region}"])
        return must, other

    def listing(items: Sequence[SceneObject]) -> str:
        nps = [w.np(o) for o in items]
        return (
            nps[0] + " and " + nps[1] if len(nps) == 2 else ", ".join(nps[:-1]) + " and " + nps[-1]
        )

    shuffled = list(objs)
    rng.shuffle(shuffled)
    other.append([listing(shuffled), f"there is {listing(shuffled)}"])
    other.append(
        [f"{NUMBERS[n]} shapes: {listing(shuffled)}", f"{NUMBERS[n]} objects, {listing(shuffled)}"]
    )
    other.append([f"there are {NUMBERS[n]} shapes", f"{NUMBERS[n]} shapes on a plain background"])

    def shape_noun(key: tuple[str, ...], count: int) -> str:
        word = rng.choice(SHAPE_WORDS[key[-1]])
        return PLURAL[word] if count > 1 else word

    by_kind = Counter((o.colour, o.shape) for o in objs)
    by_shape = Counter((o.shape,) for o in objs)
    by_colour = Counter(o.colour for o in objs)
    counts = [
        _count_phrase(by_kind, lambda k, c: f"{k[0]} {shape_noun(k, c)}"),
        _count_phrase(by_shape, shape_noun),
    ]
    if len(by_colour) < n:
        counts.append(
            _count_phrase(by_colour, lambda k, c: f"{k} {'shapes' if c > 1 else 'shape'}")
        )
    if len(by_kind) < n:
        must.append(counts)
    else:
        other.append(counts)

    pairs = [(a, b, relation(a, b)) for a in objs for b in objs if a is not b]
    pairs = [(a, b, r) for a, b, r in pairs if r is not None]
    rng.shuffle(pairs)

    def pair(a: SceneObject, b: SceneObject) -> tuple[str, str] | None:
        """Indefinite NPs for a and b; sizes forced when only size tells them apart."""
        if (a.colour, a.shape) != (b.colour, b.shape):
            return w.np(a), w.np(b)
        if a.size == b.size:
            return None  # identical descriptions: "a red circle left of a red circle"
        return w.np(a, size=True), w.np(b, size=True)

    named = [(p, r) for a, b, r in pairs if (p := pair(a, b)) is not None]
    must.append([f"{pa} {w.rel(r)} {pb}" for (pa, pb), r in named[:3]])
    other.append([f"{pb} with {pa} {rng.choice(REL_PRONOUN[r])}" for (pa, pb), r in named[:3]])
    the_caps = [
        f"{w.the(a)} is {w.rel(r)} {w.the(b)}" for a, b, r in pairs if w.unique(a) and w.unique(b)
    ]
    other.append(the_caps[:3])
    near = [p for a, b, r in pairs if next_to(a, b, objs) and (p := pair(a, b)) is not None]
    other.append([f"{pa} {w.rel('next to')} {pb}" for pa, pb in near[:2]])
    if n == 2:
        a, b, r = pairs[0]
        how = "side by side" if r in ("left of", "right of") else "one above the other"
        p = pair(a, b)
        if p is None:
            noun = PLURAL[rng.choice(SHAPE_WORDS[a.shape])]
            other.append([f"two {a.colour} {noun} {how}", f"two {a.size} {a.colour} {noun} {how}"])
        else:
            other.append([f"{p[0]} and {p[1]} {how}"])
    else:
        distinct = len({(o.colour, o.shape, o.size) for o in objs}) == n
        for axis, word, rel_word in (
            ("x", "left to right", "left of"),
            ("y", "top to bottom", "above"),
        ):
            order = sorted(objs, key=lambda o: getattr(o, axis))
            if all(relation(p, q) == rel_word for i, p in enumerate(order) for q in order[i + 1 :]):
                fam = [f"from {word}: {listing(order)}"]
                if distinct:
                    nps = [w.np(o, size=len(by_kind) < n or None) for o in order]
                    fam.append(f"{nps[1]} between {nps[0]} and {nps[2]}")
                must.append(fam)
    return must, other


def caption_scene(scene: Scene, rng: random.Random, n_captions: int = 5) -> list[str]:
    """Return `n_captions` distinct, lowercase captions that are true of `scene`.

    One caption is taken from each caption family in turn (families that state relations,
    counts or positions first), with random synonyms and optional size words.
    """
    must, other = _families(scene, rng)
    rng.shuffle(must)
    rng.shuffle(other)
    families = [list(dict.fromkeys(f)) for f in must + other if f]
    chosen: list[str] = []
    for _ in range(50):
        for fam in families:
            options = [c for c in fam if c not in chosen]
            if options and len(chosen) < n_captions:
                chosen.append(rng.choice(options))
        if len(chosen) >= n_captions:
            return chosen
        must, other = _families(scene, rng)  # fresh synonyms for more candidates
        families = [list(dict.fromkeys(f)) for f in must + other if f]
    raise RuntimeError("not enough distinct captions")  # pragma: no cover


# ----------------------------------------------------------------------------- data set


def _combos(
    holdout: Iterable[Sequence[str]],
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    held: list[tuple[str, str]] = []
    for item in holdout:
        if len(item) != 2 or item[0] not in COLOURS or item[1] not in SHAPES:
            raise ConfigError(
                f"holdout: {tuple(item)!r} is not a (colour, shape) pair; colours are "
                f"{', '.join(COLOURS)} and shapes {', '.join(SHAPES)}"
            )
        held.append((item[0], item[1]))
    allowed = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in held]
    if not allowed:
        raise ConfigError("holdout: every colour-shape combination is held out")
    return allowed, sorted(set(held))


def generate_scenes(
    out_dir: str | Path,
    n_train: int = 1000,
    n_val: int = 100,
    n_test: int = 100,
    seed: int = 0,
    image_size: int = 128,
    holdout: Iterable[Sequence[str]] = (),
    *,
    n_holdout: int | None = None,
    n_captions: int = 5,
) -> Path:
    """Render a captioned scene data set and write its Karpathy-format JSON.

    Parameters
    ----------
    out_dir : path
        Created if needed; images go to ``out_dir/images``.
    n_train, n_val, n_test : int
        Images per split.
    seed : int
        Same seed and arguments give byte-identical images and JSON.
    image_size : int
        Side of the square PNG images, >= 32.
    holdout : iterable of (colour, shape)
        Combinations kept out of train/val/test; they form the "test_holdout" split.
    n_holdout : int, optional
        Size of "test_holdout" (default ``n_test``; 0 without holdout).
    n_captions : int
        Distinct captions per image, >= 1.

    Returns
    -------
    Path
        ``out_dir/dataset_scenes.json``.
    """
    allowed, held = _combos(holdout)
    n_holdout = (n_test if held else 0) if n_holdout is None else n_holdout
    counts = {"train": n_train, "val": n_val, "test": n_test, "test_holdout": n_holdout}
    for arg, value in zip(
        ("n_train", "n_val", "n_test", "n_holdout"), counts.values(), strict=True
    ):
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"{arg} must be a non-negative integer, got {value!r}")
    if n_holdout and not held:
        raise ConfigError("n_holdout > 0 needs a non-empty holdout list")
    if sum(counts.values()) == 0:
        raise ConfigError("generate_scenes: all split sizes are 0")
    if image_size < 32:
        raise ConfigError(f"image_size must be >= 32, got {image_size}")
    if n_captions < 1:
        raise ConfigError(f"n_captions must be >= 1, got {n_captions}")

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, imgid, sentid = [], 0, 0
    for split, count in counts.items():
        for index in range(count):
            rng = random.Random(f"scenes/{seed}/{split}/{index}")
            scene = make_scene(rng, allowed, held if split == "test_holdout" else ())
            captions = caption_scene(scene, rng, n_captions)
            filename = f"{split}_{index:05d}.png"
            render_scene(scene, image_size).save(out / "images" / filename, format="PNG")
            sentences = [
                {
                    "tokens": c.translate(_NO_PUNCT).split(),
                    "raw": c[0].upper() + c[1:] + ".",
                    "imgid": imgid,
                }
                | {"sentid": sentid + k}
                for k, c in enumerate(captions)
            ]
            images.append(
                {
                    "filepath": "images",
                    "filename": filename,
                    "split": split,
                    "imgid": imgid,
                    "sentids": list(range(sentid, sentid + len(captions))),
                    "sentences": sentences,
                    "scene": scene.to_dict(),
                }
            )
            imgid += 1
            sentid += len(captions)
    meta = {
        "seed": seed,
        "image_size": image_size,
        "holdout": [list(h) for h in held],
        "colours": list(COLOURS),
        "shapes": list(SHAPES),
    }
    path = out / "dataset_scenes.json"
    path.write_text(json.dumps({"images": images, "dataset": "scenes", "meta": meta}))
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m training.scenes OUT_DIR --n-train 1000 --holdout red:triangle``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-val", type=int, default=100)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--n-holdout", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--captions", type=int, default=5)
    p.add_argument("--holdout", nargs="*", default=[], metavar="COLOUR:SHAPE")
    a = p.parse_args(argv)
    holdout = [tuple(h.split(":")) for h in a.holdout]
    path = generate_scenes(
        a.out_dir, a.n_train, a.n_val, a.n_test, a.seed, a.image_size, holdout,
        n_holdout=a.n_holdout, n_captions=a.captions,
    )  # fmt: skip
    print(path)


if __name__ == "__main__":
    main()
