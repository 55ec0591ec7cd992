"""Experiment tracking of one run: ``metrics.jsonl`` always, TensorBoard when it is installed.

``metrics.jsonl`` keeps the format the trainers have always written (one sorted-key JSON
object per epoch, flushed and fsynced: :func:`training.common.append_jsonl`). With the
optional ``track`` extra (``pip install 'bbservice[track]'``, i.e. ``tensorboard``) every
numeric field of an epoch record also becomes a TensorBoard scalar (tag = the field name, step
= the epoch) in ``RUN/tensorboard/``, and :meth:`RunTracker.close` writes the run's
hyper-parameters (the flattened training config) with its final metrics to TensorBoard's
HParams view. Without TensorBoard the tracker logs one line saying so and writes only the JSONL.

Wiring in a training loop (main process only)::

    tracker = RunTracker(out, hparams=asdict(cfg), resume_epoch=state_epoch_or_None)
    ...
    tracker.log_epoch(record)          # where common.append_jsonl(out / "metrics.jsonl", ...) was
    ...
    tracker.close(summary)             # after the test evaluation

    tensorboard --logdir RUNROOT       # every run of a sweep side by side
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from training import common

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"model.gate.family": ...}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def hparam_values(config: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """A config as TensorBoard hyper-parameters (scalars and strings; ``None`` as "None")."""
    return {
        key: value if isinstance(value, bool | int | float | str) else str(value)
        for key, value in flatten(config).items()
    }


def scalar_values(record: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric fields of a record (booleans and the epoch itself excluded)."""
    return {
        key: float(value)
        for key, value in flatten(record).items()
        if isinstance(value, int | float)
        and not isinstance(value, bool)
        and key != "epoch"
        and math.isfinite(value)
    }


def _summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, or ``None`` without the tensorboard package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


class RunTracker:
    """Per-epoch records of one run to ``metrics.jsonl`` and (if installed) TensorBoard.

    ``out``: the run folder. ``hparams``: the run's config (nested dicts allowed).
    ``resume_epoch``: the last checkpointed epoch when resuming — later records are dropped
    from the JSONL and TensorBoard's events purged from there — or ``None`` for a fresh run,
    which starts a fresh ``metrics.jsonl``. ``tensorboard=False`` writes only the JSONL.
    """

    def __init__(
        self,
        out: str | Path,
        hparams: Mapping[str, Any] | None = None,
        *,
        resume_epoch: int | None = None,
        tensorboard: bool = True,
    ) -> None:
        self.out = Path(out)
        self.metrics_path = self.out / METRICS_FILE
        self.hparams = dict(hparams or {})
        if resume_epoch is not None:
            if self.metrics_path.exists():
                common.truncate_jsonl(self.metrics_path, resume_epoch)
        elif self.metrics_path.exists():
            self.metrics_path.unlink()  # a fresh run starts a fresh log
        self.writer = None
        if tensorboard:
            writer_class = _summary_writer_class()
            if writer_class is None:
                log.info(
                    "tensorboard is not installed: metrics go to %s only "
                    "(pip install 'bbservice[track]' for TensorBoard)",
                    self.metrics_path,
                )
            else:
                purge = None if resume_epoch is None else resume_epoch + 1
                self.writer = writer_class(str(self.out / TENSORBOARD_DIR), purge_step=purge)

    @property
    def records(self) -> list[dict]:
        """Every epoch record written so far (from the JSONL)."""
        return common.read_jsonl(self.metrics_path)

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        """Append one epoch's record (needs an ``epoch`` field)."""
        if "epoch" not in record:
            raise ValueError("an epoch record needs an 'epoch' field")
        common.append_jsonl(self.metrics_path, dict(record))
        if self.writer is not None:
            for key, value in scalar_values(record).items():
                self.writer.add_scalar(key, value, int(record["epoch"]))
            self.writer.flush()

    def close(self, final_metrics: Mapping[str, Any] | None = None) -> None:
        """Write hyper-parameters with the final metrics (TensorBoard HParams) and close."""
        if self.writer is None:
            return
        metrics = {f"final/{k}": v for k, v in scalar_values(final_metrics or {}).items()}
        if self.hparams and metrics:
            self.writer.add_hparams(hparam_values(self.hparams), metrics, run_name=".")
        self.writer.close()
        self.writer = None

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
