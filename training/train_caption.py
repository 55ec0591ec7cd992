"""``bbservice train caption``: train a ResNet + soft-attention gated-LSTM captioner.

Data: a Karpathy-format JSON (``bbservice generate scenes``, COCO, Flickr8k/30k). Teacher
forcing with optional scheduled sampling (the probability of feeding the model's own previous
word rises linearly from ``--ss-start`` over ``--ss-ramp`` epochs to ``--ss-max``), Adam,
gradient clipping after ``backward()``, learning-rate decay when validation CIDEr-D stops
improving, the best checkpoint by validation CIDEr-D (greedy or ``--val-beam`` decoding) and a
resumable last checkpoint after every epoch. Under ``torchrun`` each process trains on its
share of every epoch (DistributedSampler + DistributedDataParallel, gloo on the CPU, NCCL on
CUDA); validation is split across the processes too (each decodes its share of the split, the
main process gathers the captions, scores them and writes), so no process idles at a barrier
for a whole validation. CUDA uses mixed precision unless ``--no-amp``.

Encoder weights: ``--encoder-weights FILE`` (a local state dict) or ``imagenet`` (torchvision's
pretrained weights, through torchvision's download cache).

Feature cache (``--feature-cache DIR``, frozen encoder only): the images are decoded once into
a memory-mapped uint8 store under DIR (:class:`training.image_store.ImageStore`, each process
its share), the frozen encoder's features of every train and validation image are computed
once into a memory-mapped fp16 array there (:class:`training.feature_cache.FeatureCache`), and
every epoch trains the decoder on those features. Later runs with the same encoder weights,
image size and images reuse both.

Self-critical sequence training (``--scst-after N``): epochs 1..N train with cross-entropy,
later epochs with SCST (:func:`training.scst.scst_step`): CIDEr-D reward with the training
set's document frequencies, the greedy (``--scst-baseline greedy``) or the mean-of-the-other-
samples baseline (``mean``), ``--scst-samples K`` captions per image, optionally sampled gates
(``--scst-sample-gates``) and learning rate (``--scst-lr``). Their metrics lines carry the reward
statistics (``train_reward``, ``train_baseline``, ...); validation stays CIDEr-D.

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
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset

from bbservice import checkpoints
from bbservice.errors import ConfigError, DataError
from bbservice.gates import BETA_FAMILIES
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
from training.caption_metrics import score_captions
from training.cider_reward import CiderD
from training.eval_caption import decode_dataset_sums
from training.feature_cache import FeatureCache
from training.image_store import ImageStore
from training.loop import TrainingLoop, Validation, launch
from training.options import TrainConfig
from training.scst import BASELINES, SCSTBatch, SCSTConfig, average_gradients, scst_step
from training.sharded_array import Ranks, shard
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
    feature_cache: str | None = None
    scst_after: int = 0
    scst_baseline: str = "greedy"
    scst_samples: int = 5
    scst_sample_gates: bool = False
    scst_lr: float = 0.0
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
        if self.feature_cache and self.model.fine_tune:
            raise ConfigError(
                "--feature-cache needs a frozen encoder: the features of a fine-tuned encoder "
                "change every step (drop --fine-tune or --feature-cache)"
            )
        if self.scst_after < 0 or self.scst_lr < 0:
            raise ConfigError("--scst-after and --scst-lr must be >= 0")
        if self.scst_after and self.scst_after >= self.epochs:
            raise ConfigError(
                f"--scst-after {self.scst_after} leaves no SCST epoch of --epochs {self.epochs}"
            )
        self.scst_config()  # checks baseline and samples
        if self.scst_sample_gates and self.model.gate.family not in ("g2", *BETA_FAMILIES):
            raise ConfigError(
                f"--scst-sample-gates needs a stochastic gate family, not "
                f"{self.model.gate.family!r}"
            )

    def scst_config(self) -> SCSTConfig:
        """The SCST phase's sampling and baseline."""
        return SCSTConfig(
            baseline=self.scst_baseline,
            samples=self.scst_samples,
            sample_gates=self.scst_sample_gates,
        )

    def is_scst_epoch(self, epoch: int) -> bool:
        """Whether ``epoch`` trains with SCST (after ``scst_after`` cross-entropy epochs)."""
        return bool(self.scst_after) and epoch > self.scst_after

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
    data.add_argument(
        "--feature-cache",
        default=None,
        metavar="DIR",
        help="frozen encoder: decode the images once into DIR and train on the encoder "
        "features cached there (fp16, memory-mapped, reused by later runs)",
    )

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
        help="'imagenet' (torchvision's pretrained weights, downloaded once into torchvision's "
        "cache), a local ResNet weights file (.safetensors or .pth state dict), or a caption "
        "run/checkpoint folder (its trained encoder)",
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

    scst = parser.add_argument_group("self-critical sequence training")
    scst.add_argument(
        "--scst-after",
        type=int,
        default=d.scst_after,
        metavar="N",
        help="after N cross-entropy epochs train with SCST (0: never)",
    )
    scst.add_argument("--scst-baseline", default=d.scst_baseline, choices=BASELINES)
    scst.add_argument(
        "--scst-samples", type=int, default=d.scst_samples, help="captions sampled per image"
    )
    scst.add_argument(
        "--scst-sample-gates",
        action="store_true",
        help="sample the gates as well as the words (stochastic gate families)",
    )
    scst.add_argument(
        "--scst-lr",
        type=float,
        default=d.scst_lr,
        help="learning rate of every group from the first SCST epoch (0: keep the current one)",
    )

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
        cached = bool(cfg.feature_cache)
        self.train_ds = CaptionTrainDataset(
            self.train_items,
            self.vocab,
            max_len=model_cfg.max_length,
            image_size=model_cfg.image_size,
            cache=cfg.cache_images and not cached,
        )
        if len(self.val_items) < dist.world_size:
            raise ConfigError(
                f"{len(self.val_items)} validation images for {dist.world_size} processes: "
                "every process validates a share"
            )
        # This process's share of the validation split (all of it in a single process).
        self.val_rows = shard(len(self.val_items), dist.rank, dist.world_size)
        self.val_ds = CaptionEvalDataset(
            self.val_items[self.val_rows.start : self.val_rows.stop],
            model_cfg.image_size,
            cache=cfg.cache_images and not cached,
            name=cfg.val_split,
        )
        if cached:
            train_features = self._feature_cache(self.train_items)
            val_features = self._feature_cache(self.val_items)
            self.train_ds.images = train_features  # (P, C) features instead of images
            self.val_ds.images = Subset(val_features, list(self.val_rows))
        self.scorer = None
        if cfg.scst_after:
            self.scorer = CiderD([" ".join(c) for c in it.captions] for it in self.train_items)
            self.train_refs = [[" ".join(c) for c in it.captions] for it in self.train_items]
        self.sparse = None
        if model_cfg.sparse:
            targets = self.train_ds.targets_per_epoch()
            self.sparse = SparseKLSchedule(cfg.sparse_kl_weight, cfg.sparse_kl_warmup, targets)
        # With cached features only the decoder runs (and is synchronised) in training.
        self.ddp_model = dist.wrap(self.model.decoder if cached else self.model)
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

    def _feature_cache(self, items) -> FeatureCache:
        """The frozen encoder's features of ``items``' images (decoded into the image store
        and encoded once, each process its share; later runs open both again)."""
        cfg, model_cfg = self.cfg, self.model_cfg
        paths = [it.image_path for it in items]
        ranks = Ranks(self.dist.rank, self.dist.world_size)
        store = ImageStore.build(
            paths,
            model_cfg.image_size,
            cfg.feature_cache,
            num_workers=cfg.num_workers,
            batch_size=cfg.eval_batch_size,
            progress=cfg.progress,
            ranks=ranks,
        )
        features = FeatureCache.build(
            model_cfg,
            self.model.encoder,
            store,
            paths,
            cfg.feature_cache,
            batch_size=cfg.eval_batch_size,
            progress=cfg.progress,
            ranks=ranks,
        )
        if self.dist.is_main:
            log.info(
                "feature cache %s: %d images, %s (%s)",
                cfg.feature_cache,
                len(features),
                tuple(features.array.shape),
                "built" if features.built else "reused",
            )
        return features

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
        if self.cfg.is_scst_epoch(epoch):
            return self.scst_epoch(epoch)
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
            "phase": "ce",
            "train_ce": ce / max(n_tokens, 1),
            "train_attention_reg": att / max(n_tokens, 1),
            "train_kl_per_token": kl / max(n_tokens, 1),
            "ss_prob": ss_prob,
            "epoch_seconds": time.perf_counter() - started,
        }

    def scst_epoch(self, epoch: int) -> dict[str, float]:
        """One self-critical epoch (:func:`training.scst.scst_step` on every batch); the
        reward statistics, averaged over the batches of all processes."""
        cfg, dist, model, device = self.cfg, self.dist, self.model, self.device
        started = time.perf_counter()
        # (the loop seeded this epoch's streams)
        if epoch == cfg.scst_after + 1 and cfg.scst_lr:
            for group in self.optimizer.param_groups:  # resumed later: the saved state has it
                group["lr"] = cfg.scst_lr
        scst_cfg = cfg.scst_config()
        loader = self._loader(epoch)
        model.train()
        keys = ("reward", "baseline", "greedy_reward", "advantage_std", "sample_words")
        sums = dict.fromkeys(keys, 0.0)
        batches = 0
        bar = self.progress_bar(loader, f"SCST epoch {epoch}/{cfg.epochs}", enabled=cfg.progress)
        for inputs, _, _, index in bar:
            refs = [self.train_refs[i] for i in index.tolist()]
            batch = SCSTBatch(inputs.to(device), refs)
            with common.autocast(device, cfg.amp):
                result = scst_step(model, batch, self.scorer, self.vocab.itos, scst_cfg)
            # The loop's shared step (NaN policy, clipping, the cell's gradient norm); the loss
            # comes from the plain model, not the DDP wrapper, so its gradients are averaged
            # across the processes by hand between backward and unscale.
            self.step(result.loss, after_backward=lambda: average_gradients(model))
            for key in keys:
                sums[key] += result.stats.get(key, 0.0)
            batches += 1
            bar.set_postfix(reward=f"{sums['reward'] / batches:.3f}")
        totals = dist.sum(*(sums[k] for k in keys), float(batches))
        n = max(totals[-1], 1.0)
        stats = {f"train_{k}": v / n for k, v in zip(keys, totals, strict=False)}
        if scst_cfg.baseline != "greedy":
            stats.pop("train_greedy_reward")
        return {
            "phase": "scst",
            **stats,
            "epoch_seconds": time.perf_counter() - started,
        }

    def _decode_validation(self) -> tuple[dict[int, str], float, int]:
        """Captions of the whole validation split (main process; ``{}`` elsewhere) and the
        teacher-forced cross-entropy sum and tokens; every process decodes its share."""
        cfg = self.cfg
        captions, ce_sum, tokens = decode_dataset_sums(
            self.model,
            self.vocab,
            self.val_ds,
            beam=cfg.val_beam,
            batch_size=cfg.eval_batch_size,
            device=self.device,
            progress=cfg.progress and self.dist.is_main,
        )
        offset = self.val_rows.start
        captions = {offset + i: text for i, text in captions.items()}
        if not self.dist.enabled:
            return captions, ce_sum, tokens
        import torch.distributed as tdist

        shares: list = [None] * self.dist.world_size
        tdist.all_gather_object(shares, (captions, ce_sum, tokens))
        merged: dict[int, str] = {}
        for share_captions, _, _ in shares:
            merged.update(share_captions)
        return merged, sum(s[1] for s in shares), sum(s[2] for s in shares)

    def validate(self, epoch: int, train: dict[str, float]) -> Validation:
        """CIDEr-D of the validation split: every process decodes its share, the main process
        scores the whole (the score goes to all)."""
        score, record = 0.0, {}
        started = time.perf_counter()
        captions, ce_sum, tokens = self._decode_validation()
        if self.dist.is_main:
            refs = {i: [" ".join(c) for c in it.captions] for i, it in enumerate(self.val_items)}
            val = score_captions(refs, captions, meteor=False)
            score = val["CIDEr-D"]
            record = {
                "epoch": epoch,
                **{k: v for k, v in train.items() if k != "epoch_seconds"},
                "val_ce": ce_sum / max(tokens, 1),
                **{f"val_{k}": v for k, v in val.items()},
                "lr": self.optimizer.param_groups[0]["lr"],
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
            ["train_ce", "val_ce", "val_BLEU-4", "val_CIDEr-D", "train_reward"],
            f"captions: {model_cfg.gate.family} gates, hidden {model_cfg.hidden_size}",
        )

    def log_epoch(self, epoch: int, record: dict, improved: bool) -> None:
        if record.get("phase") == "scst":
            train = f"SCST reward {record['train_reward']:.3f}"
        else:
            train = f"train ce {record['train_ce']:.3f}"
        log.info(
            "epoch %d  %s  val ce %.3f  BLEU-4 %.3f  CIDEr-D %.3f%s  (%.0f s + %.0f s)",
            epoch,
            train,
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
