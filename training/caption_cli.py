"""``bbservice caption IMAGE... --checkpoint DIR``: caption image files with a trained model.

Prints one line per image (``path: caption``), or with ``--n-best N`` the N best beam
hypotheses with their total log-probabilities, or with ``--sample-gates S`` the distinct
captions of S stochastic-gate passes with their counts and the uncertainty scores of
:func:`bbservice.decoding.sample_gate_passes`. ``--attention out.png`` draws the image and its
attention map for every word (one PNG per image: ``out.png`` for a single image, else
``out_<name>.png``).

An image that cannot be read is reported on stderr by name (one line each); the other images
are still captioned, and the exit status is 2 if any image failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from bbservice import checkpoints
from bbservice.decoding import beam_search, greedy, sample_gate_passes
from bbservice.errors import BBServiceError, ConfigError
from bbservice.images import load_image, preprocess
from bbservice.models.caption import TorchCaptionStepper
from bbservice.vocab import END_ID, START_ID
from training import common

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (or run folder)")
    parser.add_argument("--beam", type=int, default=3, help="beam size (1: greedy)")
    parser.add_argument("--n-best", type=int, default=1, help="print the N best (N <= beam)")
    parser.add_argument("--length-penalty", type=float, default=0.0)
    add_diverse_beam_arguments(parser)
    parser.add_argument(
        "--block-trigrams", action="store_true", help="no repeated word trigrams (beam)"
    )
    parser.add_argument(
        "--sample-gates",
        type=int,
        default=0,
        metavar="S",
        help="S passes with sampled (stochastic) gates; prints distinct captions with counts",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the gate samples")
    parser.add_argument(
        "--attention", default=None, metavar="OUT.png", help="draw attention maps per word"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")


def add_diverse_beam_arguments(parser: argparse.ArgumentParser) -> None:
    """``--beam-groups`` and ``--diversity`` (``bbservice caption`` and ``eval caption``)."""
    parser.add_argument(
        "--beam-groups",
        type=int,
        default=1,
        metavar="G",
        help="diverse beam search: G groups of beam/G beams (G divides --beam)",
    )
    parser.add_argument(
        "--diversity",
        type=float,
        default=0.0,
        metavar="LAMBDA",
        help="diverse beam search: penalty per word an earlier group chose at the same step",
    )


def _load(paths: list[str], size: int) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
    """(name, preprocessed image) of every readable file, and one error line per other file."""
    good, errors = [], []
    for path in paths:
        try:
            good.append((path, preprocess(load_image(path), size)))
        except BBServiceError as err:
            errors.append(str(err))
    return good, errors


def attention_path(out: str, image: str, many: bool) -> Path:
    out_path = Path(out)
    if not many:
        return out_path
    return out_path.with_name(f"{out_path.stem}_{Path(image).stem}{out_path.suffix or '.png'}")


def draw_attention(image_path: str, words: list[str], attention: np.ndarray, out: Path) -> None:
    """A grid: the image, then the image under each word's attention map (upsampled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    image = load_image(image_path)
    side = 224
    shown = np.asarray(image.resize((side, side), Image.Resampling.BILINEAR))
    grid = int(round(np.sqrt(attention.shape[1]))) if attention.size else 1
    panels = len(words) + 1
    cols = min(panels, 5)
    rows = (panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(shown)
    axes[0, 0].set_title(Path(image_path).name, fontsize=8)
    for k, word in enumerate(words, start=1):
        ax = axes.flat[k]
        amap = attention[k - 1].reshape(grid, grid).astype(np.float32)
        amap = amap / max(float(amap.max()), 1e-12)
        up = Image.fromarray((amap * 255).astype(np.uint8)).resize(
            (side, side), Image.Resampling.BILINEAR
        )
        ax.imshow(shown)
        ax.imshow(np.asarray(up), cmap="inferno", alpha=0.6, vmin=0, vmax=255)
        ax.set_title(word, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def check_diverse_beam(beam: int, groups: int, diversity: float) -> None:
    """``--beam-groups`` G >= 1 dividing ``--beam``, ``--diversity`` >= 0 (a clear error)."""
    if groups < 1 or beam % groups:
        raise ConfigError(f"--beam-groups ({groups}) must be >= 1 and divide --beam ({beam})")
    if not diversity >= 0 or diversity == float("inf"):
        raise ConfigError(f"--diversity must be a finite number >= 0, got {diversity}")


def _text(vocab, tokens) -> str:
    return " ".join(vocab.decode(tokens)) or "(empty caption)"


def run(args: argparse.Namespace) -> int:
    if args.beam < 1 or not 1 <= args.n_best <= args.beam:
        raise ConfigError("--beam must be >= 1 and --n-best in [1, --beam]")
    if args.sample_gates < 0 or args.batch_size < 1:
        raise ConfigError("--sample-gates must be >= 0 and --batch-size >= 1")
    check_diverse_beam(args.beam, args.beam_groups, args.diversity)
    device = common.pick_device(args.device)
    model, vocab, _ = checkpoints.load_caption(args.checkpoint, device)
    cfg = model.config
    if args.sample_gates and not model.decoder.cell.gate.stochastic:
        log.warning(
            "%s gates are deterministic: every pass gives the same caption", cfg.gate.family
        )
    good, errors = _load(args.images, cfg.image_size)
    for line in errors:
        print(f"bbservice: error: {line}", file=sys.stderr)
    many = len(args.images) > 1
    mean_stepper = TorchCaptionStepper(model, "mean", device=device)
    sampled_stepper = TorchCaptionStepper(model, "sample", seed=args.seed, device=device)
    for first in range(0, len(good), args.batch_size):
        batch = good[first : first + args.batch_size]
        images = np.stack([arr for _, arr in batch])  # (B, 3, S, S)
        if args.beam > 1:
            results = beam_search(
                mean_stepper,
                images,
                start_id=START_ID,
                end_id=END_ID,
                beam_size=args.beam,
                max_length=cfg.max_length,
                length_penalty=args.length_penalty,
                n_best=args.n_best,
                block_repeated_trigrams=args.block_trigrams,
                groups=args.beam_groups,
                diversity=args.diversity,
            )
        else:
            results = [
                [h]
                for h in greedy(
                    mean_stepper,
                    images,
                    start_id=START_ID,
                    end_id=END_ID,
                    max_length=cfg.max_length,
                )
            ]
        gate_results = None
        if args.sample_gates:
            gate_results = sample_gate_passes(
                sampled_stepper,
                images,
                passes=args.sample_gates,
                start_id=START_ID,
                end_id=END_ID,
                beam_size=args.beam,
                max_length=cfg.max_length,
                length_penalty=args.length_penalty,
            )
        for k, ((path, _), hyps) in enumerate(zip(batch, results, strict=True)):
            if args.n_best == 1:
                print(f"{path}: {_text(vocab, hyps[0].tokens)}")
            else:
                print(f"{path}:")
                for rank, h in enumerate(hyps, start=1):
                    print(f"  {rank}. {_text(vocab, h.tokens)}  (log p {h.log_prob:.3f})")
            if gate_results is not None:
                g = gate_results[k]
                print(
                    f"  {g.passes} sampled-gate passes: disagreement {g.disagreement:.2f}, "
                    f"mean entropy {g.mean_entropy:.3f} nats"
                )
                for tokens, count in g.captions:
                    print(f"    {count:3d}x {_text(vocab, tokens)}")
            if args.attention:
                best = hyps[0]
                out = attention_path(args.attention, path, many)
                draw_attention(path, [vocab.itos[t] for t in best.tokens], best.attention, out)
                print(f"  attention: {out}")
    if errors:
        print(
            f"bbservice: {len(errors)} of {len(args.images)} image(s) could not be read",
            file=sys.stderr,
        )
        return 2
    return 0
