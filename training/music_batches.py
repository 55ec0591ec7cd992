"""Batching and evaluation of piano-roll models (shared by training, evaluation and benchmarks).

A sequence of T frames gives T − 1 predictions: inputs are frames 1..T−1, targets 2..T.
Frame NLL (``shared/data/README.md``): per predicted frame the sum of the 88 Bernoulli terms;
a split's NLL is the sum over all its sequences divided by its number of predicted frames.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from bbservice.models.music import PianoRollModel, frame_nll_sum, probability_nll_sum


def usable(seqs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Sequences with at least one predicted frame (T >= 2)."""
    return [s for s in seqs if len(s) >= 2]


def collate(
    seqs: Sequence[np.ndarray], device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Right-pad a batch: inputs, targets ``(B, T−1, 88)``, lengths ``(B,)``, mask ``(B, T−1)``."""
    lengths = torch.tensor([len(s) - 1 for s in seqs])
    steps = int(lengths.max())
    padded = np.zeros((len(seqs), steps + 1, seqs[0].shape[1]), dtype=np.float32)
    for b, s in enumerate(seqs):
        padded[b, : len(s)] = s
    frames = torch.from_numpy(padded).to(device)
    mask = (torch.arange(steps).unsqueeze(0) < lengths.unsqueeze(1)).float().to(device)
    return frames[:, :-1], frames[:, 1:], lengths.to(device), mask


def train_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled index batches covering ``n`` sequences (the last one may be smaller)."""
    order = rng.permutation(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def length_bucketed_batches(
    lengths: Sequence[int], batch_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Shuffled index batches of sequences of similar lengths (every sequence exactly once).

    The sequences are sorted by length (ties broken at random, so batch membership changes
    between epochs), cut into batches of ``batch_size`` and the batch order is shuffled. A
    padded batch costs as many steps as its longest sequence, so on the sets with long,
    uneven pieces (MuseData, Piano-midi, Nottingham) this removes most of the padding that
    random batches carry (``bench/bench_music_batching.py`` measures it).
    """
    order = rng.permutation(len(lengths))
    order = order[np.argsort(np.asarray(lengths)[order], kind="stable")]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def eval_batches(seqs: Sequence[np.ndarray], batch_size: int) -> list[list[int]]:
    """Index batches of similar lengths (less padding); every sequence exactly once."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def evaluate_nll(
    model: PianoRollModel,
    seqs: Sequence[np.ndarray],
    *,
    device: torch.device,
    batch_size: int = 32,
    samples: int = 0,
    seed: int = 0,
) -> tuple[float, int]:
    """(summed NLL in nats, predicted frames) of ``seqs``.

    ``samples = 0``: mean gates. ``samples = S > 0``: Monte-Carlo — S passes with sampled gates,
    key probabilities averaged over the passes before the NLL is taken.
    """
    was_training = model.training
    model.eval()
    seqs = usable(seqs)
    total, frames = 0.0, 0
    generator = torch.Generator(device=device).manual_seed(seed) if samples else None
    for idx in eval_batches(seqs, batch_size):
        inputs, targets, lengths, mask = collate([seqs[i] for i in idx], device)
        if samples:
            probs = torch.zeros_like(targets, dtype=torch.float64)
            for _ in range(samples):
                logits, _ = model(inputs, lengths, gate_mode="sample", generator=generator)
                probs += torch.sigmoid(logits.double())
            total += float(probability_nll_sum(probs / samples, targets, mask))
        else:
            logits, _ = model(inputs, lengths, gate_mode="mean")
            total += float(frame_nll_sum(logits, targets, mask))
        frames += int(lengths.sum())
    model.train(was_training)
    return total, frames
