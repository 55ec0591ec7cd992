"""The training-loop skeleton both trainers share: epochs, validation, the best and the last
checkpoint, the metrics log, curves, early stopping and ``--resume``.

A trainer subclasses :class:`TrainingLoop` and fills in what is its own (how an epoch trains,
how it validates, what its checkpoint config holds); :meth:`TrainingLoop.fit` runs::

    resume from OUT/last (or start a fresh metrics log); open the RunTracker
    prepare                    the trainer's: what needs the start epoch (data order)
    for each epoch (unless ``early_stop`` epochs went by without gain):
        seed every random stream from (seed, epoch, rank)
        callbacks.on_epoch_start
        train_epoch            the trainer's: one pass over its data  -> train metrics;
                               each batch's loss goes through step()
        validate               the trainer's: -> Validation(score, record)
        record += skipped_steps, cell_grad_norm (GradNormMeter)
        scheduler.step(score), best.update(score)
        save_epoch             (main process) best/ if improved, the log line, last/, curves
        callbacks.on_epoch_end
        barrier
    finish                     the trainer's: test metrics, reports, summary.json
    tracker.close(summary)

Faults (:meth:`TrainingLoop.step`): a batch whose loss or gradient is not finite is skipped
with a warning and counted (``skipped_steps`` in the epoch record); ``max_bad_steps`` of them
in a row stop the run with :class:`TrainingDiverged`; a checkpoint is never written from
non-finite weights. fp16 autocast (CUDA without bfloat16) scales the loss with a GradScaler.

Exact resume: ``last/`` (written atomically after every epoch) holds the weights and
``trainer.pt``: optimizer, scheduler, loss scaler, the best score, its epoch and the early-stop
count. Every random stream is seeded from (seed, epoch, rank) when an epoch starts, and the
trainers keep their data order's generator in ``trainer.pt``, so a run killed at any moment
and resumed repeats the unfinished epoch exactly as an uninterrupted run trains it.

Extension points: :class:`Callback` objects (``callbacks=``) are told of every epoch and of
the end of training; the small methods (``train_epoch``, ``validate``, ``save_epoch``,
``trainer_state`` ...) can be overridden one at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from bbservice import checkpoints
from bbservice.errors import BBServiceError, ConfigError
from training import common
from training.gate_diagnostics import GradNormMeter
from training.options import TrainConfig
from training.tracking import RunTracker

log = logging.getLogger(__name__)


class TrainingDiverged(BBServiceError):
    """Too many steps in a row with a non-finite loss or gradient, or non-finite weights."""


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
        resume: bool | str = False,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        """``resume``: ``True`` continues from ``OUT/last`` (an error when there is none),
        ``"if-present"`` continues when there is one and else starts afresh, ``False`` starts
        afresh."""
        if resume not in (False, True, "if-present"):
            raise ConfigError(f"resume must be True, False or 'if-present', not {resume!r}")
        self.cfg = cfg
        self.out, self.dist, self.device = Path(cfg.out), dist, device
        self.epochs, self.early_stop = cfg.epochs, cfg.early_stop
        self.callbacks = list(callbacks)
        self.best = Best(self.best_mode)
        self.start_epoch = 1
        if dist.is_main:  # finish a checkpoint swap a crash cut short, before anyone looks
            for folder in (self.last, self.out / "best"):
                checkpoints.recover(folder)
        dist.barrier()
        self.resuming = bool(resume) and (self.last / checkpoints.TRAINER_FILE).is_file()
        if resume is True and not self.resuming:
            raise ConfigError(
                f"--resume: no checkpoint to resume in {self.last} (no "
                f"{checkpoints.TRAINER_FILE}); start without --resume, or use "
                "--resume-if-present to start afresh when there is none"
            )
        if resume and not self.resuming:
            log.info("no %s/%s: starting a fresh run", self.last, checkpoints.TRAINER_FILE)
        self.scaler = common.grad_scaler(device, cfg.amp)
        self.tracker: RunTracker | None = None
        self.grad_meter = GradNormMeter()
        self.epoch = 0
        self.epoch_steps = 0
        self.skipped_steps = 0
        self.bad_in_a_row = 0

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

    def grad_cell(self) -> nn.Module | None:
        """The recurrent cell(s) whose gradient norm goes into ``cell_grad_norm`` (a stacked
        ``GatedLSTM`` or a single cell; ``None``: not measured)."""
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
            "scaler": self.scaler.state_dict(),
            "rng": common.rng_state(),
            "epoch": epoch,
            score_key: self.best.score,
            epoch_key: self.best.epoch,
            "epochs_without_gain": self.best.epochs_without_gain,
        }

    def load_trainer_state(self, state: dict) -> None:
        score_key, epoch_key = self.best_keys
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        common.set_rng_state(state["rng"])
        self.start_epoch = state["epoch"] + 1
        self.best.score, self.best.epoch = state[score_key], state[epoch_key]
        # older trainer.pt files lack the count: every epoch after the best went without gain
        self.best.epochs_without_gain = state.get(
            "epochs_without_gain", state["epoch"] - state[epoch_key]
        )

    def hparams(self) -> dict:
        """The run's hyper-parameters for the tracker (the training config)."""
        return dataclasses.asdict(self.cfg) if dataclasses.is_dataclass(self.cfg) else {}

    def restore(self) -> None:
        """Continue from ``last/`` (``--resume``), or start afresh; open the tracker, which
        drops log lines after the resumed epoch (or, afresh, the old log)."""
        resumed = None
        if self.resuming:
            checkpoints.load_weights(self.model, self.last, self.device)
            state = checkpoints.load_trainer_state(self.last)
            self.load_trainer_state(state)
            resumed = state["epoch"]
            log.info("resuming after epoch %d (best %.4f)", resumed, self.best.score)
        if self.dist.is_main:
            self.tracker = RunTracker(self.out, hparams=self.hparams(), resume_epoch=resumed)

    # -- the loop ----------------------------------------------------------------------------

    def save_epoch(self, epoch: int, record: dict, improved: bool) -> None:
        """best/ (if improved), the metrics line, last/ and the curves (main process).

        The log line goes before last/: a crash in between makes ``--resume`` redo the epoch
        (and drop the line), never skip it.
        """
        if not common.all_finite(self.model):
            raise TrainingDiverged(
                f"epoch {epoch}: the weights are not finite; no checkpoint written "
                f"({self.last} still holds epoch {epoch - 1}'s)"
            )
        record["best"] = improved
        config, files = self.checkpoint_config(epoch, record), self.checkpoint_files()
        if improved:
            checkpoints.save_checkpoint(self.out / "best", self.model, config, None, files)
        if self.tracker is not None:
            self.tracker.log_epoch(record)
        else:
            common.append_jsonl(self.metrics_path, record)
        state = self.trainer_state(epoch)
        checkpoints.save_checkpoint(
            self.last,
            self.model,
            config,
            state,
            files,
            between_renames=lambda: common.pause_point(f"epoch{epoch}:swap"),
        )
        self.plot()
        self.log_epoch(epoch, record, improved)

    # -- one optimisation step -----------------------------------------------------------------

    def step(self, loss: Tensor, after_backward: Callable[[], None] | None = None) -> bool:
        """Backward, check, clip and step on one batch's ``loss``; False when skipped.

        ``zero_grad``, ``backward`` (through the loss scaler under fp16), ``after_backward()``
        if given (e.g. averaging by hand the gradients of a loss computed outside the DDP
        wrapper), unscale, then: a
        non-finite loss or gradient norm skips the step (a warning, ``skipped_steps``; after
        ``max_bad_steps`` in a row :class:`TrainingDiverged`); else the cell's gradient norm
        is measured (before clipping), the gradients clipped to ``clip`` and the optimizer
        steps. Under DDP every process takes the same decision (the gradients are averaged,
        the loss check is summed).
        """
        common.pause_point(f"epoch{self.epoch}:step{self.epoch_steps}")
        self.epoch_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if after_backward is not None:
            after_backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        bad = not (math.isfinite(float(loss.detach())) and math.isfinite(float(norm)))
        if self.dist.enabled:
            bad = self.dist.sum(float(bad))[0] > 0
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()  # fp16: a smaller scale next time
            self.skipped_steps += 1
            self.bad_in_a_row += 1
            log.warning(
                "epoch %d step %d: non-finite loss (%s) or gradient norm (%s): step skipped "
                "(%d in a row)",
                self.epoch, self.epoch_steps - 1, float(loss.detach()), float(norm),
                self.bad_in_a_row,
            )  # fmt: skip
            if self.bad_in_a_row >= self.cfg.max_bad_steps:
                raise TrainingDiverged(
                    f"epoch {self.epoch}: {self.bad_in_a_row} steps in a row with a non-finite "
                    f"loss or gradient (--max-bad-steps {self.cfg.max_bad_steps}); the run has "
                    f"diverged: lower --lr or --clip, and resume from {self.last} "
                    f"(epoch {self.epoch - 1})"
                )
            return False
        self.bad_in_a_row = 0
        cell = self.grad_cell()
        if cell is not None and self.dist.is_main:
            self.grad_meter.update(cell)
        torch.nn.utils.clip_grads_with_norm_(params, self.cfg.clip, norm)  # after backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return True

    def step_record(self) -> dict[str, float]:
        """``skipped_steps`` and ``cell_grad_norm`` (``_l{k}`` per layer) of the epoch."""
        return {"skipped_steps": self.skipped_steps, **self.grad_meter.epoch_record()}

    # -- the loop ----------------------------------------------------------------------------

    def run_epoch(self, epoch: int) -> tuple[Validation, bool]:
        self.epoch, self.epoch_steps, self.skipped_steps = epoch, 0, 0
        common.seed_epoch(self.cfg.seed, epoch, self.dist.rank)
        for callback in self.callbacks:
            callback.on_epoch_start(self, epoch)
        train = self.train_epoch(epoch)
        result = self.validate(epoch, train)
        if self.dist.is_main:
            result.record.update(self.step_record())
        self.scheduler.step(result.score)
        improved = self.best.update(epoch, result.score)
        if self.dist.is_main:
            self.save_epoch(epoch, result.record, improved)
        for callback in self.callbacks:
            callback.on_epoch_end(self, epoch, result, improved)
        self.dist.barrier()
        return result, improved

    def progress_bar(self, items: Iterable, desc: str, enabled: bool = True) -> tqdm:
        """A progress bar over an epoch's batches: main process, on a terminal only
        (:func:`training.common.progress_enabled`); elsewhere one log line per epoch."""
        return tqdm(
            items,
            desc=desc,
            disable=not (self.dist.is_main and common.progress_enabled(enabled)),
            leave=False,
            unit="batch",
            dynamic_ncols=True,
        )

    def should_stop(self) -> bool:
        return bool(self.early_stop) and self.best.epochs_without_gain >= self.early_stop

    def fit(self) -> dict:
        """Train from :attr:`start_epoch` to ``epochs`` (or an early stop); the summary.

        The early stop is checked before each epoch, so a run resumed after the epoch that
        triggered it stops as the uninterrupted run did.
        """
        self.restore()
        try:
            self.prepare()
            for epoch in range(self.start_epoch, self.epochs + 1):
                if self.should_stop():
                    break
                self.run_epoch(epoch)
            summary = self.finish()
            for callback in self.callbacks:
                callback.on_train_end(self, summary)
        except BaseException:
            if self.tracker is not None:
                self.tracker.close()
            raise
        if self.tracker is not None:
            self.tracker.close(summary)
        return summary


def launch(loop_class: type[TrainingLoop], cfg: TrainConfig, resume: bool | str = False) -> dict:
    """Pick the device, join the ``torchrun`` process group (if any), train with
    ``loop_class(cfg, dist, device, resume)`` and leave the group; the summary."""
    device = common.pick_device(cfg.device)
    dist = common.Distributed.from_env(device.type)
    device = dist.device(device)
    try:
        return loop_class(cfg, dist, device, resume).fit()
    finally:
        dist.shutdown()
