"""``bbservice train music``: train a piano-roll model on a benchmark, MIDI folder or chorales.

Padded, masked mini-batches (``--batch-size 1`` reproduces the reference one-sequence
protocol), Adam, learning-rate decay on a validation plateau, gradient clipping after
``backward()``, the best-validation checkpoint and a resumable last checkpoint (both atomic),
a JSONL metrics log and a PNG of the learning curves. Under ``torchrun`` every process trains
on its share of each epoch's batches with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bbservice.errors import ConfigError, DataError
from bbservice.gates import GAMMA_SAMPLERS, GATE_FAMILIES
from bbservice.models.music import MusicConfig, PianoRollModel, count_parameters, frame_nll_sum
from training import common, run_config, sparse_training
from training.music_data import augment_transpositions, load_music
from training.music_loop import collate, evaluate_nll, train_batches, usable
from training.prune_report import prune_report
from training.sparse_training import SparseKLSchedule, publish_report

log = logging.getLogger(__name__)


@dataclass
class MusicTrainConfig:
    """How a music model is trained (saved with the checkpoint)."""

    data: str = "chorales"
    out: str = "runs/music"
    epochs: int = 40
    batch_size: int = 16
    lr: float = 2e-3
    lr_decay: float = 0.5
    patience: int = 3
    min_lr: float = 1e-5
    clip: float = 5.0
    weight_decay: float = 0.0
    seed: int = 1000
    transpose: int = 0
    max_train_sequences: int = 0
    eval_batch_size: int = 64
    device: str = "auto"
    amp: bool = True
    early_stop: int = 0
    init_output_bias: bool = True
    sparse_kl_weight: float = 1.0
    sparse_kl_warmup: int = 0
    sparse_lr_scale: float = 1.0
    model: MusicConfig = field(default_factory=MusicConfig)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = MusicConfig.from_dict(self.model)
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        sparse_training.check_options(
            self.sparse_kl_weight, self.sparse_kl_warmup, self.sparse_lr_scale
        )
        if self.lr <= 0 or not 0 < self.lr_decay <= 1 or self.clip <= 0:
            raise ConfigError("--lr and --clip must be > 0 and --lr-decay in (0, 1]")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = MusicTrainConfig()
    parser.add_argument(
        "--data",
        default=d.data,
        help="chorales (embedded), jsb, nottingham, musedata, piano-midi, "
        "or a .mat / .json / .pkl file or a folder of MIDI files",
    )
    parser.add_argument("--out", default=d.out, help="run folder (checkpoints, logs, curves)")
    parser.add_argument("--gate", default="bbeta5", choices=GATE_FAMILIES, help="gate family")
    parser.add_argument(
        "--hidden",
        type=int,
        default=None,
        help="hidden size (default: the family's ~0.57M-parameter preset)",
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.0, help="locked dropout")
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="sequences per batch (1 = the reference protocol)",
    )
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument(
        "--lr-decay", type=float, default=d.lr_decay, help="factor on a validation plateau"
    )
    parser.add_argument("--patience", type=int, default=d.patience)
    parser.add_argument("--clip", type=float, default=d.clip, help="gradient-norm clip")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument(
        "--early-stop",
        type=int,
        default=0,
        help="stop after this many epochs without improvement (0: never)",
    )
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--transpose",
        type=int,
        default=0,
        help="augment train with transpositions in [-K, K] semitones",
    )
    parser.add_argument("--max-train-sequences", type=int, default=0, help="0: all")
    parser.add_argument(
        "--kl-weight",
        type=float,
        default=0.0,
        help="λ of the Gamma prior (Beta families; per summed sequence NLL)",
    )
    parser.add_argument("--kl-alpha0", type=float, default=0.5)
    parser.add_argument("--gamma-sampler", default="marsaglia", choices=GAMMA_SAMPLERS)
    parser.add_argument(
        "--reference-eps",
        action="store_true",
        help="reference code's Gamma sampling (+1e-3 per sample)",
    )
    parser.add_argument("--g2-tau", type=float, default=0.9)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last")
    parser.add_argument(
        "--no-init-output-bias",
        dest="init_output_bias",
        action="store_false",
        help="start the output bias at 0, not at the key log-odds",
    )
    sparse_training.add_arguments(parser, d.sparse_kl_weight, d.sparse_kl_warmup)
    run_config.add_config_argument(parser, "music")


def config_from_args(args: argparse.Namespace) -> MusicTrainConfig:
    gate_kw = {
        "kl_weight": args.kl_weight,
        "kl_alpha0": args.kl_alpha0,
        "gamma_sampler": args.gamma_sampler,
        "reference_sample_eps": args.reference_eps,
        "g2_tau": args.g2_tau,
    }
    if args.gate not in ("beta", "bbeta3", "bbeta5") and args.kl_weight:
        raise ConfigError(f"--kl-weight needs a Beta gate family, not {args.gate!r}")
    model_kw = {"num_layers": args.layers, "dropout": args.dropout}
    if getattr(args, "sparsify", False):
        model_kw["sparse"] = True
    if args.hidden:
        model_kw["hidden_size"] = args.hidden
    model = MusicConfig.preset(args.gate, **gate_kw, **model_kw)
    names = {f.name for f in fields(MusicTrainConfig)} - {"model", "amp"}
    kw = {n: getattr(args, n) for n in names if hasattr(args, n)}
    return MusicTrainConfig(model=model, amp=not args.no_amp, **kw)


def run(args: argparse.Namespace) -> int:
    train(config_from_args(args), resume=args.resume)
    return 0


def _checkpoint_config(cfg: MusicTrainConfig, splits, extra: dict) -> dict:
    return {
        "kind": "music",
        "model": cfg.model.to_dict(),
        "train": asdict(cfg),
        "data": {
            "name": splits.name,
            "frames_per_beat": splits.frames_per_beat,
            "fps": splits.fps,
            "sizes": list(splits.sizes()),
        },
        **extra,
    }


def train(cfg: MusicTrainConfig, resume: bool = False) -> dict:
    """Train; returns the final summary (best validation and its test NLL)."""
    device = common.pick_device(cfg.device)
    dist = common.Distributed.from_env(device.type)
    device = dist.device(device)
    out = Path(cfg.out)
    try:
        return _train(cfg, resume, device, dist, out)
    finally:
        dist.shutdown()


def _train(cfg, resume, device, dist, out) -> dict:
    splits = load_music(cfg.data)
    train_seqs = usable(splits.train)
    if cfg.max_train_sequences:
        train_seqs = train_seqs[: cfg.max_train_sequences]
    if cfg.transpose:
        train_seqs = augment_transpositions(train_seqs, range(-cfg.transpose, cfg.transpose + 1))
    if not train_seqs or not usable(splits.valid):
        raise DataError(f"music data '{cfg.data}' has an empty train or valid split")

    common.seed_everything(cfg.seed)
    model = PianoRollModel(cfg.model).to(device)
    groups = sparse_training.split_parameters(model, cfg.lr, cfg.sparse_lr_scale)
    optimizer = torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=cfg.lr_decay, patience=cfg.patience, min_lr=cfg.min_lr
    )
    if cfg.init_output_bias:
        model.init_readout_bias(torch.from_numpy(np.concatenate(train_seqs).mean(0)))
    start_epoch, best_val, best_epoch = 1, math.inf, 0
    metrics_path = out / "metrics.jsonl"
    if resume and (out / "last" / "trainer.pt").exists():
        common.load_weights(model, out / "last", device)
        state = torch.load(out / "last" / "trainer.pt", weights_only=False, map_location="cpu")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        common.set_rng_state(state["rng"])
        start_epoch, best_val, best_epoch = (
            state["epoch"] + 1,
            state["best_val"],
            state["best_epoch"],
        )
        if dist.is_main:
            common.truncate_jsonl(metrics_path, state["epoch"])
        log.info("resuming after epoch %d (best valid %.4f)", state["epoch"], best_val)
    elif dist.is_main and metrics_path.exists():
        metrics_path.unlink()  # a fresh run starts a fresh log
    torch.manual_seed(cfg.seed * 7919 + dist.rank + start_epoch)  # gate noise differs per rank
    ddp_model = dist.wrap(model)
    n_params = count_parameters(model)
    if dist.is_main:
        log.info(
            "music %s: %s gates, hidden %d, %d parameters, %d train sequences, device %s, "
            "%d process(es)",
            splits.name,
            cfg.model.gate.family,
            cfg.model.hidden_size,
            n_params,
            len(train_seqs),
            device,
            dist.world_size,
        )
    kl_weight = cfg.model.gate.kl_weight
    sparse = None
    if cfg.model.sparse:
        frames = sum(len(seq) - 1 for seq in train_seqs)
        sparse = SparseKLSchedule(cfg.sparse_kl_weight, cfg.sparse_kl_warmup, frames)
    rng = np.random.default_rng(cfg.seed)
    for _ in range(1, start_epoch):
        rng.permutation(len(train_seqs))  # keep the batch order of an uninterrupted run
    epochs_without_gain = 0
    for epoch in range(start_epoch, cfg.epochs + 1):
        started = time.perf_counter()
        model.train()
        batches = train_batches(len(train_seqs), cfg.batch_size, rng)
        per_rank = len(batches) // dist.world_size
        mine = batches[dist.rank * per_rank : (dist.rank + 1) * per_rank]
        loss_sum, frame_count, kl_sum = 0.0, 0, 0.0
        bar = tqdm(
            mine,
            desc=f"epoch {epoch}",
            disable=not dist.is_main,
            leave=False,
            unit="batch",
            dynamic_ncols=True,
        )
        for step, idx in enumerate(bar):
            inputs, targets, lengths, mask = collate([train_seqs[i] for i in idx], device)
            with common.autocast(device, cfg.amp):
                logits, _ = ddp_model(inputs, lengths)
            nll = frame_nll_sum(logits, targets, mask)
            frames = int(lengths.sum())
            kl = model.rnn.last_kl if kl_weight else None
            loss = (nll + kl_weight * kl) / frames if kl is not None else nll / frames
            if sparse is not None:
                loss = loss + sparse.loss(model.sparse_kl(), epoch, step / max(len(mine), 1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)  # after backward()
            optimizer.step()
            loss_sum += float(nll.detach())
            frame_count += frames
            kl_sum += float(kl.detach()) if kl is not None else 0.0
            bar.set_postfix(nll=f"{loss_sum / frame_count:.3f}")
        loss_sum, frame_count, kl_sum = dist.sum(loss_sum, frame_count, kl_sum)
        train_seconds = time.perf_counter() - started
        val_sum, val_frames = evaluate_nll(
            model, splits.valid, device=device, batch_size=cfg.eval_batch_size
        )
        val_nll = val_sum / val_frames
        scheduler.step(val_nll)
        improved = val_nll < best_val
        if improved:
            best_val, best_epoch, epochs_without_gain = val_nll, epoch, 0
        else:
            epochs_without_gain += 1
        record = {
            "epoch": epoch,
            "train_nll": loss_sum / max(frame_count, 1),
            "train_kl_per_frame": kl_sum / max(frame_count, 1),
            "valid_nll": val_nll,
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_seconds": train_seconds,
            "best": improved,
        }
        if sparse is not None:
            with torch.no_grad():
                record.update(sparse.record(model.sparse_kl(), model.sparsity()))
        if dist.is_main:
            extra = {"metrics": {"valid_nll": val_nll, "epoch": epoch}, "parameters": n_params}
            if improved:
                common.save_checkpoint(out / "best", model, _checkpoint_config(cfg, splits, extra))
            trainer_state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": common.rng_state(),
                "epoch": epoch,
                "best_val": best_val,
                "best_epoch": best_epoch,
            }
            common.save_checkpoint(
                out / "last", model, _checkpoint_config(cfg, splits, extra), trainer_state
            )
            common.append_jsonl(out / "metrics.jsonl", record)
            common.plot_curves(
                common.read_jsonl(out / "metrics.jsonl"),
                out / "curves.png",
                ["train_nll", "valid_nll"],
                f"{splits.name}: {cfg.model.gate.family}",
            )
            log.info(
                "epoch %d  train %.4f  valid %.4f%s  (%.1fs)",
                epoch,
                record["train_nll"],
                val_nll,
                "  *best*" if improved else "",
                train_seconds,
            )
        dist.barrier()
        if cfg.early_stop and epochs_without_gain >= cfg.early_stop:
            break
    summary = {"best_epoch": best_epoch, "valid_nll": best_val}
    if dist.is_main and (out / "best").exists():
        common.load_weights(model, out / "best", device)
        test_sum, test_frames = evaluate_nll(
            model, splits.test, device=device, batch_size=cfg.eval_batch_size
        )
        summary["test_nll"] = test_sum / test_frames if test_frames else None
        config = common.load_checkpoint_config(out / "best")
        config["metrics"] = {**config.get("metrics", {}), **summary}
        common.write_json(out / "best" / "config.json", config)
        log.info("best epoch %d: valid %.4f, test %s", best_epoch, best_val, summary["test_nll"])
        if sparse is not None:  # the report of best/
            summary["prune"] = publish_report(prune_report(model), out)
        common.write_json(out / "summary.json", summary)
    return summary
