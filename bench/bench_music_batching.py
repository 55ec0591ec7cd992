"""Training throughput with random batches against length-bucketed batches, same process.

A padded batch costs as many recurrent steps as its longest sequence. Every timed pass trains
the family's ~0.57M-parameter preset (locked dropout 0.3, Adam) for a fixed wall-time budget on
the training split and reports real (unpadded) frames per second, the share of padded steps,
and the ratio bucketed / random. One intra-op thread, as the sweeps run.

    python bench/bench_music_batching.py [--data nottingham,musedata] [--gate bbeta5]
        [--batch-size 8] [--seconds 20]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bbservice.models.music import MusicConfig, PianoRollModel, frame_nll_sum
from training.music_batches import collate, length_bucketed_batches, train_batches, usable
from training.music_data import load_music


def throughput(model, seqs, batches, seconds: float) -> tuple[float, float]:
    """(real frames per second, padded share) of training steps until ``seconds`` have passed."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    device = torch.device("cpu")
    real = padded = 0
    start = time.perf_counter()
    for idx in batches:
        inputs, targets, lengths, mask = collate([seqs[i] for i in idx], device)
        logits, _ = model(inputs, lengths)
        loss = frame_nll_sum(logits, targets, mask) / lengths.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        real += int(lengths.sum())
        padded += inputs.shape[0] * inputs.shape[1]
        if time.perf_counter() - start > seconds:
            break
    return real / (time.perf_counter() - start), 1 - real / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="nottingham,musedata")
    parser.add_argument("--gate", default="bbeta5")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"gate {args.gate}, batch {args.batch_size}, {args.seconds:.0f} s per pass, 1 thread")
    print("| data | batches | frames/s | padded share | ratio |")
    print("|---|---|---:|---:|---:|")
    for name in args.data.split(","):
        seqs = usable(load_music(name).split("train"))
        lengths = [len(s) for s in seqs]
        rows = {}
        for kind in ("random", "length-bucketed"):
            rng = np.random.default_rng(0)
            batches = (
                train_batches(len(seqs), args.batch_size, rng)
                if kind == "random"
                else length_bucketed_batches(lengths, args.batch_size, rng)
            )
            model = PianoRollModel(MusicConfig.preset(args.gate, dropout=0.3)).train()
            rows[kind] = throughput(model, seqs, batches, args.seconds)
        base = rows["random"][0]
        for kind, (fps, pad) in rows.items():
            print(f"| {name} | {kind} | {fps:.0f} | {pad:.2f} | {fps / base:.2f}× |")


if __name__ == "__main__":
    main()
