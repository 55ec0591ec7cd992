"""``bbservice generate scenes``: render the captioned shape-scene data set (Karpathy JSON).

Example::

    bbservice generate scenes --out data/scenes --n-train 3000 --image-size 64 \\
        --holdout red:triangle,blue:circle --seed 0

writes ``data/scenes/dataset_scenes.json`` and ``data/scenes/images/*.png``; the held-out
colour-shape pairs never occur in train/val/test and make up the ``test_holdout`` split.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from bbservice.errors import ConfigError
from training.scenes import COLOURS, SHAPES, generate_scenes


def parse_holdout(values: list[str]) -> list[tuple[str, str]]:
    """``["red:triangle,blue:circle", "green:star"]`` → ``[("red", "triangle"), ...]``."""
    pairs = []
    for value in values:
        for item in filter(None, (v.strip() for v in value.split(","))):
            colour, sep, shape = item.partition(":")
            if not sep or not colour or not shape:
                raise ConfigError(
                    f"--holdout: {item!r} is not COLOUR:SHAPE (colours: {', '.join(COLOURS)}; "
                    f"shapes: {', '.join(SHAPES)})"
                )
            pairs.append((colour.strip(), shape.strip()))
    return pairs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-val", type=int, default=100)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument(
        "--n-holdout", type=int, default=None, help="test_holdout size (default: --n-test)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=128, help="PNG side in pixels (>= 32)")
    parser.add_argument("--captions", type=int, default=5, help="captions per image")
    parser.add_argument(
        "--holdout",
        action="append",
        default=[],
        metavar="COLOUR:SHAPE[,...]",
        help="colour-shape pairs kept out of train/val/test (repeatable or comma-separated)",
    )


def run(args: argparse.Namespace) -> int:
    path = generate_scenes(
        args.out,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        seed=args.seed,
        image_size=args.image_size,
        holdout=parse_holdout(args.holdout),
        n_holdout=args.n_holdout,
        n_captions=args.captions,
    )
    splits = Counter(im["split"] for im in json.loads(path.read_text())["images"])
    print(f"{path}: " + ", ".join(f"{k} {v}" for k, v in splits.items()))
    return 0
