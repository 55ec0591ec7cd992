"""Time every gate family against ``torch.nn.LSTM`` in one process and print ratios.

For each device (the CPU, and CUDA when present) and each family: one training step (forward
+ backward, sampled gates) and one inference pass (mean gates, no grad), with the fused
kernels (:mod:`bbservice.fused`, the default) and with the eager reference, both at the same
hidden size as ``nn.LSTM`` and at the equal-parameter budget (the largest H whose layer has no
more parameters than ``nn.LSTM``'s: ``k·H·(D+H+1)``, plus ``H·(D+H)`` for ``mlstm``). Every
ratio is against ``nn.LSTM`` at the reference H in the same process: each repeat times
``nn.LSTM`` and the candidate back to back and the median of those per-pair ratios is printed
(robust to a CPU shared with other jobs), next to the candidate's median time. ``noise`` is the
share of a sampled fused training step that sampling costs (random numbers and the Marsaglia
step): 1 − (step with mean gates) / (step with sampled gates).

    python bench/bench_gates.py [--repeats 5] [--families lstm,bbeta5] [--threads N] [--no-eager]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn

from bbservice.cells import GatedLSTM
from bbservice.gates import GATE_FAMILIES, GateConfig, gate_blocks


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


def _timed(fn, device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1000


def time_ratio(fn, ref_fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """(median ms of ``fn``, median over repeats of ``fn`` ms / ``ref_fn`` ms timed back to
    back)."""
    for _ in range(2):
        fn()
        ref_fn()
    times, ratios = [], []
    for _ in range(repeats):
        ref_ms = _timed(ref_fn, device)
        ms = _timed(fn, device)
        times.append(ms)
        ratios.append(ms / ref_ms)
    return statistics.median(times), statistics.median(ratios)


def train_step(model: nn.Module, x: torch.Tensor, **kw) -> None:
    model.train()
    model.zero_grad(set_to_none=True)
    out, _ = model(x, **kw)
    out.square().mean().backward()


def infer(model: nn.Module, x: torch.Tensor) -> None:
    model.eval()
    with torch.inference_mode():
        model(x)


def layer_params(family: str, inputs: int, hidden: int) -> int:
    """Parameters of one layer: k·H·(D+H+1) (+ the m projections of ``mlstm``)."""
    extra = hidden * (inputs + hidden) if family == "mlstm" else 0
    return gate_blocks(family) * hidden * (inputs + hidden + 1) + extra


def budget_hidden(family: str, inputs: int, reference_hidden: int) -> int:
    """The largest H whose layer has no more parameters than nn.LSTM's at the reference H."""
    budget = layer_params("lstm", inputs, reference_hidden)
    k = gate_blocks(family) + (1 if family == "mlstm" else 0)
    hidden = int((-(inputs + 1) + math.sqrt((inputs + 1) ** 2 + 4 * budget / k)) / 2) + 1
    while layer_params(family, inputs, hidden) > budget:
        hidden -= 1
    return hidden


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--inputs", type=int, default=88)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--families", default=",".join(GATE_FAMILIES))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-eager", action="store_true", help="time the fused path only")
    parser.add_argument("--cpu-only", action="store_true", help="skip CUDA even if present")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append(torch.device("cuda"))
    families = args.families.split(",")
    paths = [("fused", True)] + ([] if args.no_eager else [("eager", False)])
    for device in devices:
        torch.manual_seed(0)
        x = torch.randn(args.steps, args.batch, args.inputs, device=device)
        ref = nn.LSTM(args.inputs, args.hidden).to(device)
        ref_train = time_it(lambda: train_step(ref, x), device, args.repeats)  # noqa: B023
        ref_infer = time_it(lambda: infer(ref, x), device, args.repeats)  # noqa: B023
        print(
            f"\n{device.type.upper()}  batch {args.batch}, {args.steps} steps, {args.inputs} in, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}; ratios against "
            f"nn.LSTM at H={args.hidden}: train {ref_train:.1f} ms, inference {ref_infer:.1f} ms"
        )
        header = f"{'family':<8}{'H':>5}{'params':>9}"
        for name, _ in paths:
            header += f"{name + ' train':>14}{'x':>6}{name + ' infer':>14}{'x':>6}"
        print(header + f"{'noise':>7}")
        for family in families:
            sizes = [args.hidden, budget_hidden(family, args.inputs, args.hidden)]
            for hidden in dict.fromkeys(sizes):
                torch.manual_seed(0)
                model = GatedLSTM(args.inputs, hidden, gate=GateConfig(family=family))
                model = model.to(device)
                line = f"{family:<8}{hidden:>5}{layer_params(family, args.inputs, hidden):>9}"
                noise = ""
                for _, fused in paths:
                    model.fused = fused
                    train_ms, train_x = time_ratio(
                        lambda: train_step(model, x),  # noqa: B023
                        lambda: train_step(ref, x),  # noqa: B023
                        device,
                        args.repeats,
                    )
                    infer_ms, infer_x = time_ratio(
                        lambda: infer(model, x),  # noqa: B023
                        lambda: infer(ref, x),  # noqa: B023
                        device,
                        args.repeats,
                    )
                    line += f"{train_ms:>14.1f}{train_x:>6.2f}{infer_ms:>14.1f}{infer_x:>6.2f}"
                    if fused and model.cells[0].gate.stochastic:
                        mean_ms, share = time_ratio(
                            lambda: train_step(model, x, gate_mode="mean"),  # noqa: B023
                            lambda: train_step(model, x),  # noqa: B023
                            device,
                            args.repeats,
                        )
                        noise = f"{max(0.0, 1.0 - share):>7.0%}"
                print(line + (noise or f"{'-':>7}"), flush=True)


if __name__ == "__main__":
    main()
