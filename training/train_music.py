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
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from bbservice import checkpoints
from bbservice.errors import DataError
from bbservice.models.music import MusicConfig, PianoRollModel, count_parameters, frame_nll_sum
from bbservice.prune_report import prune_report
from training import common, options, run_config, sparse_training
from training.loop import TrainingLoop, Validation, launch
from training.music_batches import (
    collate,
    evaluate_nll,
    length_bucketed_batches,
    train_batches,
    usable,
)
from training.music_data import augment_transpositions, load_music
from training.options import TrainConfig
from training.sparse_training import SparseKLSchedule, publish_report

log = logging.getLogger(__name__)


@dataclass
class MusicTrainConfig(TrainConfig):
    """How a music model is trained (saved with the checkpoint)."""

    data: str = "chorales"
    out: str = "runs/music"
    epochs: int = 40
    batch_size: int = 16
    lr: float = 2e-3
    patience: int = 3
    min_lr: float = 1e-5
    seed: int = 1000
    transpose: int = 0
    length_buckets: bool = False
    max_train_sequences: int = 0
    init_output_bias: bool = True
    model: MusicConfig = field(default_factory=MusicConfig)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = MusicConfig.from_dict(self.model)
        super().__post_init__()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = MusicTrainConfig()
    parser.add_argument(
        "--data",
        default=d.data,
        help="chorales (embedded), jsb, nottingham, musedata, piano-midi, "
        "or a .mat / .json / .pkl file or a folder of MIDI files",
    )
    parser.add_argument("--out", default=d.out, help="run folder (checkpoints, logs, curves)")
    options.add_gate_arguments(
        parser, kl_help="λ of the Gamma prior (Beta families; per summed sequence NLL)"
    )
    parser.add_argument(
        "--reference-eps",
        action="store_true",
        help="reference code's Gamma sampling (+1e-3 per sample)",
    )
    parser.add_argument(
        "--hidden",
        type=int,
        default=None,
        help="hidden size (default: the family's ~0.57M-parameter preset)",
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.0, help="locked dropout")
    options.add_optimisation_arguments(parser, d)
    parser.add_argument(
        "--transpose",
        type=int,
        default=0,
        help="augment train with transpositions in [-K, K] semitones",
    )
    parser.add_argument(
        "--length-buckets",
        action="store_true",
        help="train on batches of sequences of similar lengths (less padding; the large sets)",
    )
    parser.add_argument("--max-train-sequences", type=int, default=0, help="0: all")
    options.add_run_arguments(parser, d)
    parser.add_argument(
        "--no-init-output-bias",
        dest="init_output_bias",
        action="store_false",
        help="start the output bias at 0, not at the key log-odds",
    )
    sparse_training.add_arguments(parser, d.sparse_kl_weight, d.sparse_kl_warmup)
    run_config.add_config_argument(parser, "music")


def config_from_args(args: argparse.Namespace) -> MusicTrainConfig:
    gate = options.gate_config(args)
    model_kw = {"num_layers": args.layers, "dropout": args.dropout}
    if getattr(args, "sparsify", False):
        model_kw["sparse"] = True
    if args.hidden:
        model_kw["hidden_size"] = args.hidden
    gate_kw = {f.name: getattr(gate, f.name) for f in fields(gate) if f.name != "family"}
    model = MusicConfig.preset(args.gate, **gate_kw, **model_kw)
    names = {f.name for f in fields(MusicTrainConfig)} - {"model", "amp"}
    kw = {n: getattr(args, n) for n in names if hasattr(args, n)}
    return MusicTrainConfig(model=model, amp=not args.no_amp, **kw)


def run(args: argparse.Namespace) -> int:
    train(config_from_args(args), resume=options.resume_mode(args))
    return 0


def train(cfg: MusicTrainConfig, resume: bool | str = False) -> dict:
    """Train; returns the final summary (best validation and its test NLL).

    ``resume``: see :class:`training.loop.TrainingLoop`."""
    return launch(MusicTraining, cfg, resume)


