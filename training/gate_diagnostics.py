"""Gate diagnostics of the paper's claims: how i and f are distributed, how they co-vary, and
how gradients pass through the cell, for music checkpoints (e.g. ``lstm`` against ``bbeta5``).

From trained checkpoints and their data (``python -m training.gate_diagnostics``):

* ``gates_hist.png``: histograms of the input gate i and the forget gate f, one row per layer,
  one colour per checkpoint (densities over every unit and predicted frame of the split);
* ``gates_joint.png``: the joint histogram of (i, f) per checkpoint and layer, titled with
  their Pearson correlation;
* ``gradient_lag.png``: ‖∂ NLL(last frame) / ∂ input frame at lag k‖ against k — how far back
  the gradient reaches through the recurrence;
* ``gates.json``: the numbers behind them (means, spreads, saturated fractions, correlations,
  the lag profile).

During training (:meth:`training.loop.TrainingLoop.step` does this for both trainers, on
steps whose gradients are finite, after unscaling and before clipping)::

    meter = GradNormMeter()                   # once per epoch
    meter.update(model.rnn)                   # after loss.backward()
    record.update(meter.epoch_record())       # into the epoch's metrics.jsonl record

gives ``cell_grad_norm`` (and ``cell_grad_norm_l{k}`` per layer) per epoch; with those in
``metrics.jsonl`` the command also draws ``grad_norm.png`` (the norm against the epoch).

    python -m training.gate_diagnostics RUN_LSTM RUN_BBETA5 --split valid --out docs/img/gates
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bbservice.checkpoints import load_music as load_music_checkpoint
from bbservice.checkpoints import write_json
from training import common
from training.music_batches import collate, eval_batches, usable
from training.music_data import load_music

log = logging.getLogger(__name__)

SATURATED = 0.05  # a gate below this or above 1 − this counts as saturated


# -- gate values ------------------------------------------------------------------------------


@torch.no_grad()
def gate_values(
    model: nn.Module,
    seqs: Sequence[np.ndarray],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    mode: str = "mean",
    seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    """Per layer, ``{"i": (N, H), "f": (N, H)}``: the gates at each of the N predicted frames.

    ``model``: a piano-roll model whose ``rnn`` is a :class:`bbservice.cells.GatedLSTM`
    (``record_gate_stats``). Padding steps are left out. ``mode``: ``"mean"`` (the deployed
    gates) or ``"sample"`` (sampled gates, ``seed`` fixes the noise).
    """
    device = torch.device(device)
    seqs = usable(seqs)
    if not seqs:
        raise ValueError("no sequence with a predicted frame")
    was_training, recording = model.training, model.rnn.record_gate_stats
    model.eval()
    model.rnn.record_gate_stats = True
    generator = torch.Generator(device=device).manual_seed(seed) if mode == "sample" else None
    layers: list[dict[str, list[np.ndarray]]] = []
    try:
        for idx in eval_batches(seqs, batch_size):
            inputs, _, lengths, _ = collate([seqs[i] for i in idx], device)
            model(inputs, lengths, gate_mode=mode, generator=generator)
            steps = inputs.shape[1]
            valid = torch.arange(steps, device=device).unsqueeze(1) < lengths.unsqueeze(0)
            for layer, stats in enumerate(model.rnn.last_gate_stats):  # each (T, B, H)
                if len(layers) <= layer:
                    layers.append({"i": [], "f": []})
                for key in ("i", "f"):
                    layers[layer][key].append(stats[key][valid].float().cpu().numpy())
    finally:
        model.rnn.record_gate_stats = recording
        model.train(was_training)
    return [{k: np.concatenate(v) for k, v in layer.items()} for layer in layers]


def gate_summary(layers: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, float]]:
    """Per layer: mean and standard deviation of i and f, their saturated fractions and the
    Pearson correlation of i and f over every (frame, unit)."""
    out = []
    for layer in layers:
        i, f = layer["i"].ravel().astype(np.float64), layer["f"].ravel().astype(np.float64)
        row = {}
        for name, v in (("i", i), ("f", f)):
            row[f"{name}_mean"] = float(v.mean())
            row[f"{name}_std"] = float(v.std())
            row[f"{name}_saturated"] = float(np.mean((v < SATURATED) | (v > 1 - SATURATED)))
        both_vary = i.std() > 0 and f.std() > 0
        row["corr_if"] = float(np.corrcoef(i, f)[0, 1]) if both_vary else float("nan")
        out.append(row)
    return out


# -- gradients through the cell -------------------------------------------------------------


def cell_gradient_norms(rnn: nn.Module) -> list[float]:
    """L2 norm of the gradient of each layer's cell parameters (call after ``backward()``).

    ``rnn``: a stacked :class:`bbservice.cells.GatedLSTM` (one norm per layer, ``rnn.cells``)
    or a single cell (the caption decoder's ``cell``: one norm).
    """
    norms = []
    for cell in getattr(rnn, "cells", [rnn]):
        grads = [p.grad.detach().float() for p in cell.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
                     if grads else 0.0)  # fmt: skip
    return norms


class GradNormMeter:
    """Mean per-step cell gradient norm over an epoch, for the metrics record."""

    def __init__(self) -> None:
        self.sums: list[float] = []
        self.steps = 0

    def update(self, rnn: nn.Module) -> list[float]:
        norms = cell_gradient_norms(rnn)
        if not self.sums:
            self.sums = [0.0] * len(norms)
        self.sums = [s + n for s, n in zip(self.sums, norms, strict=True)]
        self.steps += 1
        return norms

    def epoch_record(self) -> dict[str, float]:
        """``cell_grad_norm`` (of all layers together) and ``cell_grad_norm_l{k}``; resets."""
        if not self.steps:
            return {}
        means = [s / self.steps for s in self.sums]
        record = {f"cell_grad_norm_l{k}": m for k, m in enumerate(means)}
        record["cell_grad_norm"] = math.sqrt(sum(m * m for m in means))
        self.sums, self.steps = [], 0
        return record


def gradient_by_lag(
    model: nn.Module,
    seqs: Sequence[np.ndarray],
    *,
    lags: int = 32,
    device: torch.device | str = "cpu",
    max_sequences: int = 64,
) -> np.ndarray:
    """``(lags,)``: mean over sequences of ‖∂ NLL of the last predicted frame / ∂ frame t−k‖.

    Mean gates, eval mode. Only sequences with more than ``lags`` predicted frames count.
    """
    device = torch.device(device)
    long_enough = [s for s in usable(seqs) if len(s) - 1 > lags][:max_sequences]
    if not long_enough:
        raise ValueError(f"no sequence longer than {lags + 1} frames")
    was_training = model.training
    model.eval()
    total = np.zeros(lags)
    try:
        for seq in long_enough:
            inputs, targets, _, _ = collate([seq], device)
            inputs = inputs.clone().requires_grad_(True)
            logits, _ = model(inputs, gate_mode="mean")
            loss = nn.functional.binary_cross_entropy_with_logits(
                logits[:, -1].float(), targets[:, -1].float(), reduction="sum"
            )
            (grad,) = torch.autograd.grad(loss, inputs)
            last = inputs.shape[1] - 1
            total += np.array([float(grad[0, last - k].norm()) for k in range(lags)])
    finally:
        model.train(was_training)
    return total / len(long_enough)


# -- pictures ---------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_histograms(named: Mapping[str, Sequence[Mapping[str, np.ndarray]]], path: Path) -> None:
    """Histograms of i and f: a row per layer, a column per gate, a colour per checkpoint."""
    plt = _pyplot()
    n_layers = max(len(layers) for layers in named.values())
    fig, axes = plt.subplots(n_layers, 2, figsize=(10, 3 * n_layers), dpi=100, squeeze=False)
    bins = np.linspace(0, 1, 51)
    for label, layers in named.items():
        for layer, values in enumerate(layers):
            for col, gate in enumerate(("i", "f")):
                axes[layer][col].hist(
                    values[gate].ravel(), bins=bins, density=True, histtype="step", lw=1.5,
                    label=label,
                )  # fmt: skip
    for layer in range(n_layers):
        for col, gate in enumerate(("input gate i", "forget gate f")):
            ax = axes[layer][col]
            ax.set_title(f"layer {layer}: {gate}")
            ax.set_yscale("log")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_joint(named: Mapping[str, Sequence[Mapping[str, np.ndarray]]], path: Path) -> None:
    """Joint (i, f) histograms: a column per checkpoint, a row per layer, the correlation."""
    plt = _pyplot()
    n_layers = max(len(layers) for layers in named.values())
    fig, axes = plt.subplots(
        n_layers, len(named), figsize=(4 * len(named), 3.6 * n_layers), dpi=100, squeeze=False
    )
    for col, (label, layers) in enumerate(named.items()):
        for layer, (values, stats) in enumerate(zip(layers, gate_summary(layers), strict=True)):
            ax = axes[layer][col]
            ax.hist2d(values["i"].ravel(), values["f"].ravel(), bins=40, range=[[0, 1], [0, 1]],
                      cmap="viridis", norm=_log_norm())  # fmt: skip
            ax.set_title(f"{label}, layer {layer}: corr(i, f) = {stats['corr_if']:.2f}", fontsize=9)
            ax.set_xlabel("i")
            ax.set_ylabel("f")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _log_norm():
    from matplotlib.colors import LogNorm

    return LogNorm()


def plot_lines(named: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: Path,
               xlabel: str, ylabel: str, log_y: bool = True) -> None:  # fmt: skip
    """One line per checkpoint: ``named[label] = (x, y)``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, (x, y) in named.items():
        ax.plot(x, y, marker=".", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- command line -----------------------------------------------------------------------------


def diagnose(
    checkpoints: Sequence[str | Path],
    out: Path,
    *,
    labels: Sequence[str] | None = None,
    data: str | None = None,
    split: str = "valid",
    max_sequences: int = 64,
    lags: int = 32,
    mode: str = "mean",
    device: str = "cpu",
) -> dict:
    """Write the pictures and ``gates.json`` for run folders (or ``best/`` folders)."""
    device_ = common.pick_device(device)
    out.mkdir(parents=True, exist_ok=True)
    values, lag_curves, grad_curves, report = {}, {}, {}, {}
    for k, checkpoint in enumerate(checkpoints):
        model, config = load_music_checkpoint(checkpoint, device_)
        label = labels[k] if labels else config["model"]["gate"]["family"]
        seqs = load_music(data or config["train"]["data"]).split(split)[:max_sequences]
        values[label] = gate_values(model, seqs, device=device_, mode=mode)
        entry = {"checkpoint": str(checkpoint), "layers": gate_summary(values[label])}
        try:
            lag = gradient_by_lag(model, seqs, lags=lags, device=device_)
            lag_curves[label] = (list(range(lags)), lag.tolist())
            entry["gradient_by_lag"] = lag.tolist()
        except ValueError as err:
            log.warning("%s: no gradient-by-lag profile: %s", label, err)
        run_dir = Path(checkpoint)
        run_dir = run_dir.parent if run_dir.name in ("best", "last") else run_dir
        records = common.read_jsonl(run_dir / "metrics.jsonl")
        norms = [(r["epoch"], r["cell_grad_norm"]) for r in records if "cell_grad_norm" in r]
        if norms:
            grad_curves[label] = tuple(zip(*norms, strict=True))
            entry["cell_grad_norm"] = [n for _, n in norms]
        report[label] = entry
    plot_histograms(values, out / "gates_hist.png")
    plot_joint(values, out / "gates_joint.png")
    if lag_curves:
        plot_lines(lag_curves, out / "gradient_lag.png", "lag k (frames before the last)",
                   "‖∂ NLL(last frame) / ∂ frame‖")  # fmt: skip
    if grad_curves:
        plot_lines(grad_curves, out / "grad_norm.png", "epoch", "cell gradient norm (mean/step)")
    else:
        log.info("no cell_grad_norm in the runs' metrics.jsonl: no grad_norm.png")
    write_json(out / "gates.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="music run folders (or best/ folders)")
    parser.add_argument("--labels", nargs="+", default=None, help="default: the gate families")
    parser.add_argument("--data", default=None, help="default: each run's own data")
    parser.add_argument("--split", default="valid", choices=("train", "valid", "test"))
    parser.add_argument("--max-sequences", type=int, default=64)
    parser.add_argument("--lags", type=int, default=32)
    parser.add_argument("--mode", default="mean", choices=("mean", "sample"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="gate_diagnostics", type=Path)
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.checkpoints):
        parser.error("--labels needs one label per checkpoint")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = diagnose(
        args.checkpoints, args.out, labels=args.labels, data=args.data, split=args.split,
        max_sequences=args.max_sequences, lags=args.lags, mode=args.mode, device=args.device,
    )  # fmt: skip
    print(json.dumps({k: v["layers"] for k, v in report.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
