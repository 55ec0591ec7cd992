"""The training-loop skeleton both trainers share: epochs, validation, the best and the last
checkpoint, the metrics log, curves, early stopping and ``--resume``.

A trainer subclasses :class:`TrainingLoop` and fills in what is its own (how an epoch trains,
how it validates, what its checkpoint config holds); :meth:`TrainingLoop.fit` runs::

    resume from OUT/last (or start a fresh metrics log)
    prepare                    the trainer's: what needs the start epoch (seeds, data order)
    for each epoch:
        callbacks.on_epoch_start
        train_epoch            the trainer's: one pass over its data  -> train metrics
        validate               the trainer's: -> Validation(score, record)
        scheduler.step(score), best.update(score)
        save_epoch             (main process) best/ if improved, the log line, last/, curves
        callbacks.on_epoch_end
        barrier; stop early after ``early_stop`` epochs without gain
    finish                     the trainer's: test metrics, reports, summary.json

Extension points: :class:`Callback` objects (``callbacks=``) are told of every epoch and of
the end of training; the small methods (``train_epoch``, ``validate``, ``save_epoch``,
``trainer_state`` ...) can be overridden one at a time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from bbservice import checkpoints
from training import common
from training.options import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class Validation:
    """What validating an epoch gives: the ``score`` that picks the best epoch (the same on
    every process) and the ``record`` written to ``metrics.jsonl`` (main process)."""

    score: float
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class Best:
    """The best epoch so far, by a score to minimise (``mode="min"``) or maximise."""

    mode: str = "min"
    score: float = math.nan
    epoch: int = 0
    epochs_without_gain: int = 0

    def __post_init__(self) -> None:
        if math.isnan(self.score):
            self.score = math.inf if self.mode == "min" else -math.inf

    def update(self, epoch: int, score: float) -> bool:
        """Record an epoch's score; True when it is a new best."""
        better = score < self.score if self.mode == "min" else score > self.score
        if better:
            self.score, self.epoch, self.epochs_without_gain = score, epoch, 0
        else:
            self.epochs_without_gain += 1
        return better


class Callback:
    """Told of the loop's progress; override what you need (all do nothing here)."""

    def on_epoch_start(self, loop: TrainingLoop, epoch: int) -> None:
        pass

    def on_epoch_end(
        self, loop: TrainingLoop, epoch: int, result: Validation, improved: bool
    ) -> None:
        pass

    def on_train_end(self, loop: TrainingLoop, summary: dict) -> None:
        pass


