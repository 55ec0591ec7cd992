"""Wall time of one JSB training epoch at mini-batch sizes 8 and 16, fused and eager gates.

Every run uses the family's ~0.57M-parameter preset (``--gate``), the same data and one
process; the ratio eager / fused is printed. ``--reference`` adds the authors' batch-1
protocol (slow). Needs ``polyphonic/JSB_Chorales.mat`` (``--data`` takes any music spec).

    python bench/bench_music_epoch.py [--gate bbeta5] [--batch-sizes 8,16] [--no-eager]
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
    parser.add_argument("--batch-sizes", default="8,16")
    parser.add_argument("--no-eager", action="store_true", help="time the fused path only")
    parser.add_argument("--reference", action="store_true", help="also time batch 1 (slow)")
    args = parser.parse_args()
    seqs = usable(load_music(args.data).train)
    torch.manual_seed(0)
    model = PianoRollModel(MusicConfig.preset(args.gate)).train()
    print(
        f"{args.data} train epoch, {args.gate} gates (H={model.config.hidden_size}), "
        f"{len(seqs)} sequences, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    sizes = [int(b) for b in args.batch_sizes.split(",")] + ([1] if args.reference else [])
    for batch_size in sizes:
        model.rnn.fused = True
        fused = one_epoch(model, seqs, batch_size)
        line = f"batch {batch_size:>3}: fused {fused:7.1f} s"
        if not args.no_eager:
            model.rnn.fused = False
            eager = one_epoch(model, seqs, batch_size)
            line += f"   eager {eager:7.1f} s   eager / fused {eager / fused:4.2f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
