"""Self-critical sequence training (Rennie et al. 2017) for the caption model.

One SCST step on a batch of B images (:func:`scst_step`)::

    features (B, P, C)  ── repeated K times ──▶  K sampled captions per image, with the
                                                 log-probability of every sampled word (N = B·K)
    reward r (N,)    = CIDEr-D of each sample against its image's references (training IDF,
                       :class:`training.cider_reward.CiderD`)
    baseline b (N,)  = "greedy": the reward of the image's greedy caption (eval mode, mean
                       gates, no gradient): Rennie et al.'s self-critical baseline;
                       "mean": the mean reward of the image's other K − 1 samples (Luo 2020,
                       "A better variant of self-critical sequence training"); no extra decode
    loss             = − Σ_n (r_n − b_n) · Σ_t log p(w_nt) / (sampled tokens)

as in ruotianluo/ImageCaptioning.pytorch (the sum over every sampled word, ``<end>``
included, divided by their number). Words are drawn from the model's own distribution
(temperature 1) with the model in its current mode (dropout on in training). A caption that
reaches ``max_length`` words without ``<end>`` stops there; the forced end is not a decision
of the policy and carries no log-probability.

Gates: with ``sample_gates=False`` the recurrence uses the mean gates while the words are
sampled; with ``sample_gates=True`` (stochastic families only: ``g2``, ``beta``, ``bbeta3``,
``bbeta5``) every sample also draws its own gates. The gate draws are reparameterised
(``bbservice.gates``), so ∇ E_ε E_w[r] = E_ε E_w[r ∇ log p(w | gates(ε, θ))]: the same
REINFORCE loss, with the gradient flowing through the gates too, is unbiased. The gate prior's
KL term of the cross-entropy phase is not part of this loss.

Under DDP the step runs on the plain model (not the DDP wrapper), so the caller averages the
gradients across ranks after ``backward()`` (:func:`average_gradients`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from bbservice.errors import ConfigError
from bbservice.models.caption import CaptionModel
from bbservice.vocab import END_ID, PAD_ID, START_ID
from training.cider_reward import CiderD

__all__ = [
    "BASELINES",
    "SCSTBatch",
    "SCSTConfig",
    "SCSTResult",
    "SampledCaptions",
    "average_gradients",
    "captions_text",
    "greedy_captions",
    "mean_of_others",
    "sample_captions",
    "scst_loss",
    "scst_step",
]

BASELINES = ("greedy", "mean")


@dataclass(frozen=True)
class SCSTConfig:
    """How :func:`scst_step` samples and baselines.

    baseline : ``"greedy"`` (self-critical) or ``"mean"`` (mean of the other samples).
    samples : K, captions sampled per image (``"mean"`` needs K ≥ 2).
    sample_gates : sample the gates as well as the words (stochastic gate families only).
    max_length : most words per sampled caption (``None``: the model's ``max_length``).
    """

    baseline: str = "greedy"
    samples: int = 5
    sample_gates: bool = False
    max_length: int | None = None

    def __post_init__(self) -> None:
        if self.baseline not in BASELINES:
            raise ConfigError(
                f"unknown SCST baseline {self.baseline!r}; choose one of {', '.join(BASELINES)}"
            )
        if self.samples < 1:
            raise ConfigError(f"SCST samples must be >= 1, got {self.samples}")
        if self.baseline == "mean" and self.samples < 2:
            raise ConfigError("the 'mean' SCST baseline needs at least 2 samples per image")
        if self.max_length is not None and self.max_length < 1:
            raise ConfigError(f"SCST max_length must be >= 1, got {self.max_length}")


@dataclass
class SCSTBatch:
    """One SCST batch.

    inputs : images (B, 3, S, S) float32, or encoder features (B, P, C) (a feature cache).
    references : per image its reference captions as strings (words joined by spaces).
    """

    inputs: Tensor
    references: list[list[str]]

    def __post_init__(self) -> None:
        if self.inputs.dim() not in (3, 4):
            raise ConfigError(
                f"SCST inputs must be images (B, 3, S, S) or features (B, P, C), "
                f"got shape {tuple(self.inputs.shape)}"
            )
        if len(self.references) != self.inputs.shape[0]:
            raise ConfigError(
                f"SCST batch: {self.inputs.shape[0]} inputs but {len(self.references)} "
                "reference lists"
            )


class SampledCaptions(NamedTuple):
    """Captions decoded from N rows.

    tokens : (N, T) int64 word ids, ``<end>`` included when chosen, ``<pad>`` after it.
    log_probs : (N, T) log-probability of each token (differentiable when sampled with grad).
    mask : (N, T) float, 1 where the token was chosen by the policy.
    """

    tokens: Tensor
    log_probs: Tensor
    mask: Tensor


class SCSTResult(NamedTuple):
    """The loss to ``backward()`` and float statistics for the log."""

    loss: Tensor
    stats: dict[str, float]


def _features(model: CaptionModel, inputs: Tensor) -> Tensor:
    """Encoder features (B, P, C) of images, or the features themselves."""
    return model.encoder(inputs) if inputs.dim() == 4 else inputs


def _decode(
    model: CaptionModel,
    features: Tensor,
    max_length: int,
    gate_mode: str,
    greedy: bool,
    generator: torch.Generator | None,
) -> SampledCaptions:
    """Run the decoder from ``<start>`` on features (N, P, C), choosing by argmax or by
    sampling, until every row has chosen ``<end>`` or ``max_length`` words."""
    dec = model.decoder
    N = features.shape[0]
    projected, h, c = dec.encode_features(features)
    tokens = torch.full((N,), START_ID, dtype=torch.long, device=features.device)
    alive = torch.ones(N, dtype=torch.bool, device=features.device)
    out_tokens, out_lp, out_mask = [], [], []
    with dec.cell.sequence_noise(N, features):
        matmuls = dec.cell.recurrent_matmuls(N)
        for _ in range(max_length):
            log_probs, h, c, _ = dec.step(
                tokens, h, c, features, gate_mode, projected, matmuls=matmuls, generator=generator
            )
            if greedy:
                chosen = log_probs.argmax(dim=1)
            else:
                probs = log_probs.detach().float().exp()
                chosen = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            picked = log_probs.gather(1, chosen.unsqueeze(1)).squeeze(1)  # (N,)
            out_tokens.append(torch.where(alive, chosen, torch.full_like(chosen, PAD_ID)))
            out_lp.append(picked)
            out_mask.append(alive.to(picked.dtype))
            alive = alive & (chosen != END_ID)
            if not bool(alive.any()):
                break
            tokens = chosen
    mask = torch.stack(out_mask, dim=1)
    return SampledCaptions(torch.stack(out_tokens, dim=1), torch.stack(out_lp, dim=1) * mask, mask)


def sample_captions(
    model: CaptionModel,
    features: Tensor,
    samples: int,
    *,
    max_length: int | None = None,
    sample_gates: bool = False,
    generator: torch.Generator | None = None,
) -> SampledCaptions:
    """``samples`` captions per image drawn from the model, with gradients.

    ``features`` (B, P, C); rows ``b·K .. b·K + K − 1`` of the result are image b's samples
    (N = B·K). The model's mode is used as it is (dropout in training); gates are the mean
    gates unless ``sample_gates``. ``log_probs`` carries the graph for the policy gradient.
    """
    gate = model.decoder.cell.gate
    if sample_gates and not gate.stochastic:
        raise ConfigError(
            f"gate family {gate.config.family!r} has deterministic gates: there are no gates "
            "to sample (sample_gates is for g2, beta, bbeta3 and bbeta5)"
        )
    length = max_length or model.config.max_length
    repeated = features.repeat_interleave(samples, dim=0)  # (B·K, P, C)
    mode = "sample" if sample_gates else "mean"
    return _decode(model, repeated, length, mode, greedy=False, generator=generator)


@torch.no_grad()
def greedy_captions(
    model: CaptionModel, features: Tensor, *, max_length: int | None = None
) -> Tensor:
    """Greedy captions (B, T) of features (B, P, C): eval mode (no dropout), mean gates, no
    gradient; the model's mode is restored afterwards. Same words as
    :func:`bbservice.decoding.greedy` over :class:`~bbservice.models.caption.TorchCaptionStepper`.
    """
    was_training = model.training
    model.eval()
    try:
        length = max_length or model.config.max_length
        return _decode(model, features, length, "mean", greedy=True, generator=None).tokens
    finally:
        model.train(was_training)


def captions_text(tokens: Tensor, itos: Sequence[str]) -> list[str]:
    """Rows of word ids (N, T) → captions: words up to the first ``<end>``, joined by spaces
    (``<pad>``/``<start>`` dropped)."""
    out = []
    for row in tokens.tolist():
        words = []
        for t in row:
            if t == END_ID:
                break
            if t not in (PAD_ID, START_ID):
                words.append(itos[t])
        out.append(" ".join(words))
    return out


def mean_of_others(rewards: np.ndarray) -> np.ndarray:
    """Leave-one-out baseline: ``rewards`` (B, K) → (B, K) with entry (b, k) the mean of image
    b's other K − 1 rewards (K ≥ 2)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ConfigError(f"mean_of_others needs rewards (B, K >= 2), got {rewards.shape}")
    K = rewards.shape[1]
    return (rewards.sum(axis=1, keepdims=True) - rewards) / (K - 1)


def scst_loss(log_probs: Tensor, mask: Tensor, advantages: Tensor) -> Tensor:
    """``− Σ_n a_n Σ_t mask·log p / Σ mask``: log_probs, mask (N, T), advantages (N,)."""
    weighted = log_probs * mask * advantages.to(log_probs.dtype).unsqueeze(1)
    return -weighted.sum() / mask.sum().clamp_min(1.0)


def scst_step(
    model: CaptionModel,
    batch: SCSTBatch,
    scorer: CiderD,
    itos: Sequence[str],
    config: SCSTConfig = SCSTConfig(),
    *,
    generator: torch.Generator | None = None,
) -> SCSTResult:
    """The SCST loss of one batch and its statistics (see the module docstring).

    Parameters
    ----------
    model : the (unwrapped) caption model, in training mode.
    batch : images (B, 3, S, S) or cached features (B, P, C), and per-image references.
    scorer : CIDEr-D with the training set's document frequencies.
    itos : the vocabulary's words by id.
    config : baseline, K, gate sampling, max length.
    generator : torch RNG for the word (and gate) draws, on the model's device.

    Returns
    -------
    SCSTResult: ``loss`` (scalar, differentiable) and ``stats``: ``reward`` (mean sample
    reward), ``baseline`` (mean baseline), ``greedy_reward`` (with the greedy baseline),
    ``advantage_std``, ``sample_words`` (mean words per sample), ``samples`` (N).
    """
    K = config.samples
    B = batch.inputs.shape[0]
    features = _features(model, batch.inputs)  # (B, P, C)
    sampled = sample_captions(
        model,
        features,
        K,
        max_length=config.max_length,
        sample_gates=config.sample_gates,
        generator=generator,
    )
    texts = captions_text(sampled.tokens, itos)
    refs = [refs for refs in batch.references for _ in range(K)]
    rewards = scorer.score(texts, refs).reshape(B, K)
    stats: dict[str, float] = {}
    if config.baseline == "greedy":
        greedy = greedy_captions(model, features.detach(), max_length=config.max_length)
        greedy_rewards = scorer.score(captions_text(greedy, itos), batch.references)
        baseline = np.repeat(greedy_rewards[:, None], K, axis=1)
        stats["greedy_reward"] = float(greedy_rewards.mean())
    else:
        baseline = mean_of_others(rewards)
    advantages = torch.as_tensor(
        (rewards - baseline).reshape(-1), dtype=torch.float32, device=sampled.log_probs.device
    )
    loss = scst_loss(sampled.log_probs, sampled.mask, advantages)
    words = sampled.mask.sum(dim=1) - (sampled.tokens == END_ID).to(sampled.mask.dtype).sum(dim=1)
    stats.update(
        reward=float(rewards.mean()),
        baseline=float(baseline.mean()),
        advantage_std=float((rewards - baseline).std()),
        sample_words=float(words.float().mean()),
        samples=float(B * K),
    )
    return SCSTResult(loss, stats)


def average_gradients(module: torch.nn.Module) -> None:
    """Average the gradients of ``module``'s parameters over the ranks of the initialised
    default process group (a no-op in a single process). For the SCST phase, which runs on
    the plain model rather than through the DDP wrapper."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for p in module.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad.div_(world)
