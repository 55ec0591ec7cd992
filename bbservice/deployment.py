"""What the BentoML service declares to the machine it runs on: resources and log level.

* :func:`service_resources` — the ``resources`` of ``@bentoml.service``: a GPU when the ONNX
  Runtime CUDA provider is configured, so BentoML pins one GPU per worker
  (``CUDA_VISIBLE_DEVICES``) and a cloud deployment can size the instance.
* :func:`configure_logging` — under ``bentoml serve`` the root logger is at WARNING, so the
  project's INFO lines (which providers each session really got, warm-up times) would be
  dropped; BentoML's handler on the root has no level of its own, so giving the ``bbservice``
  logger an explicit level lets them through (BentoML configures logging in each worker
  before it imports the service module, so calling this at import time sticks).

numpy/onnxruntime only; no torch, no bentoml import.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

__all__ = ["LOG_LEVEL_ENV", "configure_logging", "declares_gpu", "service_resources"]

CUDA = "CUDAExecutionProvider"
LOG_LEVEL_ENV = "BBSERVICE_LOG_LEVEL"


def declares_gpu(device: str, available_providers: Sequence[str] | None = None) -> bool:
    """True when the service will ask ONNX Runtime for CUDA: ``device="cuda"``, or ``"auto"``
    with an onnxruntime build that offers the CUDA provider (the gpu extra / GPU image)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; choose auto, cpu or cuda")
    if device == "cpu":
        return False
    if device == "cuda":
        return True
    if available_providers is None:
        import onnxruntime

        available_providers = onnxruntime.get_available_providers()
    return CUDA in available_providers


def service_resources(
    device: str,
    *,
    available_providers: Sequence[str] | None = None,
    cpu: str = "1",
    memory: str = "2Gi",
) -> dict[str, object]:
    """``resources=`` for ``@bentoml.service``: ``{"cpu", "memory"}`` plus ``"gpu": 1`` when the
    CUDA provider is configured (:func:`declares_gpu`)."""
    resources: dict[str, object] = {"cpu": str(cpu), "memory": str(memory)}
    if declares_gpu(device, available_providers):
        resources["gpu"] = 1
    return resources


def configure_logging(level: str | int | None = None) -> int:
    """Give the ``bbservice`` logger an explicit level (default: ``$BBSERVICE_LOG_LEVEL`` or
    INFO) so its records pass BentoML's WARNING root; returns the level set."""
    if level is None:
        level = os.environ.get(LOG_LEVEL_ENV, "INFO")
    if isinstance(level, str):
        name = level.upper()
        value = logging.getLevelName(name)
        if not isinstance(value, int):
            raise ValueError(f"{LOG_LEVEL_ENV}: unknown log level {level!r}")
        level = value
    logging.getLogger("bbservice").setLevel(level)
    return level
