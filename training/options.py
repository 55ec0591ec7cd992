"""What both trainers share in their configuration: the typed fields (:class:`TrainConfig`)
and the command-line options, defined once.

Each trainer's config subclasses :class:`TrainConfig` with its own defaults and fields (data,
model shape, scheduled sampling, transpositions, ...); the ``add_*_arguments`` functions take
the trainer's defaults.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from bbservice.errors import ConfigError
from bbservice.gates import BETA_FAMILIES, GAMMA_SAMPLERS, GATE_FAMILIES, GateConfig
from training import sparse_training


@dataclass
class TrainConfig:
    """The fields every training run has (a trainer's config adds its own; all are saved
    flat as ``config.json["train"]``)."""

    out: str = "runs/model"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    lr_decay: float = 0.5
    patience: int = 2
    min_lr: float = 1e-6
    clip: float = 5.0
    max_bad_steps: int = 20
    weight_decay: float = 0.0
    early_stop: int = 0
    seed: int = 1
    device: str = "auto"
    amp: bool = True
    eval_batch_size: int = 64
    sparse_kl_weight: float = 1.0
    sparse_kl_warmup: int = 0
    sparse_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_bad_steps < 1:
            raise ConfigError("--max-bad-steps must be >= 1")
        if self.lr <= 0 or self.clip <= 0:
            raise ConfigError("--lr and --clip must be > 0")
        if not 0 < self.lr_decay <= 1:
            raise ConfigError("--lr-decay must be in (0, 1]")
        sparse_training.check_options(
            self.sparse_kl_weight, self.sparse_kl_warmup, self.sparse_lr_scale
        )


Parser = argparse.ArgumentParser | argparse._ArgumentGroup


def add_gate_arguments(parser: Parser, *, kl_help: str) -> None:
    """``--gate`` and the Beta-gate hyper-parameters (``--kl-weight`` ... ``--g2-tau``)."""
    parser.add_argument("--gate", default="bbeta5", choices=GATE_FAMILIES, help="gate family")
    parser.add_argument("--kl-weight", type=float, default=0.0, help=kl_help)
    parser.add_argument("--kl-alpha0", type=float, default=0.5)
    parser.add_argument("--gamma-sampler", default="marsaglia", choices=GAMMA_SAMPLERS)
    parser.add_argument("--g2-tau", type=float, default=0.9)


def gate_config(args: argparse.Namespace) -> GateConfig:
    """The :class:`GateConfig` of the gate options (``--reference-eps`` where a trainer has it)."""
    if args.gate not in BETA_FAMILIES and args.kl_weight:
        raise ConfigError(f"--kl-weight needs a Beta gate family, not {args.gate!r}")
    return GateConfig(
        family=args.gate,
        kl_weight=args.kl_weight,
        kl_alpha0=args.kl_alpha0,
        gamma_sampler=args.gamma_sampler,
        reference_sample_eps=getattr(args, "reference_eps", False),
        g2_tau=args.g2_tau,
    )


def add_optimisation_arguments(parser: Parser, defaults, *, lr_help: str | None = None) -> None:
    """Epochs, batch size, Adam, learning-rate decay on a plateau, clipping, early stop.

    ``defaults``: the trainer's config (its ``epochs``, ``batch_size``, ``lr``, ...).
    """
    d = defaults
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="sequences or images per batch"
    )
    parser.add_argument("--lr", type=float, default=d.lr, help=lr_help)
    parser.add_argument(
        "--lr-decay", type=float, default=d.lr_decay, help="factor on a validation plateau"
    )
    parser.add_argument(
        "--patience", type=int, default=d.patience, help="epochs without gain before a decay"
    )
    parser.add_argument("--clip", type=float, default=d.clip, help="gradient-norm clip")
    parser.add_argument(
        "--max-bad-steps",
        type=int,
        default=d.max_bad_steps,
        help="steps with a non-finite loss or gradient are skipped; stop with an error after "
        "this many in a row",
    )
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument(
        "--early-stop",
        type=int,
        default=0,
        help="stop after this many epochs without improvement (0: never)",
    )


def add_run_arguments(parser: Parser, defaults) -> None:
    """Seed, device, mixed precision, ``--resume`` and ``--resume-if-present``."""
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/last after its epoch (an error when there is none)",
    )
    resume.add_argument(
        "--resume-if-present",
        action="store_true",
        help="continue from OUT/last if there is one, else start afresh (for sweeps)",
    )


def resume_mode(args: argparse.Namespace) -> bool | str:
    """``--resume`` -> True, ``--resume-if-present`` -> ``"if-present"``, neither -> False."""
    if getattr(args, "resume_if_present", False):
        return "if-present"
    return bool(getattr(args, "resume", False))
