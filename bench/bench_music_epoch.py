"""Wall time of one JSB training epoch: padded mini-batches against the batch-1 protocol.

Both runs use the same model (``--gate``, ~0.57M preset), the same data and one process; the
ratio is printed. Needs ``polyphonic/JSB_Chorales.mat`` (``--data`` takes any music spec).

    python bench/bench_music_epoch.py [--gate bbeta5] [--batch-size 16] [--data jsb]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bbservice.models.music import MusicConfig, PianoRollModel, frame_nll_sum
from training.music_batches import collate, train_batches, usable
from training.music_data import load_music


def one_epoch(model, seqs, batch_size: int, seed: int = 0) -> float:
    """Seconds for one epoch of training steps (forward, backward, clip, Adam)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    device = torch.device("cpu")
    start = time.perf_counter()
    for idx in train_batches(len(seqs), batch_size, rng):
        inputs, targets, lengths, mask = collate([seqs[i] for i in idx], device)
        logits, _ = model(inputs, lengths)
        loss = frame_nll_sum(logits, targets, mask) / lengths.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gate", default="bbeta5")
    parser.add_argument("--data", default="jsb")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    seqs = usable(load_music(args.data).train)
    torch.manual_seed(0)
    model = PianoRollModel(MusicConfig.preset(args.gate)).train()
    batched = one_epoch(model, seqs, args.batch_size)
    single = one_epoch(model, seqs, 1)
    print(
        f"{args.data} train epoch, {args.gate} gates, {len(seqs)} sequences, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"batch {args.batch_size:>3}: {batched:8.1f} s")
    print(f"batch   1: {single:8.1f} s   (reference protocol)")
    print(f"speed-up of mini-batches: {single / batched:.1f}x")


if __name__ == "__main__":
    main()
