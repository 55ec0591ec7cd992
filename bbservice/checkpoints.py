"""The checkpoint format: save, load and find PyTorch checkpoints of both model kinds.

A checkpoint is a folder::

    model.safetensors   the weights (contiguous CPU tensors)
    config.json         {"kind": "music" | "caption", "model": {...}, "train": {...}, "metrics"...}
    vocab.json          captions only: the vocabulary (:mod:`bbservice.vocab`)
    trainer.pt          ``last/`` only: optimizer, scheduler, RNG states, epoch (for resume)

A training run folder holds ``best/`` and ``last/`` checkpoints; every loader here also takes
the run folder and reads its ``best/``. Folders are written to a temporary sibling, fsynced and
renamed into place, so an interruption leaves either the old or the new checkpoint, never half
of one; a swap cut between its two renames is finished by :func:`recover`, which the loaders
and :func:`atomic_dir` call.

Trainers, evaluation, the exporter, the service and the tests all read and write through this
module. torch and safetensors are imported inside the functions that need them, so the
torch-free service can import the module.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bbservice.errors import ConfigError, DataError, first_line
from bbservice.vocab import VOCAB_FILE, Vocabulary

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from bbservice.models.caption import CaptionModel
    from bbservice.models.music import PianoRollModel

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAINER_FILE = "trainer.pt"


# -- writing ------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` and the folders themselves (deepest first)."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(root))


def _swap_paths(target: Path) -> tuple[Path, Path]:
    """(the new copy being written, the old copy being replaced) of a folder swap."""
    return target.with_name(f".{target.name}.tmp"), target.with_name(f".{target.name}.old")


def _complete(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def recover(target: str | Path) -> bool:
    """Finish or undo a folder swap that a crash interrupted; True when ``target`` exists.

    :func:`atomic_dir` writes ``.NAME.tmp`` (fsynced), renames ``NAME`` to ``.NAME.old``,
    renames ``.NAME.tmp`` to ``NAME`` and removes ``.NAME.old``. A crash between the two
    renames leaves no ``NAME``: the complete new copy (``.NAME.tmp``) is moved into place,
    else the old one. Leftovers beside an existing ``NAME`` (a half-written ``.tmp``, an
    ``.old`` not yet removed) are deleted. A folder that cannot be written is left alone.
    """
    target = Path(target)
    tmp, old = _swap_paths(target)
    try:
        if not target.exists() and old.is_dir():  # cut between the renames
            source = tmp if tmp.is_dir() and _complete(tmp) else old
            os.replace(source, target)
            _fsync_dir(target.parent)
        if target.exists():
            for leftover in (tmp, old):
                if leftover.exists():
                    shutil.rmtree(leftover)
    except OSError:
        pass  # read-only: the loaders report what is missing
    return target.exists()


@contextlib.contextmanager
def atomic_dir(target: Path, between_renames: Callable[[], None] | None = None) -> Iterator[Path]:
    """A temporary sibling folder that replaces ``target`` on success and vanishes on failure.

    The new copy is written to ``.NAME.tmp`` and fsynced (files and folder) before ``NAME`` is
    renamed to ``.NAME.old`` and the copy into place, so a crash at any moment leaves a
    complete old or new folder (:func:`recover` finishes a swap cut between the renames).
    ``between_renames``: called between the two renames (a hook for fault-injection tests).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp, old = _swap_paths(target)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tmp.chmod(0o755)  # a server running as another user must read it
    try:
        yield tmp
        fsync_tree(tmp)
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            os.replace(target, old)
            _fsync_dir(target.parent)
        if between_renames is not None:
            between_renames()
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists() and not (old.exists() and not target.exists()):
            shutil.rmtree(tmp)  # a failed write; a cut swap is left for recover()


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def save_weights(model: nn.Module, path: Path) -> None:
    """Weights as safetensors (contiguous CPU copies; a DDP wrapper is looked through)."""
    from safetensors.torch import save_file

    model = getattr(model, "module", model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    config: dict,
    trainer_state: dict | None = None,
    extra_files: dict[str, str] | None = None,
    between_renames: Callable[[], None] | None = None,
) -> None:
    """Write ``folder`` atomically: weights, ``config.json``, optional ``trainer.pt`` and files.

    ``extra_files`` maps file names to text contents (e.g. a vocabulary).
    ``between_renames``: see :func:`atomic_dir`.
    """
    with atomic_dir(Path(folder), between_renames) as tmp:
        save_weights(model, tmp / WEIGHTS_FILE)
        write_json(tmp / CONFIG_FILE, config)
        if trainer_state is not None:
            import torch

            torch.save(trainer_state, tmp / TRAINER_FILE)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)


