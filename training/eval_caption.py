"""``bbservice eval caption``: caption metrics of a checkpoint on one split of a Karpathy JSON.

Decodes every image of the split (greedy or beam search, mean gates), scores the captions with
BLEU-1..4, ROUGE-L and CIDEr-D (METEOR with ``--meteor`` when Java is present) and prints them
beside the most-frequent-caption baseline of the same split (the most frequent training caption
of the same JSON given to every image). ``--out FILE`` also writes everything as JSON.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from bbservice import checkpoints
from bbservice.decoding import beam_search, greedy
from bbservice.errors import ConfigError
from bbservice.models.caption import CaptionModel, TorchCaptionStepper
from bbservice.vocab import END_ID, START_ID, Vocabulary
from training import common
from training.caption_cli import add_diverse_beam_arguments, check_diverse_beam
from training.caption_data import (
    CaptionEvalDataset,
    CaptionItem,
    collate_eval,
    get_split,
    load_karpathy,
)
from training.caption_metrics import most_frequent_caption_baseline, score_captions

log = logging.getLogger(__name__)


def _encode_references(
    refs: list[list[list[str]]], vocab: Vocabulary, max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first reference of every image as padded ids (B, L) and lengths (B,)."""
    ids = [vocab.encode(r[0], max_length) for r in refs]
    lengths = torch.tensor([len(x) for x in ids])
    captions = torch.full((len(ids), int(lengths.max())), vocab.pad_id, dtype=torch.long)
    for i, x in enumerate(ids):
        captions[i, : len(x)] = torch.tensor(x)
    return captions, lengths


def decode_dataset(
    model: CaptionModel, vocab: Vocabulary, dataset: CaptionEvalDataset, **options: Any
) -> tuple[dict[int, str], float]:
    """Caption every image of ``dataset`` with mean gates; ``options`` are those of
    :func:`decode_dataset_sums` (beam, length penalty, batch size, device, progress, and
    ``beam_groups``/``diversity`` for diverse beam search, scoring the best of all groups).

    Returns ``(captions, ce)``: index → caption text, and the teacher-forced cross-entropy per
    token of each image's first reference (a deterministic validation loss).
    """
    captions, ce_sum, tokens = decode_dataset_sums(model, vocab, dataset, **options)
    return captions, ce_sum / max(tokens, 1)


def decode_dataset_sums(
    model: CaptionModel,
    vocab: Vocabulary,
    dataset: CaptionEvalDataset,
    *,
    beam: int = 1,
    length_penalty: float = 0.0,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    progress: bool = False,
    beam_groups: int = 1,
    diversity: float = 0.0,
) -> tuple[dict[int, str], float, int]:
    """:func:`decode_dataset` with the cross-entropy as ``(sum over tokens, tokens)``, so that
    shares decoded by several processes add up exactly.

    ``dataset.images[i]`` may be an image (3, S, S) or, from a
    :class:`training.feature_cache.FeatureCache`, the encoder features (P, C) themselves.
    """
    model.eval()
    device = torch.device(device)
    stepper = TorchCaptionStepper(model, "mean", device=device)
    max_length = model.config.max_length
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_eval)
    captions: dict[int, str] = {}
    ce_sum, tokens = 0.0, 0
    for images, refs, index in tqdm(
        loader,
        desc="decoding",
        disable=not common.progress_enabled(progress),
        leave=False,
        unit="batch",
    ):
        with torch.inference_mode():
            images = images.to(device)
            # (B, 3, S, S) images, or (B, P, C) cached features
            features = model.encoder(images) if images.dim() == 4 else images
            caps, lengths = _encode_references(refs, vocab, max_length)
            caps, lengths = caps.to(device), lengths.to(device)
            outputs = model.decoder(features, caps, lengths, gate_mode="mean")
            loss = model.loss(outputs, caps, lengths)
            ce_sum += float(loss.ce) * loss.tokens
            tokens += loss.tokens
        if beam > 1:
            best = beam_search(
                stepper,
                features,
                start_id=START_ID,
                end_id=END_ID,
                beam_size=beam,
                max_length=max_length,
                length_penalty=length_penalty,
                groups=beam_groups,
                diversity=diversity,
            )
            hyps = [b[0] for b in best]
        else:
            hyps = greedy(
                stepper, features, start_id=START_ID, end_id=END_ID, max_length=max_length
            )
        for i, hyp in zip(index.tolist(), hyps, strict=True):
            captions[i] = " ".join(vocab.decode(hyp.tokens))
    return captions, ce_sum, tokens


