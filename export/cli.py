"""``bbservice export music|caption CHECKPOINT --out DIR``: ONNX graphs, verified, stored.

Writes the export folder (``export/onnx_export.py`` describes it), verifies every graph against
the PyTorch model (a disagreement beyond ``--tolerance`` fails with exit status 2 and leaves no
folder), saves the folder into BentoML's model store as ``bbservice-music`` /
``bbservice-caption`` unless ``--no-store``, and prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from bbservice.errors import ConfigError

log = logging.getLogger(__name__)


def _common(parser: argparse.ArgumentParser, kind: str) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint or run folder")
    parser.add_argument(
        "--out", default=f"exports/{kind}", help=f"export folder (default: exports/{kind})"
    )
    parser.add_argument("--fp16", action="store_true", help="also a float16 variant (for GPUs)")
    parser.add_argument(
        "--int8", action="store_true", help="also a dynamically quantized int8 variant (CPU)"
    )
    parser.add_argument(
        "--no-store", action="store_true", help="do not save into the BentoML model store"
    )
    parser.add_argument(
        "--no-checkpoint",
        action="store_true",
        help="leave out checkpoint/ (the PyTorch weights a service needs for mode=stochastic)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest allowed |onnx - torch| (relative above magnitude 1); default 1e-4",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the verification inputs")
    parser.add_argument(
        "--verify-device",
        default="cpu",
        choices=("cpu", "cuda", "auto"),
        help="ONNX Runtime device of the verification (default cpu)",
    )
    pruning = parser.add_argument_group(
        "pruning (checkpoints trained with --sparsify)",
        "what the pruned graph takes out of the matrix products; below the minimum, zero "
        "weights stay in the dense products (exact too, and faster than gathers when few)",
    )
    pruning.add_argument(
        "--min-column-saving",
        type=float,
        default=0.25,
        metavar="FRACTION",
        help="gather away unused input / recurrent columns from this fraction on (0.25)",
    )
    pruning.add_argument(
        "--min-gate-saving",
        type=float,
        default=0.25,
        metavar="FRACTION",
        help="precompute the gates of constant-gate units from this fraction of a layer's "
        "units on (0.25; 1: whole layers only)",
    )


def _export_options(args: argparse.Namespace, checkpoint: Path) -> dict:
    """The keyword arguments every exporter takes from the shared options."""
    return {
        "fp16": args.fp16,
        "int8": args.int8,
        "store": not args.no_store,
        "checkpoint": not args.no_checkpoint,
        "tolerance": args.tolerance,
        "seed": args.seed,
        "verify_device": args.verify_device,
        "source": {"checkpoint": str(checkpoint.resolve())},
    }


def _compaction(args: argparse.Namespace):
    from bbservice.pruning import Compaction

    return Compaction(args.min_column_saving, args.min_gate_saving)


def add_music_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser, "music")
    parser.add_argument(
        "--primer", default=None, metavar="MIDI", help="also verify on this piece (teacher-forced)"
    )


def add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser, "caption")
    parser.add_argument(
        "--images",
        nargs="+",
        default=None,
        metavar="IMAGE",
        help="real images for the verification (default: rendered shape scenes)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:  # pragma: no cover - cli.py fallback
    add_music_arguments(parser)


def _check_tolerance(args: argparse.Namespace) -> None:
    if not args.tolerance > 0:
        raise ConfigError(f"--tolerance must be > 0, got {args.tolerance}")


def _summary(result) -> dict:
    m = result.manifest
    summary = {
        "out": str(result.path),
        "kind": m["kind"],
        "gate_family": m["gate_family"],
        "files": {name: info["bytes"] for name, info in m["files"].items()},
        "precisions": m["precisions"],
        "verification": {
            "passed": m["verification"]["passed"],
            "tolerance": m["verification"]["tolerance"],
            "max_abs_diff": m["verification"]["max_abs_diff"],
        },
        "accuracy": {p: a["max_abs_diff"] for p, a in m["accuracy"].items()},
        "store_tag": result.store_tag,
    }
    if "generation" in m["verification"]:
        summary["verification"]["midi_identical"] = m["verification"]["generation"][
            "midi_identical"
        ]
    if "beam_search" in m["verification"]:
        summary["verification"]["same_beam_captions"] = m["verification"]["beam_search"]["all_same"]
    return summary


def run_music(args: argparse.Namespace) -> int:
    from bbservice import checkpoints
    from bbservice.pianoroll import Grid, load_midi_roll
    from export.onnx_export import export_music

    _check_tolerance(args)
    model, config = checkpoints.load_music(args.checkpoint, "cpu")
    primer = (
        load_midi_roll(args.primer, **Grid.of_checkpoint(config).to_dict()) if args.primer else None
    )
    exporter, extra = export_music, {}
    if getattr(model.config, "sparse", False):  # the smaller dense graph of the pruned model
        from export.pruned import export_pruned_music as exporter

        extra = {"compaction": _compaction(args)}
    result = exporter(
        model,
        args.out,
        config=config,
        primer=primer,
        **_export_options(args, Path(args.checkpoint)),
        **extra,
    )
    print(json.dumps(_summary(result), indent=2))
    return 0


def run_caption(args: argparse.Namespace) -> int:
    import numpy as np

    from bbservice import checkpoints
    from bbservice.images import load_image, preprocess
    from export.onnx_export import export_caption

    _check_tolerance(args)
    model, vocab, folder = checkpoints.load_caption(args.checkpoint, "cpu")
    config = json.loads((folder / "config.json").read_text())
    images = None
    if args.images:
        size = model.config.image_size
        images = np.stack([preprocess(load_image(p), size) for p in args.images])
    exporter, extra = export_caption, {}
    if model.config.sparse:  # the pruned decoder cell
        from export.pruned import export_pruned_caption as exporter

        extra = {"compaction": _compaction(args)}
    result = exporter(
        model,
        args.out,
        vocabulary=vocab.itos,
        config=config,
        images=images,
        **_export_options(args, folder),
        **extra,
    )
    print(json.dumps(_summary(result), indent=2))
    return 0
