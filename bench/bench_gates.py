"""Time every gate family against ``torch.nn.LSTM`` in one process and print ratios.

One training step (forward + backward, sampled gates) and one inference pass (mean gates,
no grad) at batch 64, 100 steps, 88 inputs, hidden 256 — on the CPU, and on CUDA when present.

    python bench/bench_gates.py [--repeats 5] [--families lstm,bbeta5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from bbservice.cells import GatedLSTM
from bbservice.gates import GATE_FAMILIES, GateConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def bench_model(model: nn.Module, x: torch.Tensor, device, repeats: int) -> tuple[float, float]:
    """(training step ms, inference ms) of ``model`` on ``x`` ``(T, B, D)``."""

    def train_step() -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        out, _ = model(x)
        out.square().mean().backward()

    def infer() -> None:
        model.eval()
        with torch.inference_mode():
            model(x)

    return time_it(train_step, device, repeats), time_it(infer, device, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--inputs", type=int, default=88)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--families", default=",".join(GATE_FAMILIES))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--implicit",
        action="store_true",
        help="also time bbeta5 with torch's implicit-gradient Gamma sampler",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    variants = [(f, GateConfig(family=f)) for f in args.families.split(",")]
    if args.implicit:
        variants.append(("bbeta5/implicit", GateConfig(family="bbeta5", gamma_sampler="implicit")))
    for device in devices:
        torch.manual_seed(0)
        x = torch.randn(args.steps, args.batch, args.inputs, device=device)
        ref = nn.LSTM(args.inputs, args.hidden).to(device)
        ref_train, ref_infer = bench_model(ref, x, device, args.repeats)
        print(
            f"\n{device.type.upper()}  batch {args.batch}, {args.steps} steps, {args.inputs} in, "
            f"hidden {args.hidden}, {torch.get_num_threads()} threads, torch {torch.__version__}"
        )
        print(f"{'family':<18}{'train ms':>10}{'ratio':>8}{'infer ms':>10}{'ratio':>8}")
        print(f"{'nn.LSTM':<18}{ref_train:>10.1f}{1.0:>8.2f}{ref_infer:>10.1f}{1.0:>8.2f}")
        for name, config in variants:
            model = GatedLSTM(args.inputs, args.hidden, gate=config).to(device)
            train_ms, infer_ms = bench_model(model, x, device, args.repeats)
            print(
                f"{name:<18}{train_ms:>10.1f}{train_ms / ref_train:>8.2f}"
                f"{infer_ms:>10.1f}{infer_ms / ref_infer:>8.2f}"
            )


if __name__ == "__main__":
    main()
