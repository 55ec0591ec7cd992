"""What every training loop shares: device and precision, seeds, DDP, checkpoints, logs, curves.

Distributed training is PyTorch's own: launch with ``torchrun --nproc_per_node N ...``; the
environment variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) switch on
``DistributedDataParallel`` with gloo on the CPU and NCCL on CUDA.

Checkpoint folder layout (``run_dir``)::

    best/model.safetensors   weights of the best validation epoch
    best/config.json         the typed config of the run (model + training), metrics
    last/model.safetensors   the last finished epoch, with
    last/trainer.pt          optimizer, scheduler, RNG states and epoch: what ``--resume`` needs
    last/config.json
    metrics.jsonl            one JSON line per epoch
    curves.png               learning curves

Every folder is written to a temporary sibling and renamed into place, so an interruption
leaves either the old or the new checkpoint, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bbservice.errors import ConfigError, DataError

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


def autocast(device: torch.device, enabled: bool = True):
    """Mixed precision on CUDA (bfloat16 where supported, else float16); a no-op on the CPU."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (legacy global state used by libraries)
    torch.manual_seed(seed)


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


# -- checkpoints --------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """A temporary sibling folder that replaces ``target`` on success and vanishes on failure."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; a server running as another user must read it
    try:
        yield tmp
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def save_weights(model: nn.Module, path: Path) -> None:
    """Weights as safetensors (contiguous CPU copies)."""
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(state, str(path))


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    config: dict,
    trainer_state: dict | None = None,
    extra_files: dict[str, str] | None = None,
) -> None:
    """Write ``folder`` atomically: weights, ``config.json``, optional ``trainer.pt`` and files.

    ``extra_files`` maps file names to text contents (e.g. a vocabulary).
    """
    with atomic_dir(Path(folder)) as tmp:
        save_weights(model, tmp / "model.safetensors")
        write_json(tmp / "config.json", config)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer.pt")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)


def load_checkpoint_config(folder: str | Path) -> dict:
    """The ``config.json`` of a checkpoint folder, with a clear error if it is not one."""
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.exists():
        raise DataError(f"checkpoint '{folder}' does not exist")
    if not path.exists() or not (folder / "model.safetensors").exists():
        raise DataError(
            f"'{folder}' is not a checkpoint folder (needs config.json and model.safetensors)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"corrupt checkpoint config '{path}': {err}") from err


def load_weights(model: nn.Module, folder: str | Path, device: torch.device | str = "cpu") -> None:
    """Load ``model.safetensors`` of a checkpoint folder into ``model``."""
    state = load_file(str(Path(folder) / "model.safetensors"), device=str(device))
    unwrap(model).load_state_dict(state)


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