# -- finding and reading --------------------------------------------------------------------------


def resolve(folder: str | Path) -> Path:
    """A checkpoint folder itself, or the ``best/`` checkpoint of a run folder."""
    folder = Path(folder)
    if not folder.exists():
        recover(folder)
    if not (folder / CONFIG_FILE).is_file():
        if (folder / "best").exists() or _swap_paths(folder / "best")[1].exists():
            recover(folder / "best")
        if (folder / "best" / CONFIG_FILE).is_file():
            return folder / "best"
    return folder


def find(candidates: Sequence[Path]) -> Path | None:
    """The first of ``candidates`` (or of their ``best/``) that holds weights, else None."""
    folders = [f for c in candidates for f in (Path(c), Path(c) / "best")]
    return next((f for f in folders if (f / WEIGHTS_FILE).is_file()), None)


def read_config(folder: str | Path, kind: str | None = None) -> dict:
    """The ``config.json`` of a checkpoint folder, with a clear error if it is not one.

    ``kind``: the model kind the checkpoint must hold (a config without ``kind`` is taken
    as that kind).
    """
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not folder.exists() and not recover(folder):
        raise DataError(f"checkpoint '{folder}' does not exist")
    if not path.is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise DataError(
            f"'{folder}' is not a checkpoint folder (needs config.json and model.safetensors)"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"corrupt checkpoint config '{path}': {err}") from err
    if kind is not None:
        found = config.get("kind", kind) if isinstance(config, dict) else None
        if found != kind:
            raise DataError(f"checkpoint '{folder}' is a {found!r} model, not {kind}")
        if not isinstance(config.get("model"), dict):
            raise DataError(f"{path}: no 'model' section")
    return config


def load_weights(model: nn.Module, folder: str | Path, device: Any = "cpu") -> None:
    """Load ``model.safetensors`` of a checkpoint folder into ``model`` (DDP looked through)."""
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_FILE
    model = getattr(model, "module", model)
    try:
        model.load_state_dict(load_file(str(path), device=str(device)))
    except Exception as err:  # safetensors and load_state_dict raise many types
        raise DataError(f"{path}: weights do not load ({first_line(err)})") from err


def load_trainer_state(folder: str | Path) -> dict:
    """``trainer.pt`` of a ``last/`` checkpoint (optimizer, scheduler, RNG, epoch)."""
    import torch

    recover(folder)
    return torch.load(Path(folder) / TRAINER_FILE, weights_only=False, map_location="cpu")


# -- the two model kinds ----------------------------------------------------------------------


def load_music(folder: str | Path, device: Any = "cpu") -> tuple[PianoRollModel, dict]:
    """(model in eval mode, checkpoint config) of a music checkpoint or run folder."""
    from bbservice.models.music import MusicConfig, PianoRollModel

    folder = resolve(folder)
    config = read_config(folder, "music")
    model = PianoRollModel(MusicConfig.from_dict(config["model"]))
    load_weights(model, folder, device)
    return model.to(device).eval(), config


def load_caption_model(folder: str | Path, device: Any = "cpu") -> tuple[CaptionModel, dict]:
    """(model in eval mode, checkpoint config) of a caption checkpoint or run folder.

    The encoder's weights come from the checkpoint, so ``encoder_weights`` is not read again.
    """
    from bbservice.models.caption import CaptionConfig, CaptionModel

    folder = resolve(folder)
    config = read_config(folder, "caption")
    model = CaptionModel.build(CaptionConfig.from_dict(config["model"]), load_encoder_weights=False)
    load_weights(model, folder, device)
    return model.to(device).eval(), config


def load_caption(folder: str | Path, device: Any = "cpu") -> tuple[CaptionModel, Vocabulary, Path]:
    """(model in eval mode, vocabulary, the checkpoint folder) of a caption checkpoint."""
    folder = resolve(folder)
    model, _ = load_caption_model(folder, device)
    vocab = Vocabulary.from_json(folder / VOCAB_FILE)
    if len(vocab) != model.config.vocab_size:
        raise ConfigError(
            f"{folder}: vocab.json has {len(vocab)} words but the model {model.config.vocab_size}"
        )
    return model, vocab, folder


def load_model(folder: str | Path, device: Any = "cpu") -> tuple[Any, dict]:
    """(model in eval mode, config) of a checkpoint of either kind (``config["kind"]``)."""
    folder = resolve(folder)
    kind = read_config(folder).get("kind", "caption")
    if kind == "music":
        return load_music(folder, device)
    return load_caption_model(folder, device)
