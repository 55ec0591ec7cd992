"""``bbservice train caption``: train a ResNet + soft-attention gated-LSTM captioner.

Data: a Karpathy-format JSON (``bbservice generate scenes``, COCO, Flickr8k/30k). Teacher
forcing with optional scheduled sampling (the probability of feeding the model's own previous
word rises linearly from ``--ss-start`` over ``--ss-ramp`` epochs to ``--ss-max``), Adam,
gradient clipping after ``backward()``, learning-rate decay when validation CIDEr-D stops
improving, the best checkpoint by validation CIDEr-D (greedy or ``--val-beam`` decoding) and a
resumable last checkpoint after every epoch. Under ``torchrun`` each process trains on its
share of every epoch (DistributedSampler + DistributedDataParallel, gloo on the CPU, NCCL on
CUDA); the main process validates and writes. CUDA uses mixed precision unless ``--no-amp``.

Run folder (``--out``)::

    best/   model.safetensors, config.json ({"kind": "caption", "model", "train", "metrics"}),
            vocab.json
    last/   the same plus trainer.pt (optimizer, scheduler, RNG, epoch) for --resume
    metrics.jsonl, curves.png, summary.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from bbservice.errors import ConfigError, DataError
from bbservice.gates import GAMMA_SAMPLERS, GATE_FAMILIES, GateConfig
from bbservice.models.caption import ENCODER_ARCHS, CaptionConfig, CaptionModel
from training import common, run_config, sparse_training
from training.caption_data import (
    CaptionEvalDataset,
    CaptionTrainDataset,
    Vocabulary,
    collate_train,
    get_split,
    load_karpathy,
)
from training.eval_caption import evaluate
from training.prune_report import caption_prune_report
from training.sparse_training import SparseKLSchedule, publish_report

log = logging.getLogger(__name__)


@dataclass
class CaptionTrainConfig:
    """How a caption model is trained (saved with the checkpoint as ``config.json["train"]``)."""

    data: str = ""
    image_root: str | None = None
    out: str = "runs/caption"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 4e-4
    encoder_lr: float = 1e-4
    lr_decay: float = 0.5
    patience: int = 2
    min_lr: float = 1e-6
    clip: float = 5.0
    weight_decay: float = 0.0
    min_count: int = 5
    max_train_images: int = 0
    max_val_images: int = 0
    val_split: str = "val"
    val_beam: int = 1
    ss_max: float = 0.0
    ss_start: int = 1
    ss_ramp: int = 5
    early_stop: int = 0
    seed: int = 1
    device: str = "auto"
    amp: bool = True
    cache_images: bool = True
    num_workers: int = 0
    eval_batch_size: int = 64
    progress: bool = True
    sparse_kl_weight: float = 1.0
    sparse_kl_warmup: int = 0
    sparse_lr_scale: float = 1.0
    model: CaptionConfig = field(default_factory=CaptionConfig)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = CaptionConfig.from_dict(self.model)
        for name in ("epochs", "batch_size", "eval_batch_size", "val_beam", "min_count"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.lr <= 0 or self.encoder_lr <= 0 or self.clip <= 0:
            raise ConfigError("--lr, --encoder-lr and --clip must be > 0")
        if not 0 < self.lr_decay <= 1:
            raise ConfigError("--lr-decay must be in (0, 1]")
        if not 0.0 <= self.ss_max <= 1.0 or self.ss_ramp < 1 or self.ss_start < 1:
            raise ConfigError("--ss-max must be in [0, 1], --ss-ramp and --ss-start >= 1")
        if self.max_train_images < 0 or self.max_val_images < 0:
            raise ConfigError("--max-train-images and --max-val-images must be >= 0")
        sparse_training.check_options(
            self.sparse_kl_weight, self.sparse_kl_warmup, self.sparse_lr_scale
        )

    def sampling_probability(self, epoch: int) -> float:
        """Scheduled-sampling probability of an epoch (linear ramp, then constant)."""
        if self.ss_max == 0.0 or epoch < self.ss_start:
            return 0.0
        return min(self.ss_max, self.ss_max * (epoch - self.ss_start + 1) / self.ss_ramp)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d, m = CaptionTrainConfig(), CaptionConfig()
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="Karpathy-format JSON (scenes, COCO, Flickr)")
    data.add_argument("--image-root", default=None, help="image folder (default: the JSON's)")
    data.add_argument("--out", default=d.out, help="run folder (checkpoints, logs, curves)")
    data.add_argument("--min-count", type=int, default=d.min_count, help="vocabulary min count")
    data.add_argument("--max-train-images", type=int, default=0, help="first N (0: all)")
    data.add_argument("--max-val-images", type=int, default=0, help="first N (0: all)")
    data.add_argument("--val-split", default=d.val_split)
    data.add_argument(
        "--no-cache", action="store_true", help="decode images every epoch (default: keep in RAM)"
    )
    data.add_argument("--num-workers", type=int, default=d.num_workers)

    model = parser.add_argument_group("model")
    model.add_argument("--gate", default="bbeta5", choices=GATE_FAMILIES, help="gate family")
    model.add_argument("--hidden", type=int, default=m.hidden_size, help="LSTM hidden size")
    model.add_argument("--embed-dim", type=int, default=m.embed_dim)
    model.add_argument("--attention-dim", type=int, default=m.attention_dim)
    model.add_argument("--dropout", type=float, default=m.dropout, help="before the output layer")
    model.add_argument("--encoder", default=m.encoder, choices=ENCODER_ARCHS)
    model.add_argument(
        "--encoder-weights",
        default=None,
        help="local ResNet weights file (.safetensors or .pth state dict; never downloaded)",
    )
    model.add_argument(
        "--encoder-stages", type=int, default=m.encoder_stages, help="ResNet stages kept (1-4)"
    )
    model.add_argument("--fine-tune", action="store_true", help="train the encoder too")
    model.add_argument("--image-size", type=int, default=m.image_size)
    model.add_argument("--grid", type=int, default=m.grid_size, help="attention grid G (G×G)")
    model.add_argument("--max-length", type=int, default=m.max_length, help="words per caption")
    model.add_argument(
        "--attention-reg",
        type=float,
        default=m.attention_reg,
        help="λ of the doubly-stochastic attention regulariser",
    )
    model.add_argument(
        "--kl-weight", type=float, default=0.0, help="λ of the Gamma prior (Beta gate families)"
    )
    model.add_argument("--kl-alpha0", type=float, default=0.5)
    model.add_argument("--gamma-sampler", default="marsaglia", choices=GAMMA_SAMPLERS)
    model.add_argument("--g2-tau", type=float, default=0.9)
    sparse_training.add_arguments(model, d.sparse_kl_weight, d.sparse_kl_warmup)

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=d.epochs)
    opt.add_argument("--batch-size", type=int, default=d.batch_size)
    opt.add_argument("--lr", type=float, default=d.lr, help="decoder learning rate")
    opt.add_argument("--encoder-lr", type=float, default=d.encoder_lr, help="with --fine-tune")
    opt.add_argument("--lr-decay", type=float, default=d.lr_decay, help="factor on a plateau")
    opt.add_argument("--patience", type=int, default=d.patience, help="epochs before decay")
    opt.add_argument("--clip", type=float, default=d.clip, help="gradient-norm clip")
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay)
    opt.add_argument("--ss-max", type=float, default=0.0, help="scheduled sampling: top prob.")
    opt.add_argument("--ss-start", type=int, default=d.ss_start, help="first sampled epoch")
    opt.add_argument("--ss-ramp", type=int, default=d.ss_ramp, help="epochs to reach --ss-max")
    opt.add_argument("--val-beam", type=int, default=d.val_beam, help="1: greedy validation")
    opt.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    opt.add_argument(
        "--early-stop", type=int, default=0, help="stop after N epochs without gain (0: never)"
    )

    run_ = parser.add_argument_group("run")
    run_.add_argument("--seed", type=int, default=d.seed)
    run_.add_argument("--device", default="auto", help="auto, cpu or cuda")
    run_.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    run_.add_argument("--resume", action="store_true", help="continue from OUT/last")
    run_.add_argument("--no-progress", action="store_true", help="no progress bars")
    run_config.add_config_argument(parser, "caption")


def config_from_args(args: argparse.Namespace) -> CaptionTrainConfig:
    gate = GateConfig(
        family=args.gate,
        kl_weight=args.kl_weight,
        kl_alpha0=args.kl_alpha0,
        gamma_sampler=args.gamma_sampler,
        g2_tau=args.g2_tau,
    )
    model = CaptionConfig(
        encoder=args.encoder,
        encoder_weights=args.encoder_weights,
        encoder_stages=args.encoder_stages,
        fine_tune=args.fine_tune,
        image_size=args.image_size,
        grid_size=args.grid,
        embed_dim=args.embed_dim,
        attention_dim=args.attention_dim,
        hidden_size=args.hidden,
        dropout=args.dropout,
        gate=gate,
        max_length=args.max_length,
        attention_reg=args.attention_reg,
        sparse=args.sparsify,
    )
    names = {f.name for f in fields(CaptionTrainConfig)} - {"model"}
    kw = {n: getattr(args, n) for n in names if hasattr(args, n)}
    return CaptionTrainConfig(
        model=model,
        amp=not args.no_amp,
        cache_images=not args.no_cache,
        progress=not args.no_progress,
        **kw,
    )


def run(args: argparse.Namespace) -> int:
    summary = train(config_from_args(args), resume=args.resume)
    if summary:
        print(json.dumps(summary, sort_keys=True))
    return 0


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _checkpoint_config(cfg: CaptionTrainConfig, model_cfg: CaptionConfig, extra: dict) -> dict:
    return {"kind": "caption", "model": model_cfg.to_dict(), "train": asdict(cfg), **extra}


def _vocab_text(vocab: Vocabulary) -> str:
    return json.dumps({"itos": vocab.itos}, ensure_ascii=False, indent=0)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Torch seed of an epoch: every epoch draws the same captions and gate noise whether or
    not the run was interrupted before it."""
    return (seed * 1_000_003 + epoch * 7919 + rank) % 2**63


