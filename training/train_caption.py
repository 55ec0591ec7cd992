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
import time
from dataclasses import asdict, dataclass, field, fields, replace

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from bbservice import checkpoints
from bbservice.errors import ConfigError, DataError
from bbservice.models.caption import ENCODER_ARCHS, CaptionConfig, CaptionModel
from bbservice.prune_report import caption_prune_report
from bbservice.vocab import VOCAB_FILE, Vocabulary
from training import common, options, run_config, sparse_training
from training.caption_data import (
    CaptionEvalDataset,
    CaptionTrainDataset,
    collate_train,
    get_split,
    load_karpathy,
)
from training.eval_caption import evaluate
from training.loop import TrainingLoop, Validation, launch
from training.options import TrainConfig
from training.sparse_training import SparseKLSchedule, publish_report

log = logging.getLogger(__name__)


@dataclass
class CaptionTrainConfig(TrainConfig):
    """How a caption model is trained (saved with the checkpoint as ``config.json["train"]``)."""

    data: str = ""
    image_root: str | None = None
    out: str = "runs/caption"
    lr: float = 4e-4
    encoder_lr: float = 1e-4
    min_count: int = 5
    max_train_images: int = 0
    max_val_images: int = 0
    val_split: str = "val"
    val_beam: int = 1
    ss_max: float = 0.0
    ss_start: int = 1
    ss_ramp: int = 5
    cache_images: bool = True
    num_workers: int = 0
    progress: bool = True
    model: CaptionConfig = field(default_factory=CaptionConfig)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = CaptionConfig.from_dict(self.model)
        super().__post_init__()
        if self.val_beam < 1 or self.min_count < 1:
            raise ConfigError("--val-beam and --min-count must be >= 1")
        if self.encoder_lr <= 0:
            raise ConfigError("--encoder-lr must be > 0")
        if not 0.0 <= self.ss_max <= 1.0 or self.ss_ramp < 1 or self.ss_start < 1:
            raise ConfigError("--ss-max must be in [0, 1], --ss-ramp and --ss-start >= 1")
        if self.max_train_images < 0 or self.max_val_images < 0:
            raise ConfigError("--max-train-images and --max-val-images must be >= 0")

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
    options.add_gate_arguments(model, kl_help="λ of the Gamma prior (Beta gate families)")
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
    sparse_training.add_arguments(model, d.sparse_kl_weight, d.sparse_kl_warmup)

    opt = parser.add_argument_group("optimisation")
    options.add_optimisation_arguments(opt, d, lr_help="decoder learning rate")
    opt.add_argument("--encoder-lr", type=float, default=d.encoder_lr, help="with --fine-tune")
    opt.add_argument("--ss-max", type=float, default=0.0, help="scheduled sampling: top prob.")
    opt.add_argument("--ss-start", type=int, default=d.ss_start, help="first sampled epoch")
    opt.add_argument("--ss-ramp", type=int, default=d.ss_ramp, help="epochs to reach --ss-max")
    opt.add_argument("--val-beam", type=int, default=d.val_beam, help="1: greedy validation")
    opt.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)

    run_ = parser.add_argument_group("run")
    options.add_run_arguments(run_, d)
    run_.add_argument("--no-progress", action="store_true", help="no progress bars")
    run_config.add_config_argument(parser, "caption")


def config_from_args(args: argparse.Namespace) -> CaptionTrainConfig:
    gate = options.gate_config(args)
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
    summary = train(config_from_args(args), resume=options.resume_mode(args))
    if summary:
        print(json.dumps(summary, sort_keys=True))
    return 0


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def train(cfg: CaptionTrainConfig, resume: bool | str = False) -> dict:
    """Train; returns a summary (best epoch and its validation metrics) on the main process."""
    return launch(CaptionTraining, cfg, resume)


