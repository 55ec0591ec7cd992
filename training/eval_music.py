"""``bbservice eval music``: frame NLL of a checkpoint, with mean and Monte-Carlo gates."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from bbservice import checkpoints
from training import common
from training.music_batches import evaluate_nll
from training.music_data import load_music, trivial_baseline_nll

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run folder or its best/ folder")
    parser.add_argument("--data", default=None, help="default: the data the model trained on")
    parser.add_argument("--split", default="test", choices=("train", "valid", "test"))
    parser.add_argument(
        "--samples",
        type=int,
        default=0,
        help="also Monte-Carlo NLL with S sampled-gate passes (0: off)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None, help="also write the results to this file")


def evaluate(
    checkpoint, data=None, split="test", samples=0, seed=0, batch_size=64, device="auto"
) -> dict:
    """Mean-gate (and optionally Monte-Carlo) NLL of a split, with the trivial baseline."""
    device = common.pick_device(device)
    model, config = checkpoints.load_music(checkpoint, device)
    data = data or config["train"]["data"]
    splits = load_music(data)
    seqs = splits.split(split)
    total, frames = evaluate_nll(model, seqs, device=device, batch_size=batch_size)
    result = {
        "data": splits.name,
        "split": split,
        "gate": config["model"]["gate"]["family"],
        "predicted_frames": frames,
        "nll_mean_gates": total / frames,
        "trivial_baseline_nll": trivial_baseline_nll(splits, split),
    }
    if samples:
        mc_total, _ = evaluate_nll(
            model, seqs, device=device, batch_size=batch_size, samples=samples, seed=seed
        )
        result.update({"nll_monte_carlo": mc_total / frames, "samples": samples, "seed": seed})
    if getattr(model.config, "sparse", False):
        from bbservice.prune_report import format_report, prune_report

        report = prune_report(model)
        print(format_report(report), file=sys.stderr)  # stdout stays JSON
        result["prune"] = report["totals"]
    return result


def run(args: argparse.Namespace) -> int:
    result = evaluate(
        args.checkpoint,
        args.data,
        args.split,
        args.samples,
        args.seed,
        args.batch_size,
        args.device,
    )
    print(json.dumps(result, indent=2))
    if args.json:
        checkpoints.write_json(Path(args.json), result)
    return 0
