"""Gate families of ``shared/docs/GATES.md``: how the input gate i and forget gate f are made.

Every family reads the gate blocks ``z_gate`` of the fused pre-activation (shape ``(B, n·H)``,
``n`` = :attr:`Gate.n_blocks`) and returns ``(i, f, alpha)``: the two gates, each ``(B, H)``,
and the Gamma concentrations ``alpha`` ``(B, n·H)`` for the Beta families (``None`` otherwise).

Two modes:

* ``"mean"``: deterministic gates (the exact means of the gate laws); this graph goes to ONNX.
* ``"sample"``: stochastic gates. Beta families draw Gammas in log space (no 0/0 underflow);
  ``g2`` adds masked logistic noise.

Noise for a whole sequence is drawn up front by :meth:`Gate.draw_noise` (one RNG call per
kind of noise, not per step); :meth:`Gate.sample` takes one step of it, which also lets a
test pass fixed noise in and ``gradcheck`` the sampled path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from bbservice.errors import ConfigError

GATE_FAMILIES = ("lstm", "cifg", "g2", "beta", "bbeta3", "bbeta5", "mlstm")
GATE_MODES = ("sample", "mean")
GAMMA_SAMPLERS = ("marsaglia", "implicit")
BETA_FAMILIES = ("beta", "bbeta3", "bbeta5")


@dataclass(frozen=True)
class GateConfig:
    """Which gate family and its hyper-parameters.

    Parameters
    ----------
    family : one of :data:`GATE_FAMILIES`.
    alpha_eps : floor added to ``softplus(z)`` to make each Gamma concentration.
    gamma_sampler : ``"marsaglia"`` (reparameterized Marsaglia–Tsang rejection sampler, fast,
        drops the small acceptance-correction term of the gradient) or ``"implicit"``
        (torch's Gamma sampler with exact implicit gradients, several times slower).
    reference_sample_eps : reproduce the reference code: draw ``G ~ Gamma(alpha)`` directly,
        add ``1e-3`` to every sample and form gates as ratios (biased towards 0.5 for small
        alpha). Only for reproduction runs.
    g2_tau, g2_noise_prob : temperature τ and the Bernoulli probability p of the G2 noise mask.
    kl_weight : λ of the Gamma prior KL (Beta families only); 0 disables it.
    kl_alpha0 : α0 of the prior Gamma(α0, 1); 0.5 makes each gate's prior marginal uniform.
    forget_bias : added to the forget-gate bias at initialisation (``None``: the family's
        default, 1.0 for ``mlstm`` and 0 otherwise). Ignored by the Beta families and ``cifg``.
    """

    family: str = "lstm"
    alpha_eps: float = 1e-3
    gamma_sampler: str = "marsaglia"
    reference_sample_eps: bool = False
    g2_tau: float = 0.9
    g2_noise_prob: float = 0.2
    kl_weight: float = 0.0
    kl_alpha0: float = 0.5
    forget_bias: float | None = None

    def __post_init__(self) -> None:
        if self.family not in GATE_FAMILIES:
            raise ConfigError(
                f"unknown gate family {self.family!r}; choose one of {', '.join(GATE_FAMILIES)}"
            )
        if self.gamma_sampler not in GAMMA_SAMPLERS:
            raise ConfigError(
                f"unknown gamma_sampler {self.gamma_sampler!r}; choose one of {GAMMA_SAMPLERS}"
            )
        if self.alpha_eps <= 0:
            raise ConfigError(f"alpha_eps must be > 0, got {self.alpha_eps}")
        if self.g2_tau <= 0:
            raise ConfigError(f"g2_tau must be > 0, got {self.g2_tau}")
        if not 0.0 <= self.g2_noise_prob <= 1.0:
            raise ConfigError(f"g2_noise_prob must be in [0, 1], got {self.g2_noise_prob}")
        if self.kl_weight < 0:
            raise ConfigError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.kl_weight > 0 and self.family not in BETA_FAMILIES:
            raise ConfigError(
                f"kl_weight > 0 needs a Beta gate family {BETA_FAMILIES}, not {self.family!r}"
            )
        if self.kl_alpha0 <= 0:
            raise ConfigError(f"kl_alpha0 must be > 0, got {self.kl_alpha0}")

    @classmethod
    def of(cls, gate: str | GateConfig, **overrides: object) -> GateConfig:
        """A config from a family name or an existing config, with fields overridden."""
        base = gate if isinstance(gate, GateConfig) else cls(family=str(gate))
        return replace(base, **overrides) if overrides else base


class GateOutput(NamedTuple):
    """Gates of one step: ``i``, ``f`` ``(B, H)``; ``alpha`` ``(B, n·H)`` or ``None``."""

    i: Tensor
    f: Tensor
    alpha: Tensor | None


class NonFiniteAlphaError(FloatingPointError):
    """A Gamma concentration α is NaN or infinite: the run has diverged (or overflowed in
    half precision). Raised by every sampler instead of looping forever."""

    def __init__(self, where: str, family: str) -> None:
        super().__init__(
            f"{where}: non-finite Gamma concentration alpha (NaN or inf) in the {family!r} "
            "gates; the run has diverged (lower the learning rate, clip gradients, or keep the "
            "gate math in float32)"
        )


def resolve_gate_mode(mode: str | None, training: bool) -> str:
    """``None`` → ``"sample"`` in training and ``"mean"`` in eval; otherwise validated."""
    if mode is None:
        return "sample" if training else "mean"
    if mode not in GATE_MODES:
        raise ConfigError(f"unknown gate mode {mode!r}; choose 'sample' or 'mean'")
    return mode


# --------------------------------------------------------------------------------------------
# Gamma sampling in log space
# --------------------------------------------------------------------------------------------


def _fast_cpu_path(x: Tensor) -> bool:
    """Whether to use the cheaper formulations below (CPU eager, not while exporting)."""
    return x.is_cpu and not torch.onnx.is_in_onnx_export() and not torch.compiler.is_compiling()


def softplus(z: Tensor) -> Tensor:
    """``log(1 + e^z)``; on the CPU as ``relu(z) − log σ(|z|)``, several times faster there
    than ``F.softplus`` in this torch build (``bench/bench_ops.py``), exact to ~1e-7."""
    if _fast_cpu_path(z):
        return torch.relu(z) - torch.log(torch.sigmoid(z.abs()))
    return F.softplus(z)


def tanh(x: Tensor) -> Tensor:
    """``tanh``; on the CPU as ``2σ(2x) − 1`` (vectorised sigmoid is cheaper there)."""
    if _fast_cpu_path(x):
        return 2.0 * torch.sigmoid(2.0 * x) - 1.0
    return torch.tanh(x)


def alpha_from_preactivation(z: Tensor, eps: float = 1e-3) -> Tensor:
    """Gamma concentrations ``softplus(z) + eps`` (same shape as ``z``)."""
    return softplus(z) + eps


def ratio_of_exp_sums(num: tuple[Tensor, ...], rest: tuple[Tensor, ...]) -> Tensor:
    """``Σ e^num / (Σ e^num + Σ e^rest)`` for log-values, stable for any magnitudes.

    Equals ``σ(logsumexp(num) − logsumexp(rest))``; shifting by the (detached) maximum makes
    the largest term 1, so the denominator never underflows and no division is 0/0.
    """
    m = num[0]
    for t in (*num[1:], *rest):
        m = torch.maximum(m, t)
    m = m.detach()
    top = sum(torch.exp(t - m) for t in num)
    return top / (top + sum(torch.exp(t - m) for t in rest))


def _marsaglia_accept(d: Tensor, c: Tensor, eps: Tensor, log_u: Tensor) -> Tensor:
    """Marsaglia–Tsang acceptance of candidates ``eps`` for Gamma(d + 1/3, 1) (bool, same shape)."""
    t = 1.0 + c * eps
    log_t = torch.log(t.clamp_min(1e-30))
    return (t > 0) & (log_u < 0.5 * eps * eps + d - d * t * t * t + 3.0 * d * log_t)


def log_gamma_marsaglia(alpha: Tensor, eps: Tensor, log_u_boost: Tensor) -> Tensor:
    """log G with G ~ Gamma(alpha, 1), from *accepted* Marsaglia–Tsang noise (differentiable).

    ``log V = log d + 3 log(1 + c·eps)`` is a Gamma(alpha + 1) draw (d = alpha + 2/3,
    c = 1/sqrt(9d)), and ``log G = log V + log(U)/alpha`` boosts it down to shape alpha.
    Gradients flow through ``alpha`` only (the Naesseth et al. reparameterization without
    its acceptance-correction term). All tensors share one shape.
    """
    d = alpha + (2.0 / 3.0)
    c = torch.rsqrt(9.0 * d)
    return torch.log(d) + 3.0 * torch.log1p(c * eps) + log_u_boost / alpha


MAX_REDRAW_ROUNDS = 200  # P(an entry is rejected 200 times) < 0.05**200: only a bug gets here


def accept_marsaglia_noise(
    alpha: Tensor,
    eps: Tensor,
    log_u_accept: Tensor,
    generator: torch.Generator | None = None,
    where: str = "gate",
    family: str = "beta",
) -> Tensor:
    """Return ``eps`` with every rejected candidate redrawn until accepted (no gradient).

    Acceptance is above 95% for shapes >= 1, so the redraw loop runs on a shrinking handful of
    entries. ``alpha``, ``eps``, ``log_u_accept``: same shape. A non-finite ``alpha`` (never
    accepted) raises :class:`NonFiniteAlphaError` naming ``where`` instead of looping forever.
    """
    with torch.no_grad():
        d = alpha.detach() + (2.0 / 3.0)
        c = torch.rsqrt(9.0 * d)
        ok = _marsaglia_accept(d, c, eps, log_u_accept)
        if bool(ok.all()):
            return eps
        if not bool(torch.isfinite(d).all()):
            raise NonFiniteAlphaError(where, family)
        eps = eps.clone()
        flat_eps, flat_d, flat_c = eps.view(-1), d.reshape(-1), c.reshape(-1)
        idx = (~ok).reshape(-1).nonzero().squeeze(1)
        for _ in range(MAX_REDRAW_ROUNDS):
            if idx.numel() == 0:
                return eps
            cand = torch.randn(idx.numel(), generator=generator, device=eps.device, dtype=eps.dtype)
            u = torch.rand(idx.numel(), generator=generator, device=eps.device, dtype=eps.dtype)
            acc = _marsaglia_accept(flat_d[idx], flat_c[idx], cand, torch.log(u))
            flat_eps[idx[acc]] = cand[acc]
            idx = idx[~acc]
        if idx.numel() > 0:
            raise RuntimeError(
                f"{where}: Marsaglia sampler rejected {idx.numel()} entries "
                f"{MAX_REDRAW_ROUNDS} times"
            )
        return eps


def log_gamma_implicit(alpha: Tensor, log_u_boost: Tensor, generator=None) -> Tensor:
    """log G, G ~ Gamma(alpha, 1), via torch's sampler for Gamma(alpha+1) (implicit gradient)."""
    return torch.log(torch._standard_gamma(alpha + 1.0, generator=generator)) + log_u_boost / alpha


def gamma_kl(alpha: Tensor, alpha0: float) -> Tensor:
    """Elementwise KL(Gamma(alpha, 1) ‖ Gamma(alpha0, 1)) = (α−α0)ψ(α) − lnΓ(α) + lnΓ(α0)."""
    return (alpha - alpha0) * torch.digamma(alpha) - torch.lgamma(alpha) + math.lgamma(alpha0)


# --------------------------------------------------------------------------------------------
# The families
# --------------------------------------------------------------------------------------------


class Gate:
    """Base: a family that turns gate pre-activations into (i, f).

    Subclasses set :attr:`n_blocks` (how many H-wide blocks of the pre-activation they read)
    and implement :meth:`mean` and, if stochastic, :meth:`sample` / :meth:`draw_noise`.
    """

    n_blocks: int = 2
    stochastic: bool = False

    def __init__(self, config: GateConfig) -> None:
        self.config = config
        self.where = "gate"  # names the layer in errors; the cells set it

    def mean(self, z: Tensor) -> GateOutput:
        """Deterministic gates from ``z`` ``(B, n·H)``."""
        raise NotImplementedError

    def sample(self, z: Tensor, noise: object, generator=None) -> GateOutput:
        """Stochastic gates from ``z`` ``(B, n·H)`` and one step of :meth:`draw_noise`.

        ``generator`` serves any extra draws (Marsaglia redraws, torch's Gamma sampler)."""
        return self.mean(z)

    def draw_noise(self, steps: int, batch: int, hidden: int, like: Tensor, generator=None):
        """Noise for ``steps`` steps (a sequence indexable by step), or ``None``."""
        return None

    def __call__(self, z: Tensor, mode: str, noise: object = None, generator=None) -> GateOutput:
        if mode == "mean" or not self.stochastic:
            return self.mean(z)
        if noise is None:
            hidden = z.shape[1] // self.n_blocks
            noise = self.draw_noise(1, z.shape[0], hidden, z, generator)[0]
        return self.sample(z, noise, generator)

    def kl(self, alpha: Tensor) -> Tensor:
        """Per-row prior KL summed over units and Gammas: ``(B,)``. Beta families only."""
        raise ConfigError(f"gate family {self.config.family!r} has no Gamma prior")

    def statistics(self, z: Tensor, out: GateOutput) -> dict[str, Tensor]:
        """Per-unit statistics of one step for logging: each ``(B, H)``."""
        mean = self.mean(z) if self.stochastic else out
        return {"i": out.i, "f": out.f, "i_mean": mean.i, "f_mean": mean.f}


class SigmoidGate(Gate):
    """``lstm`` and ``mlstm``: i = σ(z_i), f = σ(z_f)."""

    def mean(self, z: Tensor) -> GateOutput:
        i, f = torch.sigmoid(z).chunk(2, dim=1)
        return GateOutput(i, f, None)


class CoupledGate(Gate):
    """``cifg``: i = σ(z_i), f = 1 − i (one block)."""

    n_blocks = 1

    def mean(self, z: Tensor) -> GateOutput:
        i = torch.sigmoid(z)
        return GateOutput(i, 1.0 - i, None)


class GumbelGate(Gate):
    """``g2``: σ((z + B⊙L)/τ) with logistic L and Bernoulli(p) mask B; mean σ(z/τ)."""

    stochastic = True

    def mean(self, z: Tensor) -> GateOutput:
        i, f = torch.sigmoid(z / self.config.g2_tau).chunk(2, dim=1)
        return GateOutput(i, f, None)

    def sample(self, z: Tensor, noise: Tensor, generator=None) -> GateOutput:
        i, f = torch.sigmoid((z + noise) / self.config.g2_tau).chunk(2, dim=1)
        return GateOutput(i, f, None)

    def draw_noise(self, steps, batch, hidden, like, generator=None) -> Tensor:
        shape = (steps, batch, 2 * hidden)
        u = torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)
        u = u.clamp(1e-6, 1.0 - 1e-6)
        logistic = torch.log(u) - torch.log1p(-u)
        p = self.config.g2_noise_prob
        if p >= 1.0:
            return logistic
        keep = torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype) < p
        return logistic * keep