class CaptionTraining(TrainingLoop):
    """Teacher forcing (with scheduled sampling); the best epoch has the highest validation
    CIDEr-D."""

    best_mode = "max"
    best_keys = ("best_score", "best_epoch")

    def __init__(self, cfg: CaptionTrainConfig, dist, device, resume: bool | str = False) -> None:
        super().__init__(cfg, dist, device, resume)
        self.best_metrics: dict = {}
        self._load_items()
        self.vocab, self.model_cfg = self._vocabulary_and_model_config()
        model_cfg = self.model_cfg
        if not model_cfg.fine_tune and not model_cfg.encoder_weights and dist.is_main:
            log.warning(
                "the encoder is frozen with random weights (no --encoder-weights, no "
                "--fine-tune): captions will be poor"
            )
        common.seed_everything(cfg.seed)
        model = CaptionModel.build(model_cfg, load_encoder_weights=not self.resuming)
        self.model = model.to(device)
        groups = sparse_training.split_parameters(self.model.decoder, cfg.lr, cfg.sparse_lr_scale)
        if model_cfg.fine_tune:
            groups.append({"params": list(self.model.encoder.parameters()), "lr": cfg.encoder_lr})
        self.optimizer = torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer,
            mode="max",
            factor=cfg.lr_decay,
            patience=cfg.patience,
            min_lr=cfg.min_lr,
        )

    def _load_items(self) -> None:
        cfg = self.cfg
        splits = load_karpathy(cfg.data, cfg.image_root)
        self.train_items = get_split(splits, "train", cfg.data)
        self.val_items = get_split(splits, cfg.val_split, cfg.data)
        if cfg.max_train_images:
            self.train_items = self.train_items[: cfg.max_train_images]
        if cfg.max_val_images:
            self.val_items = self.val_items[: cfg.max_val_images]

    def _vocabulary_and_model_config(self) -> tuple[Vocabulary, CaptionConfig]:
        """Those of last/ when resuming, else a vocabulary built from the training captions."""
        cfg, last = self.cfg, self.last
        if self.resuming:
            saved = checkpoints.read_config(last)
            model_cfg = CaptionConfig.from_dict(saved["model"])
            vocab = Vocabulary.from_json(last / VOCAB_FILE)
            if replace(cfg.model, vocab_size=model_cfg.vocab_size) != model_cfg:
                log.warning(
                    "--resume: using the model configuration saved in %s, not the one given", last
                )
            return vocab, model_cfg
        captions = (c for it in self.train_items for c in it.captions)
        vocab = Vocabulary.build(captions, cfg.min_count)
        if len(vocab) <= len(Vocabulary.SPECIALS):
            raise DataError(
                f"{cfg.data}: no word occurs {cfg.min_count} times in the training captions"
            )
        return vocab, replace(cfg.model, vocab_size=len(vocab))

    def prepare(self) -> None:
        cfg, model_cfg, dist = self.cfg, self.model_cfg, self.dist
        self.train_ds = CaptionTrainDataset(
            self.train_items,
            self.vocab,
            max_len=model_cfg.max_length,
            image_size=model_cfg.image_size,
            cache=cfg.cache_images,
        )
        self.val_ds = None
        if dist.is_main:
            self.val_ds = CaptionEvalDataset(
                self.val_items, model_cfg.image_size, cache=cfg.cache_images, name=cfg.val_split
            )
        self.sparse = None
        if model_cfg.sparse:
            targets = self.train_ds.targets_per_epoch()
            self.sparse = SparseKLSchedule(cfg.sparse_kl_weight, cfg.sparse_kl_warmup, targets)
        self.ddp_model = dist.wrap(self.model)
        self.counts = self.model.parameter_counts()
        if dist.is_main:
            log.info(
                "caption: %s gates, hidden %d, %d words, parameters %s, %d train / %d val "
                "images, device %s, %d process(es)",
                model_cfg.gate.family,
                model_cfg.hidden_size,
                len(self.vocab),
                self.counts,
                len(self.train_items),
                len(self.val_items),
                self.device,
                dist.world_size,
            )

    def _loader(self, epoch: int) -> DataLoader:
        cfg, dist = self.cfg, self.dist
        if dist.enabled:
            sampler = DistributedSampler(self.train_ds, shuffle=True, seed=cfg.seed)
            sampler.set_epoch(epoch)
        else:
            order = torch.Generator().manual_seed(common.epoch_seed(cfg.seed, epoch, 0))
            sampler = RandomSampler(self.train_ds, generator=order)
        return DataLoader(
            self.train_ds,
            batch_size=cfg.batch_size,
            sampler=sampler,
            collate_fn=collate_train,
            num_workers=cfg.num_workers,
        )

    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, dist, model, device = self.cfg, self.dist, self.model, self.device
        started = time.perf_counter()  # the loop seeded this epoch's streams
        loader = self._loader(epoch)
        ss_prob = cfg.sampling_probability(epoch)
        model.train()
        sums = {"ce": 0.0, "attention": 0.0, "kl": 0.0, "tokens": 0.0}
        bar = self.progress_bar(loader, f"epoch {epoch}/{cfg.epochs}", enabled=cfg.progress)
        cell = model.decoder.cell
        for step, (images, captions, lengths, _) in enumerate(bar):
            images, captions, lengths = images.to(device), captions.to(device), lengths.to(device)
            with common.autocast(device, cfg.amp):
                outputs = self.ddp_model(images, captions, lengths, sample_prob=ss_prob)
            loss = model.loss(outputs, captions, lengths)
            total = loss.total
            if self.sparse is not None:
                total = total + self.sparse.loss(cell.kl(), epoch, step / max(len(bar), 1))
            if not self.step(total):  # skipped: a non-finite loss or gradient
                continue
            for key in ("ce", "attention", "kl"):
                sums[key] += float(getattr(loss, key).detach()) * loss.tokens
            sums["tokens"] += loss.tokens
            bar.set_postfix(ce=f"{sums['ce'] / sums['tokens']:.3f}")
        ce, att, kl, n_tokens = dist.sum(sums["ce"], sums["attention"], sums["kl"], sums["tokens"])
        return {
            "train_ce": ce / max(n_tokens, 1),
            "train_attention_reg": att / max(n_tokens, 1),
            "train_kl_per_token": kl / max(n_tokens, 1),
            "ss_prob": ss_prob,
            "epoch_seconds": time.perf_counter() - started,
        }

    def validate(self, epoch: int, train: dict[str, float]) -> Validation:
        """CIDEr-D of the validation split on the main process (the score goes to all)."""
        cfg, score, record = self.cfg, 0.0, {}
        started = time.perf_counter()
        if self.dist.is_main:
            result = evaluate(
                self.model,
                self.vocab,
                self.val_items,
                beam=cfg.val_beam,
                batch_size=cfg.eval_batch_size,
                device=self.device,
                dataset=self.val_ds,
                progress=cfg.progress,
            )
            val = result["metrics"]
            score = val["CIDEr-D"]
            record = {
                "epoch": epoch,
                "train_ce": train["train_ce"],
                "train_attention_reg": train["train_attention_reg"],
                "train_kl_per_token": train["train_kl_per_token"],
                "val_ce": result["ce"],
                **{f"val_{k}": v for k, v in val.items()},
                "lr": self.optimizer.param_groups[0]["lr"],
                "ss_prob": train["ss_prob"],
                "epoch_seconds": train["epoch_seconds"],
                "eval_seconds": time.perf_counter() - started,
            }
            if self.sparse is not None:
                cell = self.model.decoder.cell
                with torch.no_grad():
                    record.update(self.sparse.record(cell.kl(), cell.sparsity()))
        return Validation(self.dist.sum(score)[0], record)

    def save_epoch(self, epoch: int, record: dict, improved: bool) -> None:
        if improved:
            self.best_metrics = _val_metrics(record)
        super().save_epoch(epoch, record, improved)

    def checkpoint_config(self, epoch: int, record: dict) -> dict:
        return {
            "kind": "caption",
            "model": self.model_cfg.to_dict(),
            "train": asdict(self.cfg),
            "metrics": {"epoch": epoch, **_val_metrics(record)},
            "parameters": self.counts,
            "data": {"path": str(self.cfg.data), "train_images": len(self.train_items)},
        }

    def checkpoint_files(self) -> dict[str, str]:
        return {VOCAB_FILE: json.dumps({"itos": self.vocab.itos}, ensure_ascii=False, indent=0)}

    def grad_cell(self) -> torch.nn.Module:
        return self.model.decoder.cell

    def trainer_state(self, epoch: int) -> dict:
        return {**super().trainer_state(epoch), "best_metrics": self.best_metrics}

    def load_trainer_state(self, state: dict) -> None:
        super().load_trainer_state(state)
        self.best_metrics = state.get("best_metrics", {})

    def plot(self) -> None:
        model_cfg = self.model_cfg
        common.plot_curves(
            common.read_jsonl(self.metrics_path),
            self.out / "curves.png",
            ["train_ce", "val_ce", "val_BLEU-4", "val_CIDEr-D"],
            f"captions: {model_cfg.gate.family} gates, hidden {model_cfg.hidden_size}",
        )

    def log_epoch(self, epoch: int, record: dict, improved: bool) -> None:
        log.info(
            "epoch %d  train ce %.3f  val ce %.3f  BLEU-4 %.3f  CIDEr-D %.3f%s  (%.0f s + %.0f s)",
            epoch,
            record["train_ce"],
            record["val_ce"],
            record["val_BLEU-4"],
            record["val_CIDEr-D"],
            "  *best*" if improved else "",
            record["epoch_seconds"],
            record["eval_seconds"],
        )

    def finish(self) -> dict:
        summary = {
            "best_epoch": self.best.epoch,
            "best_val": self.best_metrics,
            "parameters": self.counts,
        }
        if self.dist.is_main:
            out = self.out
            if self.sparse is not None and (out / "best").exists():
                checkpoints.load_weights(self.model, out / "best", self.device)  # best/'s report
                summary["prune"] = publish_report(caption_prune_report(self.model), out)
            checkpoints.write_json(out / "summary.json", summary)
        return summary


def _val_metrics(record: dict) -> dict:
    return {k: v for k, v in record.items() if k.startswith("val_")}
