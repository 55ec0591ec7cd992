"""What every training run needs: device and precision, seeds, DDP, RNG state, logs, curves.

Distributed training is PyTorch's own: launch with ``torchrun --nproc_per_node N ...``; the
environment variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) switch on
``DistributedDataParallel`` with gloo on the CPU and NCCL on CUDA.

Run folder layout (``--out``)::

    best/                    checkpoint of the best validation epoch (:mod:`bbservice.checkpoints`)
    last/                    the last finished epoch, with ``trainer.pt`` for ``--resume``
    metrics.jsonl            one JSON line per epoch (:class:`training.tracking.RunTracker`)
    tensorboard/             the same scalars for TensorBoard (with the ``track`` extra)
    curves.png               learning curves
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bbservice.errors import ConfigError

log = logging.getLogger(__name__)


# -- device, precision, seeds -------------------------------------------------------------------


def pick_device(requested: str | None = None) -> torch.device:
    """``"cuda"`` when present (or as asked), else the CPU; asking for a missing CUDA fails."""
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available")
    return device


def amp_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """The mixed-precision type of :func:`autocast`: bfloat16 on CUDA where supported, else
    float16; ``None`` on the CPU or when disabled."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, enabled: bool = True):
    """Mixed precision on CUDA (bfloat16 where supported, else float16); a no-op on the CPU."""
    dtype = amp_dtype(device, enabled)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def grad_scaler(device: torch.device, enabled: bool = True) -> torch.amp.GradScaler:
    """A loss scaler, enabled exactly where :func:`autocast` uses float16 (bfloat16 has
    float32's range and needs none; disabled, it passes everything through)."""
    use = amp_dtype(device, enabled) == torch.float16
    return torch.amp.GradScaler(device.type if use else "cpu", enabled=use)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (legacy global state used by libraries)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch on one process: a function of (seed, epoch, rank) only."""
    return (seed * 1_000_003 + epoch * 7919 + rank) % 2**63


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Seed every random stream (Python, NumPy, torch on the CPU and CUDA) at the start of an
    epoch: an epoch draws the same numbers whether or not the run was stopped and resumed
    before it, and each ``torchrun`` process draws its own."""
    seed_everything(epoch_seed(seed, epoch, rank))


# -- faults -------------------------------------------------------------------------------------

PAUSE_ENV = "BBSERVICE_PAUSE_AT"
PAUSE_MARKER_ENV = "BBSERVICE_PAUSE_MARKER"


def pause_point(name: str) -> None:
    """A place where fault-injection tests stop a training run to kill it.

    With ``BBSERVICE_PAUSE_AT=name`` in the environment, the process writes the file named by
    ``BBSERVICE_PAUSE_MARKER`` (if set) and sleeps until it is killed. Names: ``epochE:stepS``
    (before optimizer step S, from 0, of epoch E) and ``epochE:swap`` (between the two renames
    of ``last/`` after epoch E). Without the variable this does nothing.
    """
    if os.environ.get(PAUSE_ENV) != name:
        return
    import time

    marker = os.environ.get(PAUSE_MARKER_ENV)
    if marker:
        Path(marker).write_text(name)
    log.warning("paused at %s (%s) until killed", name, PAUSE_ENV)
    while True:
        time.sleep(1)


def progress_enabled(requested: bool = True) -> bool:
    """Progress bars only where someone watches: asked for, ``stderr`` a terminal and
    ``TQDM_DISABLE`` unset (elsewhere the trainers log one line per epoch)."""
    disabled = os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false")
    return requested and not disabled and sys.stderr.isatty()


def all_finite(module: nn.Module) -> bool:
    """Whether every parameter and floating-point buffer of ``module`` is finite."""
    tensors = [*module.parameters(), *module.buffers()]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


# -- distributed --------------------------------------------------------------------------------


@dataclass
class Distributed:
    """The process group of a ``torchrun`` launch, or a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str) -> Distributed:
        """Join the process group torchrun describes in the environment (if any)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device_type == "cuda":
            torch.cuda.set_device(local)
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local)

    def device(self, device: torch.device) -> torch.device:
        """The device of this process (its own GPU under torchrun)."""
        return torch.device("cuda", self.local_rank) if device.type == "cuda" else device

    def wrap(self, model: nn.Module) -> nn.Module:
        """``DistributedDataParallel(model)`` when distributed, else the model itself."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def sum(self, *values: float) -> list[float]:
        """Sum numbers over all processes (for metrics)."""
        if not self.enabled:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return t.cpu().tolist()

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def shutdown(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper."""
    return model.module if hasattr(model, "module") else model


# -- RNG state (for resume) ---------------------------------------------------------------------


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- logs and curves ----------------------------------------------------------------------------


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line (flushed and fsynced: the log survives a crash)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_jsonl(path: Path, max_epoch: int) -> None:
    """Keep only records with ``epoch <= max_epoch`` (resume drops epochs not checkpointed)."""
    records = [r for r in read_jsonl(path) if r.get("epoch", 0) <= max_epoch]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    os.replace(tmp, path)


def plot_curves(records: list[dict], path: Path, keys: list[str], title: str = "") -> None:
    """A PNG with one line per metric key against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    epochs = [r["epoch"] for r in records]
    for key in keys:
        values = [r.get(key) for r in records]
        if any(v is not None for v in values):
            ax.plot(epochs, [np.nan if v is None else v for v in values], marker=".", label=key)
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