def evaluate(
    model: CaptionModel,
    vocab: Vocabulary,
    items: list[CaptionItem],
    *,
    beam: int = 1,
    length_penalty: float = 0.0,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    cache: bool = False,
    meteor: bool = False,
    progress: bool = False,
    dataset: CaptionEvalDataset | None = None,
    beam_groups: int = 1,
    diversity: float = 0.0,
) -> dict:
    """Decode and score ``items``: ``{"metrics": {...}, "ce": float, "captions": {i: str}}``."""
    if dataset is None:
        dataset = CaptionEvalDataset(items, model.config.image_size, cache=cache)
    captions, ce = decode_dataset(
        model,
        vocab,
        dataset,
        beam=beam,
        length_penalty=length_penalty,
        batch_size=batch_size,
        device=device,
        progress=progress,
        beam_groups=beam_groups,
        diversity=diversity,
    )
    metrics = score_captions(dataset.references(), captions, meteor=meteor)
    return {"metrics": metrics, "ce": ce, "captions": captions}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (or run folder)")
    parser.add_argument("--data", required=True, help="Karpathy-format JSON")
    parser.add_argument("--image-root", default=None, help="image folder (default: the JSON's)")
    parser.add_argument(
        "--split", default="test", help="split to score: test, test_holdout, val, ..."
    )
    parser.add_argument("--beam", type=int, default=3, help="beam size (1: greedy)")
    parser.add_argument("--length-penalty", type=float, default=0.0)
    add_diverse_beam_arguments(parser)
    parser.add_argument("--max-images", type=int, default=0, help="first N images (0: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--meteor", action="store_true", help="also METEOR (needs Java)")
    parser.add_argument("--out", default=None, help="write the metrics as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.beam < 1 or args.batch_size < 1 or args.max_images < 0:
        raise ConfigError("--beam and --batch-size must be >= 1 and --max-images >= 0")
    check_diverse_beam(args.beam, args.beam_groups, args.diversity)
    device = common.pick_device(args.device)
    model, vocab, folder = checkpoints.load_caption(args.checkpoint, device)
    splits = load_karpathy(args.data, args.image_root)
    items = get_split(splits, args.split, args.data)
    if args.max_images:
        items = items[: args.max_images]
    train_items = get_split(splits, "train", args.data)
    started = time.perf_counter()
    result = evaluate(
        model,
        vocab,
        items,
        beam=args.beam,
        length_penalty=args.length_penalty,
        batch_size=args.batch_size,
        device=device,
        meteor=args.meteor,
        progress=not args.no_progress,
        beam_groups=args.beam_groups,
        diversity=args.diversity,
    )
    seconds = time.perf_counter() - started
    refs = {i: [" ".join(c) for c in it.captions] for i, it in enumerate(items)}
    base_caption, base_metrics = most_frequent_caption_baseline(
        (c for it in train_items for c in it.captions), refs, meteor=args.meteor
    )
    print(
        f"{args.split}: {len(items)} images, beam {args.beam}, checkpoint {folder} "
        f"({model.config.gate.family} gates), {seconds:.1f} s"
    )
    print(f"{'metric':<10} {'model':>8} {'baseline':>9}")
    for key, value in result["metrics"].items():
        print(f"{key:<10} {value:8.4f} {base_metrics.get(key, float('nan')):9.4f}")
    print(f"baseline caption: {base_caption!r}")
    examples = list(result["captions"].items())[:3]
    for i, text in examples:
        print(f"  {items[i].image_path.name}: {text}")
    prune = None
    if model.config.sparse:
        from bbservice.prune_report import caption_prune_report, format_report

        prune = caption_prune_report(model)
        print(format_report(prune))
    if args.out:
        report = {
            "checkpoint": str(folder),
            "data": str(args.data),
            "split": args.split,
            "images": len(items),
            "beam": args.beam,
            "length_penalty": args.length_penalty,
            "beam_groups": args.beam_groups,
            "diversity": args.diversity,
            "gate": model.config.gate.family,
            "metrics": result["metrics"],
            "teacher_forced_ce": result["ce"],
            "baseline": {"caption": base_caption, "metrics": base_metrics},
            "seconds": seconds,
            "captions": {items[i].image_path.name: text for i, text in result["captions"].items()},
        }
        if prune is not None:
            report["prune"] = prune["totals"]
        checkpoints.write_json(Path(args.out), report)
        print(f"wrote {args.out}")
    return 0