def train(cfg: CaptionTrainConfig, resume: bool = False) -> dict:
    """Train; returns a summary (best epoch and its validation metrics) on the main process."""
    device = common.pick_device(cfg.device)
    dist = common.Distributed.from_env(device.type)
    device = dist.device(device)
    try:
        return _train(cfg, resume, device, dist, Path(cfg.out))
    finally:
        dist.shutdown()


def _train(cfg: CaptionTrainConfig, resume: bool, device, dist, out: Path) -> dict:
    splits = load_karpathy(cfg.data, cfg.image_root)
    train_items = get_split(splits, "train", cfg.data)
    val_items = get_split(splits, cfg.val_split, cfg.data)
    if cfg.max_train_images:
        train_items = train_items[: cfg.max_train_images]
    if cfg.max_val_images:
        val_items = val_items[: cfg.max_val_images]

    last = out / "last"
    resuming = resume and (last / "trainer.pt").is_file()
    if resume and not resuming:
        log.info("no %s/trainer.pt: starting a fresh run", last)
    if resuming:
        saved = common.load_checkpoint_config(last)
        model_cfg = CaptionConfig.from_dict(saved["model"])
        vocab = Vocabulary.from_json(last / "vocab.json")
        if replace(cfg.model, vocab_size=model_cfg.vocab_size) != model_cfg:
            log.warning(
                "--resume: using the model configuration saved in %s, not the one given", last
            )
    else:
        vocab = Vocabulary.build((c for it in train_items for c in it.captions), cfg.min_count)
        if len(vocab) <= len(Vocabulary.SPECIALS):
            raise DataError(
                f"{cfg.data}: no word occurs {cfg.min_count} times in the training captions"
            )
        model_cfg = replace(cfg.model, vocab_size=len(vocab))

    if not model_cfg.fine_tune and not model_cfg.encoder_weights and dist.is_main:
        log.warning(
            "the encoder is frozen with random weights (no --encoder-weights, no --fine-tune): "
            "captions will be poor"
        )
    common.seed_everything(cfg.seed)
    model = CaptionModel.build(model_cfg, load_encoder_weights=not resuming).to(device)
    groups = sparse_training.split_parameters(model.decoder, cfg.lr, cfg.sparse_lr_scale)
    if model_cfg.fine_tune:
        groups.append({"params": list(model.encoder.parameters()), "lr": cfg.encoder_lr})
    optimizer = torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=cfg.lr_decay, patience=cfg.patience, min_lr=cfg.min_lr
    )
    start_epoch, best_score, best_epoch, best_metrics = 1, -math.inf, 0, {}
    metrics_path = out / "metrics.jsonl"
    if resuming:
        common.load_weights(model, last, device)
        state = torch.load(last / "trainer.pt", weights_only=False, map_location="cpu")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        common.set_rng_state(state["rng"])
        start_epoch = state["epoch"] + 1
        best_score, best_epoch = state["best_score"], state["best_epoch"]
        best_metrics = state.get("best_metrics", {})
        if dist.is_main:
            common.truncate_jsonl(metrics_path, state["epoch"])
        log.info("resuming after epoch %d (best val CIDEr-D %.4f)", state["epoch"], best_score)
    elif dist.is_main and metrics_path.exists():
        metrics_path.unlink()  # a fresh run starts a fresh log

    train_ds = CaptionTrainDataset(
        train_items,
        vocab,
        max_len=model_cfg.max_length,
        image_size=model_cfg.image_size,
        cache=cfg.cache_images,
    )
    val_ds = None
    if dist.is_main:
        val_ds = CaptionEvalDataset(
            val_items, model_cfg.image_size, cache=cfg.cache_images, name=cfg.val_split
        )
    sparse = None
    if model_cfg.sparse:
        sparse = SparseKLSchedule(
            cfg.sparse_kl_weight, cfg.sparse_kl_warmup, train_ds.targets_per_epoch()
        )
    use_scaler = device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    ddp_model = dist.wrap(model)
    counts = model.parameter_counts()
    if dist.is_main:
        log.info(
            "caption: %s gates, hidden %d, %d words, parameters %s, %d train / %d val images, "
            "device %s, %d process(es)",
            model_cfg.gate.family,
            model_cfg.hidden_size,
            len(vocab),
            counts,
            len(train_items),
            len(val_items),
            device,
            dist.world_size,
        )

    epochs_without_gain = 0
    for epoch in range(start_epoch, cfg.epochs + 1):
        started = time.perf_counter()
        torch.manual_seed(_epoch_seed(cfg.seed, epoch, dist.rank))
        if dist.enabled:
            sampler = DistributedSampler(train_ds, shuffle=True, seed=cfg.seed)
            sampler.set_epoch(epoch)
        else:
            order = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch, 0))
            sampler = RandomSampler(train_ds, generator=order)
        loader = DataLoader(
            train_ds,
            batch_size=cfg.batch_size,
            sampler=sampler,
            collate_fn=collate_train,
            num_workers=cfg.num_workers,
        )
        ss_prob = cfg.sampling_probability(epoch)
        model.train()
        sums = {"ce": 0.0, "attention": 0.0, "kl": 0.0, "tokens": 0.0}
        bar = tqdm(
            loader,
            desc=f"epoch {epoch}/{cfg.epochs}",
            disable=not (dist.is_main and cfg.progress),
            leave=False,
            unit="batch",
            dynamic_ncols=True,
        )
        cell = model.decoder.cell
        for step, (images, captions, lengths, _) in enumerate(bar):
            images, captions, lengths = images.to(device), captions.to(device), lengths.to(device)
            with common.autocast(device, cfg.amp):
                outputs = ddp_model(images, captions, lengths, sample_prob=ss_prob)
            loss = model.loss(outputs, captions, lengths)
            total = loss.total
            if sparse is not None:
                total = total + sparse.loss(cell.kl(), epoch, step / max(len(bar), 1))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)  # after backward()
            scaler.step(optimizer)
            scaler.update()
            for key in ("ce", "attention", "kl"):
                sums[key] += float(getattr(loss, key).detach()) * loss.tokens
            sums["tokens"] += loss.tokens
            bar.set_postfix(ce=f"{sums['ce'] / sums['tokens']:.3f}")
        ce, att, kl, n_tokens = dist.sum(sums["ce"], sums["attention"], sums["kl"], sums["tokens"])
        train_seconds = time.perf_counter() - started

        score, record = 0.0, {}
        if dist.is_main:
            result = evaluate(
                model,
                vocab,
                val_items,
                beam=cfg.val_beam,
                batch_size=cfg.eval_batch_size,
                device=device,
                dataset=val_ds,
                progress=cfg.progress,
            )
            val = result["metrics"]
            score = val["CIDEr-D"]
            record = {
                "epoch": epoch,
                "train_ce": ce / max(n_tokens, 1),
                "train_attention_reg": att / max(n_tokens, 1),
                "train_kl_per_token": kl / max(n_tokens, 1),
                "val_ce": result["ce"],
                **{f"val_{k}": v for k, v in val.items()},
                "lr": optimizer.param_groups[0]["lr"],
                "ss_prob": ss_prob,
                "epoch_seconds": train_seconds,
                "eval_seconds": time.perf_counter() - started - train_seconds,
            }
            if sparse is not None:
                with torch.no_grad():
                    record.update(sparse.record(cell.kl(), cell.sparsity()))
        score = dist.sum(score)[0]  # the main process's score, on every process
        scheduler.step(score)
        improved = score > best_score
        if improved:
            best_score, best_epoch, epochs_without_gain = score, epoch, 0
            best_metrics = {k: v for k, v in record.items() if k.startswith("val_")}
        else:
            epochs_without_gain += 1
        if dist.is_main:
            record["best"] = improved
            extra = {
                "metrics": {
                    "epoch": epoch,
                    **{k: v for k, v in record.items() if k.startswith("val_")},
                },
                "parameters": counts,
                "data": {"path": str(cfg.data), "train_images": len(train_items)},
            }
            files = {"vocab.json": _vocab_text(vocab)}
            checkpoint_config = _checkpoint_config(cfg, model_cfg, extra)
            if improved:
                common.save_checkpoint(out / "best", model, checkpoint_config, None, files)
            # The log line goes first: a crash before last/ is written makes --resume redo
            # this epoch (and drop the line), never skip it.
            common.append_jsonl(metrics_path, record)
            trainer_state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": common.rng_state(),
                "epoch": epoch,
                "best_score": best_score,
                "best_epoch": best_epoch,
                "best_metrics": best_metrics,
            }
            common.save_checkpoint(last, model, checkpoint_config, trainer_state, files)
            common.plot_curves(
                common.read_jsonl(metrics_path),
                out / "curves.png",
                ["train_ce", "val_ce", "val_BLEU-4", "val_CIDEr-D"],
                f"captions: {model_cfg.gate.family} gates, hidden {model_cfg.hidden_size}",
            )
            log.info(
                "epoch %d  train ce %.3f  val ce %.3f  BLEU-4 %.3f  CIDEr-D %.3f%s  "
                "(%.0f s + %.0f s)",
                epoch,
                record["train_ce"],
                record["val_ce"],
                val["BLEU-4"],
                score,
                "  *best*" if improved else "",
                train_seconds,
                record["eval_seconds"],
            )
        dist.barrier()
        if cfg.early_stop and epochs_without_gain >= cfg.early_stop:
            break

    summary = {"best_epoch": best_epoch, "best_val": best_metrics, "parameters": counts}
    if dist.is_main:
        if sparse is not None and (out / "best").exists():
            common.load_weights(model, out / "best", device)  # the report is of best/
            summary["prune"] = publish_report(caption_prune_report(model), out)
        common.write_json(out / "summary.json", summary)
    return summary
