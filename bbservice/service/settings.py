"""The service's configuration: request limits and the ``BBSERVICE_*`` environment variables.

Environment variables (all optional)::

    BBSERVICE_MUSIC_EXPORT, BBSERVICE_CAPTION_EXPORT     export folders instead of the store
    BBSERVICE_MUSIC_CHECKPOINT, BBSERVICE_CAPTION_CHECKPOINT
                                 PyTorch checkpoint folders for mode=stochastic (default: the
                                 export's ``checkpoint/`` folder, else the manifest's source)
    BBSERVICE_STOCHASTIC         auto (default) | off
    BBSERVICE_DEVICE             auto (default) | cpu | cuda     ONNX Runtime providers, the
                                 declared resources (a GPU with the CUDA provider) and the
                                 PyTorch device of mode=stochastic (CUDA when torch sees one)
    BBSERVICE_PRECISION          fp32 (default) | fp16 | int8
    BBSERVICE_ORT_THREADS        intra-op threads per session (default: ONNX Runtime's)
    BBSERVICE_MAX_UPLOAD_BYTES   request body limit (default 10 MiB) -> 413
    BBSERVICE_MAX_PIXELS         image pixel limit (default 25 M) -> 413
    BBSERVICE_MAX_BATCH          caption adaptive-batch size (default 16; 1 = no batching)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bbservice import runtime
from bbservice.errors import ConfigError

# -- request limits (out of range: 400 naming the parameter) -----------------------------------
MAX_BEAM = 10
MAX_DIVERSITY = 100.0  # diverse beam search strength (log-probability units per repeated word)
MAX_CAPTION_WORDS = 50
MAX_SAMPLES = 32
MAX_FRAMES = 2048
MAX_OUTPUTS = 8
MAX_TOTAL_FRAMES = 8192  # frames x num_outputs of one request
MAX_PRIMER_FRAMES = 2048
MAX_PRIMER_BYTES = 1 << 20
MAX_SEED = 2**63 - 1
REQUEST_TIMEOUT_S = 60.0
MAX_CONCURRENCY = 128  # per worker; more concurrent requests get 429
WARMUP_WAIT_S = 30.0  # how long a request waits for a model that is still warming up
KINDS = ("music", "caption")


def _env_int(env: Mapping[str, str], name: str, default: int, low: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value}")
    return value


def _env_choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.get(name) or default
    if value not in choices:
        raise ConfigError(f"{name}={value!r}; choose one of {', '.join(choices)}")
    return value


def export_folder_from_env(kind: str, env: Mapping[str, str] | None = None) -> str | None:
    """``BBSERVICE_{KIND}_EXPORT``: an export folder that replaces the model-store entry."""
    env = os.environ if env is None else env
    return env.get(f"BBSERVICE_{kind.upper()}_EXPORT") or None


def device_from_env(env: Mapping[str, str] | None = None) -> str:
    """``BBSERVICE_DEVICE`` (auto | cpu | cuda), read when the service class is declared: it
    decides the ``resources`` (a GPU or none) of ``@bentoml.service``."""
    env = os.environ if env is None else env
    return _env_choice(env, "BBSERVICE_DEVICE", "auto", runtime.DEVICES)


@dataclass(frozen=True)
class Settings:
    """The service's configuration, read from the environment (see the module docstring)."""

    music_export: str | None = None
    caption_export: str | None = None
    music_checkpoint: str | None = None
    caption_checkpoint: str | None = None
    stochastic: str = "auto"
    device: str = "auto"
    precision: str = "fp32"
    ort_threads: int | None = None
    max_upload_bytes: int = 10 << 20
    max_pixels: int = 25_000_000
    max_batch: int = 16

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        threads = _env_int(env, "BBSERVICE_ORT_THREADS", 0, 0)
        return cls(
            music_export=export_folder_from_env("music", env),
            caption_export=export_folder_from_env("caption", env),
            music_checkpoint=env.get("BBSERVICE_MUSIC_CHECKPOINT") or None,
            caption_checkpoint=env.get("BBSERVICE_CAPTION_CHECKPOINT") or None,
            stochastic=_env_choice(env, "BBSERVICE_STOCHASTIC", "auto", ("auto", "off")),
            device=device_from_env(env),
            precision=_env_choice(env, "BBSERVICE_PRECISION", "fp32", runtime.PRECISIONS),
            ort_threads=threads or None,
            max_upload_bytes=_env_int(env, "BBSERVICE_MAX_UPLOAD_BYTES", 10 << 20, 1024),
            max_pixels=_env_int(env, "BBSERVICE_MAX_PIXELS", 25_000_000, 1),
            max_batch=_env_int(env, "BBSERVICE_MAX_BATCH", 16, 1),
        )

    def export_folder(self, kind: str) -> str | None:
        return self.music_export if kind == "music" else self.caption_export

    def checkpoint_folder(self, kind: str) -> str | None:
        return self.music_checkpoint if kind == "music" else self.caption_checkpoint

    def limits(self) -> dict[str, Any]:
        return {
            "max_upload_bytes": self.max_upload_bytes,
            "max_pixels": self.max_pixels,
            "max_primer_bytes": MAX_PRIMER_BYTES,
            "max_primer_frames": MAX_PRIMER_FRAMES,
            "max_beam_size": MAX_BEAM,
            "max_diversity": MAX_DIVERSITY,
            "max_caption_words": MAX_CAPTION_WORDS,
            "max_samples": MAX_SAMPLES,
            "max_frames": MAX_FRAMES,
            "max_outputs": MAX_OUTPUTS,
            "max_total_frames": MAX_TOTAL_FRAMES,
            "request_timeout_s": REQUEST_TIMEOUT_S,
            "max_concurrency": MAX_CONCURRENCY,
        }