class MusicTraining(TrainingLoop):
    """Frame NLL of a piano-roll model; the best epoch has the lowest validation NLL."""

    best_mode = "min"
    best_keys = ("best_val", "best_epoch")

    def __init__(self, cfg: MusicTrainConfig, dist, device, resume: bool | str = False) -> None:
        super().__init__(cfg, dist, device, resume)
        self.splits = load_music(cfg.data)
        self.train_seqs = self._training_sequences()
        common.seed_everything(cfg.seed)
        self.model = PianoRollModel(cfg.model).to(device)
        groups = sparse_training.split_parameters(self.model, cfg.lr, cfg.sparse_lr_scale)
        self.optimizer = torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, factor=cfg.lr_decay, patience=cfg.patience, min_lr=cfg.min_lr
        )
        if cfg.init_output_bias:
            frames = torch.from_numpy(np.concatenate(self.train_seqs).mean(0))
            self.model.init_readout_bias(frames)
        self.n_params = count_parameters(self.model)
        self.rng = np.random.default_rng(cfg.seed)  # the batch order (same on every process)
        self.data_rng_state: dict | None = None
        self.sparse = None
        if cfg.model.sparse:
            frames = sum(len(seq) - 1 for seq in self.train_seqs)
            self.sparse = SparseKLSchedule(cfg.sparse_kl_weight, cfg.sparse_kl_warmup, frames)

    def _training_sequences(self) -> list[np.ndarray]:
        cfg, splits = self.cfg, self.splits
        seqs = usable(splits.train)
        if cfg.max_train_sequences:
            seqs = seqs[: cfg.max_train_sequences]
        if cfg.transpose:
            seqs = augment_transpositions(seqs, range(-cfg.transpose, cfg.transpose + 1))
        if not seqs or not usable(splits.valid):
            raise DataError(f"music data '{cfg.data}' has an empty train or valid split")
        return seqs

    def prepare(self) -> None:
        cfg, dist = self.cfg, self.dist
        self.ddp_model = dist.wrap(self.model)
        if dist.is_main:
            log.info(
                "music %s: %s gates, hidden %d, %d parameters, %d train sequences, device %s, "
                "%d process(es)",
                self.splits.name,
                cfg.model.gate.family,
                cfg.model.hidden_size,
                self.n_params,
                len(self.train_seqs),
                self.device,
                dist.world_size,
            )
        if self.data_rng_state is not None:
            self.rng.bit_generator.state = self.data_rng_state
        else:  # a fresh run, or a trainer.pt without the state: replay the earlier epochs
            for _ in range(1, self.start_epoch):
                self.rng.permutation(len(self.train_seqs))

    def grad_cell(self) -> torch.nn.Module:
        return self.model.rnn

    def trainer_state(self, epoch: int) -> dict:
        return {**super().trainer_state(epoch), "data_rng": self.rng.bit_generator.state}

    def load_trainer_state(self, state: dict) -> None:
        super().load_trainer_state(state)
        self.data_rng_state = state.get("data_rng")

    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, dist, model = self.cfg, self.dist, self.model
        started = time.perf_counter()
        model.train()
        if cfg.length_buckets:
            lengths = [len(s) for s in self.train_seqs]
            batches = length_bucketed_batches(lengths, cfg.batch_size, self.rng)
        else:
            batches = train_batches(len(self.train_seqs), cfg.batch_size, self.rng)
        per_rank = len(batches) // dist.world_size
        mine = batches[dist.rank * per_rank : (dist.rank + 1) * per_rank]
        kl_weight = cfg.model.gate.kl_weight
        loss_sum, frame_count, kl_sum = 0.0, 0, 0.0
        bar = self.progress_bar(mine, f"epoch {epoch}")
        for step, idx in enumerate(bar):
            inputs, targets, lengths, mask = collate([self.train_seqs[i] for i in idx], self.device)
            with common.autocast(self.device, cfg.amp):
                logits, _ = self.ddp_model(inputs, lengths)
            nll = frame_nll_sum(logits, targets, mask)
            frames = int(lengths.sum())
            kl = model.rnn.last_kl if kl_weight else None
            loss = (nll + kl_weight * kl) / frames if kl is not None else nll / frames
            if self.sparse is not None:
                loss = loss + self.sparse.loss(model.sparse_kl(), epoch, step / max(len(mine), 1))
            if not self.step(loss):  # skipped: a non-finite loss or gradient
                continue
            loss_sum += float(nll.detach())
            frame_count += frames
            kl_sum += float(kl.detach()) if kl is not None else 0.0
            bar.set_postfix(nll=f"{loss_sum / frame_count:.3f}")
        loss_sum, frame_count, kl_sum = dist.sum(loss_sum, frame_count, kl_sum)
        return {
            "train_nll": loss_sum / max(frame_count, 1),
            "train_kl_per_frame": kl_sum / max(frame_count, 1),
            "epoch_seconds": time.perf_counter() - started,
        }

    def validate(self, epoch: int, train: dict[str, float]) -> Validation:
        val_sum, val_frames = evaluate_nll(
            self.model, self.splits.valid, device=self.device, batch_size=self.cfg.eval_batch_size
        )
        val_nll = val_sum / val_frames
        record = {
            "epoch": epoch,
            "train_nll": train["train_nll"],
            "train_kl_per_frame": train["train_kl_per_frame"],
            "valid_nll": val_nll,
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_seconds": train["epoch_seconds"],
        }
        if self.sparse is not None:
            with torch.no_grad():
                record.update(self.sparse.record(self.model.sparse_kl(), self.model.sparsity()))
        return Validation(val_nll, record)

    def checkpoint_config(self, epoch: int, record: dict) -> dict:
        splits = self.splits
        return {
            "kind": "music",
            "model": self.cfg.model.to_dict(),
            "train": asdict(self.cfg),
            "data": {
                "name": splits.name,
                "frames_per_beat": splits.frames_per_beat,
                "fps": splits.fps,
                "sizes": list(splits.sizes()),
            },
            "metrics": {"valid_nll": record["valid_nll"], "epoch": epoch},
            "parameters": self.n_params,
        }

    def plot(self) -> None:
        common.plot_curves(
            common.read_jsonl(self.metrics_path),
            self.out / "curves.png",
            ["train_nll", "valid_nll"],
            f"{self.splits.name}: {self.cfg.model.gate.family}",
        )

    def log_epoch(self, epoch: int, record: dict, improved: bool) -> None:
        log.info(
            "epoch %d  train %.4f  valid %.4f%s  (%.1fs)",
            epoch,
            record["train_nll"],
            record["valid_nll"],
            "  *best*" if improved else "",
            record["epoch_seconds"],
        )

    def finish(self) -> dict:
        """Test NLL of best/, written into its config and summary.json (main process)."""
        out, best = self.out, self.best
        summary = {"best_epoch": best.epoch, "valid_nll": best.score}
        if not (self.dist.is_main and (out / "best").exists()):
            return summary
        checkpoints.load_weights(self.model, out / "best", self.device)
        test_sum, test_frames = evaluate_nll(
            self.model, self.splits.test, device=self.device, batch_size=self.cfg.eval_batch_size
        )
        summary["test_nll"] = test_sum / test_frames if test_frames else None
        config = checkpoints.read_config(out / "best")
        config["metrics"] = {**config.get("metrics", {}), **summary}
        checkpoints.write_json(out / "best" / "config.json", config)
        log.info("best epoch %d: valid %.4f, test %s", best.epoch, best.score, summary["test_nll"])
        if self.sparse is not None:  # the report of best/
            summary["prune"] = publish_report(prune_report(self.model), out)
        checkpoints.write_json(out / "summary.json", summary)
        return summary