class TrainingLoop:
    """The skeleton; see the module docstring. Subclasses set :attr:`model`,
    :attr:`optimizer` and :attr:`scheduler` before :meth:`fit` and implement the abstract
    methods."""

    best_mode = "min"
    #: the names of the best score and epoch in ``trainer.pt`` (kept for old run folders)
    best_keys = ("best_val", "best_epoch")

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any

    def __init__(
        self,
        cfg: TrainConfig,
        dist: common.Distributed,
        device: torch.device,
        resume: bool = False,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.cfg = cfg
        self.out, self.dist, self.device = Path(cfg.out), dist, device
        self.epochs, self.early_stop = cfg.epochs, cfg.early_stop
        self.callbacks = list(callbacks)
        self.best = Best(self.best_mode)
        self.start_epoch = 1
        self.resuming = resume and (self.last / checkpoints.TRAINER_FILE).is_file()
        if resume and not self.resuming:
            log.info("no %s/%s: starting a fresh run", self.last, checkpoints.TRAINER_FILE)

    # -- paths ------------------------------------------------------------------------------

    @property
    def last(self) -> Path:
        return self.out / "last"

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    # -- what a trainer implements ------------------------------------------------------------

    def prepare(self) -> None:
        """After :meth:`restore`, before the first epoch (:attr:`start_epoch` is known)."""

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training data; the epoch's training metrics."""
        raise NotImplementedError

    def validate(self, epoch: int, train: dict[str, float]) -> Validation:
        """The epoch's score and its metrics record (``train`` from :meth:`train_epoch`)."""
        raise NotImplementedError

    def checkpoint_config(self, epoch: int, record: dict) -> dict:
        """``config.json`` of the epoch's checkpoints."""
        raise NotImplementedError

    def checkpoint_files(self) -> dict[str, str] | None:
        """Extra files of every checkpoint (name -> text), e.g. a vocabulary."""
        return None

    def plot(self) -> None:
        """Draw the learning curves (main process, after every epoch)."""

    def log_epoch(self, epoch: int, record: dict, improved: bool) -> None:
        """One log line per epoch (main process)."""

    def finish(self) -> dict:
        """After the last epoch: test metrics, reports, ``summary.json``; the summary."""
        return {"best_epoch": self.best.epoch}

    # -- resume ------------------------------------------------------------------------------

    def trainer_state(self, epoch: int) -> dict:
        """``trainer.pt`` of ``last/``: optimizer, scheduler, RNG states, epoch and the best."""
        score_key, epoch_key = self.best_keys
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": common.rng_state(),
            "epoch": epoch,
            score_key: self.best.score,
            epoch_key: self.best.epoch,
        }

    def load_trainer_state(self, state: dict) -> None:
        score_key, epoch_key = self.best_keys
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        common.set_rng_state(state["rng"])
        self.start_epoch = state["epoch"] + 1
        self.best.score, self.best.epoch = state[score_key], state[epoch_key]

    def restore(self) -> None:
        """Continue from ``last/`` (``--resume``), or start a fresh metrics log."""
        if self.resuming:
            checkpoints.load_weights(self.model, self.last, self.device)
            state = checkpoints.load_trainer_state(self.last)
            self.load_trainer_state(state)
            if self.dist.is_main:
                common.truncate_jsonl(self.metrics_path, state["epoch"])
            log.info("resuming after epoch %d (best %.4f)", state["epoch"], self.best.score)
        elif self.dist.is_main and self.metrics_path.exists():
            self.metrics_path.unlink()  # a fresh run starts a fresh log

    # -- the loop ----------------------------------------------------------------------------

    def save_epoch(self, epoch: int, record: dict, improved: bool) -> None:
        """best/ (if improved), the metrics line, last/ and the curves (main process).

        The log line goes before last/: a crash in between makes ``--resume`` redo the epoch
        (and drop the line), never skip it.
        """
        record["best"] = improved
        config, files = self.checkpoint_config(epoch, record), self.checkpoint_files()
        if improved:
            checkpoints.save_checkpoint(self.out / "best", self.model, config, None, files)
        common.append_jsonl(self.metrics_path, record)
        state = self.trainer_state(epoch)
        checkpoints.save_checkpoint(self.last, self.model, config, state, files)
        self.plot()
        self.log_epoch(epoch, record, improved)

    def run_epoch(self, epoch: int) -> tuple[Validation, bool]:
        for callback in self.callbacks:
            callback.on_epoch_start(self, epoch)
        train = self.train_epoch(epoch)
        result = self.validate(epoch, train)
        self.scheduler.step(result.score)
        improved = self.best.update(epoch, result.score)
        if self.dist.is_main:
            self.save_epoch(epoch, result.record, improved)
        for callback in self.callbacks:
            callback.on_epoch_end(self, epoch, result, improved)
        self.dist.barrier()
        return result, improved

    def progress_bar(self, items: Iterable, desc: str, enabled: bool = True) -> tqdm:
        """A progress bar over an epoch's batches (main process only)."""
        return tqdm(
            items,
            desc=desc,
            disable=not (self.dist.is_main and enabled),
            leave=False,
            unit="batch",
            dynamic_ncols=True,
        )

    def should_stop(self) -> bool:
        return bool(self.early_stop) and self.best.epochs_without_gain >= self.early_stop

    def fit(self) -> dict:
        """Train from :attr:`start_epoch` to ``epochs`` (or an early stop); the summary."""
        self.restore()
        self.prepare()
        for epoch in range(self.start_epoch, self.epochs + 1):
            self.run_epoch(epoch)
            if self.should_stop():
                break
        summary = self.finish()
        for callback in self.callbacks:
            callback.on_train_end(self, summary)
        return summary


def launch(loop_class: type[TrainingLoop], cfg: TrainConfig, resume: bool = False) -> dict:
    """Pick the device, join the ``torchrun`` process group (if any), train with
    ``loop_class(cfg, dist, device, resume)`` and leave the group; the summary."""
    device = common.pick_device(cfg.device)
    dist = common.Distributed.from_env(device.type)
    device = dist.device(device)
    try:
        return loop_class(cfg, dist, device, resume).fit()
    finally:
        dist.shutdown()
