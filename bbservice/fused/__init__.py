"""Fused gated-LSTM steps: one CPU kernel per step forward and one backward, instead of dozens
of small torch ops (issue 11).

:func:`fused_step` is the entry point the cells use (:mod:`bbservice.cells`); eager
(:mod:`bbservice.gates`) stays the reference implementation, and the cells fall back to it for
anything the kernels do not cover (CUDA, half precision, the ``implicit`` and reference
samplers, ONNX export and tracing). The switch: ``GatedLSTM(..., fused=False)``, the
``fused`` attribute of a cell, :func:`set_enabled`, or ``BBSERVICE_FUSED=0`` in the
environment.
"""

from __future__ import annotations

import os

from bbservice.fused.step import (
    FusedStepOutput,
    SequenceNoise,
    StepNoise,
    as_eager_noise,
    draw_seed,
    fused_step,
    supported,
)

_enabled = os.environ.get("BBSERVICE_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")


def enabled() -> bool:
    """The process-wide default of the cells' ``fused`` switch (``BBSERVICE_FUSED``)."""
    return _enabled


def set_enabled(value: bool) -> None:
    """Set the process-wide default (cells whose ``fused`` is ``None`` follow it)."""
    global _enabled
    _enabled = bool(value)


__all__ = [
    "FusedStepOutput",
    "SequenceNoise",
    "StepNoise",
    "as_eager_noise",
    "draw_seed",
    "enabled",
    "fused_step",
    "set_enabled",
    "supported",
]