class BetaGateBase(Gate):
    """Shared machinery of the Beta families: concentrations, log-Gamma draws, KL, statistics.

    Subclasses give :meth:`from_alpha` (mean gates from the Gamma concentrations),
    :meth:`from_log_gamma` (sampled gates from log-Gamma draws) and :meth:`from_gamma`
    (sampled gates as ratios of raw Gamma draws, for the reference-code mode).
    """

    stochastic = True

    def alphas(self, z: Tensor) -> Tensor:
        return alpha_from_preactivation(z, self.config.alpha_eps)

    def mean(self, z: Tensor) -> GateOutput:
        alpha = self.alphas(z)
        i, f = self.from_alpha(alpha.chunk(self.n_blocks, dim=1))
        return GateOutput(i, f, alpha)

    def sample(self, z: Tensor, noise: tuple[Tensor, ...], generator=None) -> GateOutput:
        alpha = self.alphas(z)
        if self.config.reference_sample_eps or self.config.gamma_sampler != "marsaglia":
            # torch's Gamma sampler returns NaN on a NaN alpha: fail as loudly as Marsaglia
            if not bool(torch.isfinite(alpha).all()):
                raise NonFiniteAlphaError(self.where, self.config.family)
        if self.config.reference_sample_eps:
            g = torch._standard_gamma(alpha, generator=generator) + 1e-3
            i, f = self.from_gamma(g.chunk(self.n_blocks, dim=1))
            return GateOutput(i, f, alpha)
        if self.config.gamma_sampler == "marsaglia":
            eps, log_u_accept, log_u_boost = noise
            eps = accept_marsaglia_noise(
                alpha, eps, log_u_accept, generator, self.where, self.config.family
            )
            log_g = log_gamma_marsaglia(alpha, eps, log_u_boost)
        else:
            (log_u_boost,) = noise
            log_g = log_gamma_implicit(alpha, log_u_boost, generator)
        i, f = self.from_log_gamma(log_g.chunk(self.n_blocks, dim=1))
        return GateOutput(i, f, alpha)

    def draw_noise(self, steps, batch, hidden, like, generator=None):
        if self.config.reference_sample_eps:
            return [()] * steps
        shape = (steps, batch, self.n_blocks * hidden)
        kw = {"generator": generator, "device": like.device, "dtype": like.dtype}
        log_u_boost = torch.log(torch.rand(shape, **kw).clamp_min(1e-30))
        if self.config.gamma_sampler == "implicit":
            return [(b,) for b in log_u_boost.unbind(0)]
        eps = torch.randn(shape, **kw)
        log_u_accept = torch.log(torch.rand(shape, **kw))
        return list(zip(eps.unbind(0), log_u_accept.unbind(0), log_u_boost.unbind(0), strict=True))

    def kl(self, alpha: Tensor) -> Tensor:
        return gamma_kl(alpha, self.config.kl_alpha0).sum(dim=1)

    def marginals(self, alpha: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """Beta(a, b) parameters of the i and f marginals, each ``(B, H)``."""
        raise NotImplementedError

    def statistics(self, z: Tensor, out: GateOutput) -> dict[str, Tensor]:
        (ia, ib), (fa, fb) = self.marginals(out.alpha)
        return {
            "i": out.i,
            "f": out.f,
            "i_mean": ia / (ia + ib),
            "f_mean": fa / (fa + fb),
            "i_concentration": ia + ib,
            "f_concentration": fa + fb,
        }

    def from_alpha(self, a: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def from_log_gamma(self, lg: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def from_gamma(self, g: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class IndependentBetaGate(BetaGateBase):
    """``beta``: i = G1/(G1+G2), f = G3/(G3+G4); i ~ Beta(α1, α2), f ~ Beta(α3, α4)."""

    n_blocks = 4

    def from_alpha(self, a):
        return a[0] / (a[0] + a[1]), a[2] / (a[2] + a[3])

    def from_log_gamma(self, lg):
        return torch.sigmoid(lg[0] - lg[1]), torch.sigmoid(lg[2] - lg[3])

    def from_gamma(self, g):
        return g[0] / (g[0] + g[1]), g[2] / (g[2] + g[3])

    def marginals(self, alpha):
        a = alpha.chunk(4, dim=1)
        return (a[0], a[1]), (a[2], a[3])


class BivariateBeta3Gate(BetaGateBase):
    """``bbeta3``: i = G1/(G1+G3), f = G2/(G2+G3) (shared G3: positive correlation)."""

    n_blocks = 3

    def from_alpha(self, a):
        return a[0] / (a[0] + a[2]), a[1] / (a[1] + a[2])

    def from_log_gamma(self, lg):
        return torch.sigmoid(lg[0] - lg[2]), torch.sigmoid(lg[1] - lg[2])

    def from_gamma(self, g):
        return g[0] / (g[0] + g[2]), g[1] / (g[1] + g[2])

    def marginals(self, alpha):
        a = alpha.chunk(3, dim=1)
        return (a[0], a[2]), (a[1], a[2])


class BivariateBeta5Gate(BetaGateBase):
    """``bbeta5``: i = (G1+G3)/(G1+G3+G4+G5), f = (G2+G4)/(G2+G3+G4+G5) (either sign)."""

    n_blocks = 5

    def from_alpha(self, a):
        a13, a45, a24, a35 = a[0] + a[2], a[3] + a[4], a[1] + a[3], a[2] + a[4]
        return a13 / (a13 + a45), a24 / (a24 + a35)

    def from_log_gamma(self, lg):
        i = ratio_of_exp_sums((lg[0], lg[2]), (lg[3], lg[4]))
        f = ratio_of_exp_sums((lg[1], lg[3]), (lg[2], lg[4]))
        return i, f

    def from_gamma(self, g):
        g13, g45, g24, g35 = g[0] + g[2], g[3] + g[4], g[1] + g[3], g[2] + g[4]
        return g13 / (g13 + g45), g24 / (g24 + g35)

    def marginals(self, alpha):
        a = alpha.chunk(5, dim=1)
        return (a[0] + a[2], a[3] + a[4]), (a[1] + a[3], a[2] + a[4])


_FAMILY_CLASSES: dict[str, type[Gate]] = {
    "lstm": SigmoidGate,
    "mlstm": SigmoidGate,
    "cifg": CoupledGate,
    "g2": GumbelGate,
    "beta": IndependentBetaGate,
    "bbeta3": BivariateBeta3Gate,
    "bbeta5": BivariateBeta5Gate,
}


def make_gate(config: GateConfig) -> Gate:
    """The :class:`Gate` object of a config's family."""
    return _FAMILY_CLASSES[config.family](config)


def gate_blocks(family: str) -> int:
    """Number of H-wide pre-activation blocks k of a family (gate blocks + g + o)."""
    if family not in _FAMILY_CLASSES:
        raise ConfigError(f"unknown gate family {family!r}; choose one of {GATE_FAMILIES}")
    return _FAMILY_CLASSES[family].n_blocks + 2
