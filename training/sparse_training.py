"""The sparse variational dropout term of a training loss, shared by the music and caption
trainers (``--sparsify``, ``--sparse-kl-weight``, ``--sparse-kl-warmup``).

The ELBO of sparse VD is ``Σ_data log p − KL``; per target (a frame, a caption token) that is
``NLL/target + KL / N`` with N the targets of one pass over the training set. The trainers add
``w(t) · KL / N`` to their per-target loss, with ``w`` ramped linearly from 0 to
``--sparse-kl-weight`` over ``--sparse-kl-warmup`` epochs (w = 1 is the ELBO).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import Tensor, nn

from bbservice.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, weight, warmup):
    """The command-line options (defaults from the trainer's config)."""
    parser.add_argument(
        "--sparsify",
        action="store_true",
        help="sparse variational dropout on weights, neurons and gate pre-activations",
    )
    parser.add_argument(
        "--sparse-kl-weight",
        type=float,
        default=weight,
        help="weight of the sparse VD KL (1: the ELBO, KL spread over the training targets)",
    )
    parser.add_argument(
        "--sparse-kl-warmup",
        type=int,
        default=warmup,
        help="epochs of linear ramp of the sparse KL weight from 0 (0: no ramp)",
    )
    parser.add_argument(
        "--sparse-lr-scale",
        type=float,
        default=1.0,
        help="learning rate of the variational parameters (log σ², group θ) relative to the "
        "model's (default 1)",
    )


def check_options(weight: float, warmup: int, lr_scale: float = 1.0) -> None:
    if weight < 0 or warmup < 0:
        raise ConfigError("--sparse-kl-weight and --sparse-kl-warmup must be >= 0")
    if not lr_scale > 0:
        raise ConfigError(f"--sparse-lr-scale must be > 0, got {lr_scale}")


VARIATIONAL_NAMES = ("log_sigma2", "theta")  # parameter-name parts of the sparse VD variables


def is_variational(name: str) -> bool:
    """Whether a parameter (by ``named_parameters`` name) is a sparse VD variable: a log σ²
    or the θ of a group (neuron, pre-activation, read-out input) variable. The weights' θ are
    the model's weights themselves."""
    return any(part in name.rsplit(".", 1)[-1] for part in VARIATIONAL_NAMES)


def split_parameters(module: nn.Module, lr: float, lr_scale: float) -> list[dict]:
    """Adam parameter groups: the model's parameters at ``lr``, the variational ones at
    ``lr · lr_scale`` (one group when the scale is 1). Frozen parameters are left out."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if lr_scale == 1.0:
        return [{"params": [p for _, p in named], "lr": lr}]
    return [
        {"params": [p for n, p in named if not is_variational(n)], "lr": lr},
        {"params": [p for n, p in named if is_variational(n)], "lr": lr * lr_scale},
    ]


class SparseKLSchedule:
    """``w(t) · KL / N`` per batch, from the model's summed (unweighted) sparse VD KL."""

    def __init__(self, weight: float, warmup: int, targets: float) -> None:
        check_options(weight, warmup)
        self.weight, self.warmup = weight, warmup
        self.targets = max(float(targets), 1.0)
        self.current = 0.0

    def loss(self, kl: Tensor, epoch: int, progress: float) -> Tensor:
        """The term for a batch ``progress`` ∈ [0, 1) of the way through ``epoch`` (from 1)."""
        ramp = min(1.0, (epoch - 1 + progress) / self.warmup) if self.warmup else 1.0
        self.current = self.weight * ramp
        return self.current * kl / self.targets

    def record(self, kl: Tensor, sparsity: dict[str, float]) -> dict:
        """Log fields of an epoch: the current weight, the KL and the pruned fractions."""
        return {"sparse_kl_weight": self.current, "sparse_kl": float(kl), "sparsity": sparsity}


def publish_report(report: dict, out: Path) -> dict:
    """Print the pruning report and write ``prune_report.json`` into the run folder and its
    ``best/`` checkpoint (which the report describes); returns the totals."""
    from bbservice.prune_report import format_report, write_report

    print(format_report(report))
    write_report(report, out)
    if (out / "best").exists():
        write_report(report, out / "best")
    return report["totals"]
