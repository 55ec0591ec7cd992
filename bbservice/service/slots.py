"""Model slots: one per kind (music, caption), loaded and warmed up in the background.

A :class:`ModelSlot` holds the ONNX Runtime export (``mode=mean``) and a :class:`TorchModel`,
the PyTorch model of the same weights for ``mode=stochastic`` (loaded on first use or after
warm-up; torch is imported only then). The functions below run the models: caption beams
(batched), caption gate-sampling passes and music rolls.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bbservice import checkpoints, runtime
from bbservice.decoding import Hypothesis, beam_search, sample_gate_passes
from bbservice.errors import ConfigError, DataError, first_line
from bbservice.hashing import content_hash
from bbservice.images import preprocess
from bbservice.music_generation import GenerationParams, generate_rolls
from bbservice.pianoroll import N_KEYS, Grid
from bbservice.service.http import HTTPError
from bbservice.service.settings import Settings
from bbservice.vocab import Vocabulary

log = logging.getLogger("bbservice.service")


@dataclass
class TorchModel:
    """The PyTorch model of a slot, for sampled gates; loaded on first use (or at warm-up).

    ``candidates``: checkpoint (or run) folders to look in, in order. A load that fails for
    any reason disables ``mode=stochastic`` for the slot, with the reason (409 answers).
    """

    kind: str
    enabled: bool
    candidates: list[Path]
    device_setting: str = "auto"
    model: Any = None
    device: str | None = None
    checkpoint: Path | None = None
    reason: str | None = None
    kernels: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def status(self) -> dict[str, Any]:
        return {
            "available": self.model is not None,
            "loaded": self.model is not None or self.reason is not None,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "device": self.device,
            "kernels": self.kernels,
            "reason": self.reason,
        }

    def get(self, manifest: dict):
        """The model, loading it the first time; 409 when stochastic mode is unavailable."""
        with self.lock:
            if self.model is None and self.reason is None:
                try:
                    self.model = self._load(manifest)
                except Exception as err:  # every failure disables the mode, with the reason
                    self.reason = first_line(err)
                    log.warning("%s: stochastic mode unavailable: %s", self.kind, self.reason)
        if self.model is None:
            raise HTTPError(
                409,
                f"mode=stochastic is not available for the {self.kind} model in this "
                f"deployment: {self.reason}; use mode=mean",
            )
        return self.model

    def _load(self, manifest: dict):
        if not self.enabled:
            raise ConfigError("disabled by BBSERVICE_STOCHASTIC=off")
        try:
            import torch  # noqa: F401
        except ImportError:
            raise ConfigError(
                "PyTorch is not installed here (install bbservice[train] or torch)"
            ) from None
        folder = checkpoints.find(self.candidates)
        if folder is None:
            where = ", ".join(str(c) for c in self.candidates) or "none given"
            raise DataError(f"no PyTorch checkpoint (model.safetensors) found; looked in {where}")
        device = torch_device(self.device_setting)
        model, config = checkpoints.load_model(folder, device)
        _check_same_model(model, config, manifest, folder)
        self.checkpoint, self.device = folder, device
        self.kernels = gate_kernels(device)
        log.info(
            "%s: stochastic mode ready on %s, %s gate kernels (checkpoint %s)",
            self.kind,
            device,
            self.kernels,
            folder,
        )
        return model


def gate_kernels(device: str) -> str:
    """Which gate kernels the PyTorch twin runs: on the CPU, ``"fused"`` once
    :func:`bbservice.fused.build.load` has built (or found cached) the C++ kernels, which it
    does here, at load time, rather than in the first stochastic request; ``"eager"`` without
    a compiler (reason logged) or with ``BBSERVICE_FUSED=0``. On CUDA the cells run torch's
    own (eager) ops."""
    from bbservice import fused
    from bbservice.fused import build

    if device != "cpu" or not fused.enabled():
        return "eager"
    if build.load() is None:
        log.warning("fused gate kernels unavailable, running eager: %s", build.unavailable_reason())
        return "eager"
    return "fused"


def torch_device(setting: str) -> str:
    """Where the PyTorch twin runs: CUDA when torch sees a GPU, unless ``BBSERVICE_DEVICE=cpu``
    (``cuda`` without a GPU visible to torch falls back to the CPU with a warning)."""
    import torch

    if setting != "cpu" and torch.cuda.is_available():
        return "cuda"
    if setting == "cuda":
        log.warning(
            "BBSERVICE_DEVICE=cuda but torch sees no GPU: the PyTorch models run on the CPU"
        )
    return "cpu"


def _check_same_model(model, config: dict, manifest: dict, folder: Path) -> None:
    """Refuse a checkpoint whose weights or config are not the exported model's (a pruned
    export names its sparse source model, whose checkpoint samples the gates)."""
    expected = manifest.get("content_hash")
    exported_model = manifest.get("config", {}).get("model")
    pruned = manifest.get("config", {}).get("pruned")
    if pruned:
        expected, exported_model = pruned.get("source_content_hash"), pruned.get("source_model")
    same_model = config.get("model") == exported_model
    hashes = {content_hash(model, config), content_hash(model, manifest["config"])}
    if expected not in hashes or not same_model:
        raise DataError(
            f"checkpoint '{folder}' is not the exported model (content hash differs from "
            f"{str(expected)[:12]})"
        )


@dataclass
class ModelSlot:
    """One model kind: its export, where it came from, its state and its PyTorch twin."""

    kind: str
    state: str = "loading"  # loading | warm | failed
    error: str | None = None
    export: runtime.LoadedExport | None = None
    tag: str | None = None
    source: str | None = None
    created: str | None = None
    warmup_ms: float | None = None
    stochastic: TorchModel | None = None
    stepper: Any = None
    vocabulary: Vocabulary | None = None
    event: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def content_hash(self) -> str:
        return self.export.manifest["content_hash"]

    @property
    def grid(self) -> Grid:
        return Grid.from_dict(self.export.grid)

    def identity(self, precision: str) -> dict[str, Any]:
        m = self.export.manifest
        return {
            "name": runtime.STORE_NAMES[self.kind],
            "tag": self.tag,
            "content_hash": m["content_hash"],
            "gate_family": m.get("gate_family"),
            "precision": precision,
        }

    def open(self, path: Path, settings: Settings) -> None:
        """Load the export at ``path`` and prepare the stepper and the PyTorch candidates."""
        s = settings
        self.export = runtime.load_export(
            path, device=s.device, precision=s.precision, threads=s.ort_threads
        )
        if self.export.kind != self.kind:
            raise DataError(f"'{path}' holds a {self.export.kind} model, not {self.kind}")
        self.created = self.created or self.export.manifest.get("created")
        candidates = []
        if s.checkpoint_folder(self.kind):
            candidates.append(Path(s.checkpoint_folder(self.kind)))
        candidates.append(path / "checkpoint")
        source_ckpt = self.export.manifest.get("source", {}).get("checkpoint")
        if source_ckpt:
            candidates.append(Path(source_ckpt))
        self.stochastic = TorchModel(self.kind, s.stochastic != "off", candidates, s.device)
        if self.kind == "music":
            self.stepper = self.export.music_stepper()
        else:
            self.stepper = self.export.caption_stepper()
            self.vocabulary = Vocabulary.from_itos(self.export.vocabulary, str(path))


# -- running the models -------------------------------------------------------------------------

StepsHook = Callable[[int], None] | None


class CountingStepper:
    """A stepper that counts its ``step`` calls (the decode steps of one model call) and
    otherwise is the stepper it wraps."""

    def __init__(self, stepper: Any) -> None:
        self.stepper, self.steps = stepper, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stepper, name)

    def step(self, *args: Any, **kwargs: Any) -> Any:
        self.steps += 1
        return self.stepper.step(*args, **kwargs)


def _counted(stepper: Any, on_steps: StepsHook) -> Any:
    return stepper if on_steps is None else CountingStepper(stepper)


def _report(stepper: Any, on_steps: StepsHook) -> None:
    if on_steps is not None:
        on_steps(stepper.steps)


def caption_beams(
    slot: ModelSlot, key: tuple, arrays: list[np.ndarray], on_steps: StepsHook = None
) -> list[list[Hypothesis]]:
    """Mean-gate beam search of a batch of images ``(3, S, S)``; ``key`` is (beam_size,
    max_length, n_best, length_penalty, groups, diversity). ``on_steps(n)`` gets the number of
    decode steps the batch took."""
    beam_size, max_length, n_best, length_penalty, groups, diversity = key
    ids = slot.export.special_ids
    stepper = _counted(slot.stepper, on_steps)
    hyps = beam_search(
        stepper,
        np.stack(arrays),
        start_id=ids["start"],
        end_id=ids["end"],
        beam_size=beam_size,
        max_length=max_length,
        length_penalty=length_penalty,
        n_best=n_best,
        groups=groups,
        diversity=diversity,
    )
    _report(stepper, on_steps)
    return hyps


def caption_passes(slot: ModelSlot, array: np.ndarray, params: dict, on_steps: StepsHook = None):
    """``params["samples"]`` sampled-gate passes over one image (the PyTorch model, on its
    device); ``on_steps(n)``: the decode steps of the passes (run as one batch)."""
    from bbservice.models.caption import TorchCaptionStepper

    model = slot.stochastic.get(slot.export.manifest)
    ids = slot.export.special_ids
    stepper = _counted(
        TorchCaptionStepper(model, gate_mode="sample", seed=params["seed"]), on_steps
    )
    result = sample_gate_passes(
        stepper,
        array[None],
        passes=params["samples"],
        start_id=ids["start"],
        end_id=ids["end"],
        beam_size=params["beam_size"],
        max_length=params["max_length"],
        length_penalty=params["length_penalty"],
    )[0]
    _report(stepper, on_steps)
    return result


def music_rolls(
    slot: ModelSlot, params: dict, primer: np.ndarray | None, on_steps: StepsHook = None
) -> np.ndarray:
    """``(num_outputs, T, 88)`` rolls: ONNX Runtime (mean) or PyTorch (stochastic) gates, the
    PyTorch model on its device; ``on_steps(n)``: the model steps (primer frames included)."""
    if params["mode"] == "stochastic":
        from bbservice.models.music import TorchMusicStepper

        model = slot.stochastic.get(slot.export.manifest)
        stepper = TorchMusicStepper(model, "sample", params["seed"])
    else:
        stepper = slot.stepper
    stepper = _counted(stepper, on_steps)
    gen = GenerationParams(
        params["frames"], params["temperature"], params["seed"], params["num_outputs"]
    )
    rolls = generate_rolls(stepper, gen, primer)
    _report(stepper, on_steps)
    return rolls


# -- warm-up -----------------------------------------------------------------------------------


def warm_music(slot: ModelSlot) -> None:
    rolls = generate_rolls(slot.stepper, GenerationParams(frames=4, num_outputs=2))
    if rolls.shape != (2, 4, N_KEYS):
        raise DataError(f"music warm-up gave rolls of shape {rolls.shape}")


def warm_caption(slot: ModelSlot) -> None:
    from PIL import Image

    size = slot.export.image_size
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    picture = np.stack(
        [np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.full((size, size), 128.0)],
        axis=-1,
    ).astype(np.uint8)
    array = preprocess(Image.fromarray(picture), size)
    beams = caption_beams(slot, (2, 3, 1, 0.0, 1, 0.0), [array, array])
    if len(beams) != 2:
        raise DataError("caption warm-up gave no captions")
