"""Sampling piano rolls from any music step function (PyTorch or ONNX Runtime), numpy only.

A *music stepper* has ``start(batch) -> state`` (a dict of arrays, batch on axis 0 or 1 as the
backend likes) and ``step(frame (N, 88) float32, state) -> (probs (N, 88), state)``. The same
seed gives the same piano rolls on every backend whose probabilities agree, because all the
randomness here comes from one numpy Generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from bbservice.errors import ConfigError
from bbservice.pianoroll import N_KEYS


class MusicStepper(Protocol):
    def start(self, batch: int) -> dict[str, np.ndarray]: ...

    def step(
        self, frame: np.ndarray, state: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]: ...


@dataclass(frozen=True)
class GenerationParams:
    """What a generation request asks for (echoed in responses)."""

    frames: int = 64
    temperature: float = 1.0
    seed: int = 0
    num_outputs: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.frames <= 100_000:
            raise ConfigError(f"frames must be in [1, 100000], got {self.frames}")
        if not 0.05 <= self.temperature <= 10.0:
            raise ConfigError(f"temperature must be in [0.05, 10], got {self.temperature}")
        if not 1 <= self.num_outputs <= 64:
            raise ConfigError(f"num_outputs must be in [1, 64], got {self.num_outputs}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be in [0, 2^63), got {self.seed}")


def tempered(probs: np.ndarray, temperature: float) -> np.ndarray:
    """σ(logit(p) / T): T < 1 sharpens, T > 1 flattens."""
    if temperature == 1.0:
        return probs
    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    logits = np.log(p) - np.log1p(-p)
    return 1.0 / (1.0 + np.exp(-logits / temperature))


def generate_rolls(
    stepper: MusicStepper, params: GenerationParams, primer: np.ndarray | None = None
) -> np.ndarray:
    """``(num_outputs, P + frames, 88)`` uint8 rolls: the primer (P frames) then new frames.

    Without a primer the model starts from a silent frame (not included in the output).
    """
    rng = np.random.default_rng(params.seed)
    n = params.num_outputs
    state = stepper.start(n)
    if primer is not None and len(primer):
        primer = np.asarray(primer, dtype=np.uint8)
        if primer.ndim != 2 or primer.shape[1] != N_KEYS:
            raise ConfigError(f"primer must be (T, {N_KEYS}), got {primer.shape}")
        context = np.broadcast_to(primer, (n, *primer.shape))
    else:
        context = np.zeros((n, 1, N_KEYS), dtype=np.uint8)
    probs = None
    for t in range(context.shape[1]):
        probs, state = stepper.step(context[:, t].astype(np.float32), state)
    out = np.zeros((n, params.frames, N_KEYS), dtype=np.uint8)
    for t in range(params.frames):
        p = tempered(np.asarray(probs), params.temperature)
        out[:, t] = rng.random(p.shape) < p
        if t + 1 < params.frames:
            probs, state = stepper.step(out[:, t].astype(np.float32), state)
    if primer is not None and len(primer):
        return np.concatenate([np.array(context), out], axis=1)
    return out
