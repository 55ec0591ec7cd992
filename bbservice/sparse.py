"""Structured sparsification of gated LSTMs (GATES.md, "Structured sparsification of gates").

Sparse variational dropout (Molchanov et al. 2017; for gated RNNs Lobacheva et al. 2018) with a
log-uniform prior and a Gaussian posterior ``N(θ, σ²)`` per multiplicative variable, on three
levels of every layer of a :class:`SparseGatedLSTM`::

    z = ((x ⊙ ẑˣ) Ŵᵀ + (h ⊙ ẑʰ) Ûᵀ) ⊙ ẑᶻ + b

* single weights: ``Ŵ`` ``(kH, D)`` and ``Û`` ``(kH, H)`` (θ are ``weight_ih`` / ``weight_hh``);
* neurons: ``ẑˣ`` ``(D,)`` per input feature and ``ẑʰ`` ``(H,)`` per hidden unit (on h_{t−1});
* gate pre-activations: ``ẑᶻ`` ``(kH,)``, one per unit per block, applied before the bias.

``log α = log σ² − log θ²`` clipped to [−8, 8]; a variable is pruned where ``log α > 3``. The
KL to the log-uniform prior uses Molchanov et al.'s approximation
``−(k1·σ(k2 + k3·log α) − 0.5·log1p(e^{−log α}) − k1)``.

Training (``model.train()``): the group variables get one noise draw per sequence (shared over
time, as Lobacheva et al.), the input weights the local reparameterization trick (a Gaussian
pre-activation per step and sequence), the recurrent weights one draw per mini-batch (the same
matrix at every step). Evaluation: the means θ with pruned entries zeroed, folded into
effective dense weights, so the rest of :class:`~bbservice.cells.GatedLSTMCell` (and the ONNX
graph of an unpruned export) runs unchanged.

:class:`SparseNeurons` puts the same kind of variable on any layer's inputs (the music model's
read-out, so that top-layer units can die too). Step-by-step callers (the caption decoder,
which projects its input every step) wrap a sequence in :meth:`SparseGatedLSTMCell.sequence_noise`
so the per-sequence noise is drawn once.

A pruned pre-activation variable makes its row of z the constant ``b``: the gate of that unit is
``σ(b)`` (``tanh(b)`` for g; for the Beta families the block's α is ``softplus(b) + eps``) for
every input. :mod:`bbservice.pruning` turns a trained model into the equivalent smaller dense
one that is exported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bbservice.cells import (
    GatedLSTM,
    GatedLSTMCell,
    _can_pack,
    _packed_matmul,
    _plain_matmul,
)
from bbservice.errors import ConfigError
from bbservice.gates import GateConfig, make_gate

K1, K2, K3 = 0.63576, 1.87320, 1.48695


def _tracing() -> bool:
    """Inside torch.compile / torch.export (no caching of tensors there)."""
    compiler = getattr(torch, "compiler", None)
    return bool(
        compiler
        and (
            getattr(compiler, "is_compiling", lambda: False)()
            or getattr(compiler, "is_exporting", lambda: False)()
        )
    )


LOG_ALPHA_CLIP = 8.0
PRUNE_THRESHOLD = 3.0
INIT_LOG_SIGMA2_WEIGHT = -10.0
INIT_LOG_SIGMA2_GROUP = -6.0
LEVELS = ("weight_ih", "weight_hh", "input", "hidden", "preact")

# Gate blocks each of i and f reads (for "which gates became constant").
GATE_DEPENDENCIES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "lstm": ((0,), (1,)),
    "g2": ((0,), (1,)),
    "cifg": ((0,), (0,)),
    "beta": ((0, 1), (2, 3)),
    "bbeta3": ((0, 2), (1, 2)),
    "bbeta5": ((0, 2, 3, 4), (1, 2, 3, 4)),
}


def log_alpha(theta: Tensor, log_sigma2: Tensor) -> Tensor:
    """``log σ² − log θ²`` clipped to ``[−8, 8]`` (elementwise)."""
    return (log_sigma2 - torch.log(theta * theta + 1e-16)).clamp(-LOG_ALPHA_CLIP, LOG_ALPHA_CLIP)


def kl_log_uniform(log_alpha: Tensor) -> Tensor:
    """Elementwise approximate KL(N(θ, αθ²) ‖ log-uniform) (Molchanov et al. 2017); ≥ 0,
    decreasing in ``log α``, → 0 as ``log α`` → ∞."""
    return -(K1 * torch.sigmoid(K2 + K3 * log_alpha) - 0.5 * F.softplus(-log_alpha) - K1)


def keep_mask(log_alpha: Tensor, threshold: float = PRUNE_THRESHOLD) -> Tensor:
    """Bool mask of the entries that survive (``log α <= threshold``)."""
    return log_alpha <= threshold


def block_names(family: str) -> list[str]:
    """Names of the k pre-activation blocks of a family, in order."""
    n = make_gate(GateConfig(family=family)).n_blocks
    if family in ("lstm", "g2", "mlstm"):
        gates = ["i", "f"]
    elif family == "cifg":
        gates = ["i"]
    else:
        gates = [f"a{j + 1}" for j in range(n)]
    return [*gates, "g", "o"]


class SparseGatedLSTMCell(GatedLSTMCell):
    """A :class:`GatedLSTMCell` with sparse variational dropout on weights, neurons and gate
    pre-activations (see the module docstring). Same call and shapes; ``mlstm`` is not
    supported."""

    def __init__(self, input_size, hidden_size, bias=True, gate="lstm", device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, gate, device=device, dtype=dtype)
        if self.multiplicative:
            raise ConfigError("sparse variational dropout does not support the 'mlstm' family")
        kw = {"device": device, "dtype": dtype}
        kh = self.n_blocks * hidden_size
        self.log_sigma2_ih = nn.Parameter(torch.empty(kh, input_size, **kw))
        self.log_sigma2_hh = nn.Parameter(torch.empty(kh, hidden_size, **kw))
        self.theta_x = nn.Parameter(torch.empty(input_size, **kw))
        self.log_sigma2_x = nn.Parameter(torch.empty(input_size, **kw))
        self.theta_h = nn.Parameter(torch.empty(hidden_size, **kw))
        self.log_sigma2_h = nn.Parameter(torch.empty(hidden_size, **kw))
        self.theta_z = nn.Parameter(torch.empty(kh, **kw))
        self.log_sigma2_z = nn.Parameter(torch.empty(kh, **kw))
        self.sparse_noise = True  # multiplicative noise in training mode
        self.threshold = PRUNE_THRESHOLD
        self._seq_noise: dict[str, Tensor] | None = None
        self._pinned_noise: dict[str, Tensor] | None = None
        self._effective_cache: tuple | None = None
        self.reset_sparse_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "theta_z"):
            self.reset_sparse_parameters()

    @torch.no_grad()
    def reset_sparse_parameters(self) -> None:
        """θ = 1 for the group variables; log σ² = −10 (weights), −6 (groups)."""
        self.log_sigma2_ih.fill_(INIT_LOG_SIGMA2_WEIGHT)
        self.log_sigma2_hh.fill_(INIT_LOG_SIGMA2_WEIGHT)
        for theta, ls2 in self._groups().values():
            theta.fill_(1.0)
            ls2.fill_(INIT_LOG_SIGMA2_GROUP)

    def _groups(self) -> dict[str, tuple[Tensor, Tensor]]:
        return {
            "input": (self.theta_x, self.log_sigma2_x),
            "hidden": (self.theta_h, self.log_sigma2_h),
            "preact": (self.theta_z, self.log_sigma2_z),
        }

    # -- variational quantities ------------------------------------------------------------

    def log_alphas(self) -> dict[str, Tensor]:
        """Clipped log α of every variable, by level (:data:`LEVELS`)."""
        out = {
            "weight_ih": log_alpha(self.weight_ih, self.log_sigma2_ih),
            "weight_hh": log_alpha(self.weight_hh, self.log_sigma2_hh),
        }
        out.update({k: log_alpha(t, s) for k, (t, s) in self._groups().items()})
        return out

    def kl(self) -> Tensor:
        """Summed approximate KL of all the variables of this cell (a scalar)."""
        return sum(kl_log_uniform(la).sum() for la in self.log_alphas().values())

    def masks(self) -> dict[str, Tensor]:
        """Bool keep-masks by level (``log α <= threshold``)."""
        return {k: keep_mask(v, self.threshold) for k, v in self.log_alphas().items()}

    def effective_weights(self) -> tuple[Tensor, Tensor]:
        """``(W_eff (kH, D), U_eff (kH, H))``: means with pruned entries zeroed, the neuron and
        pre-activation variables folded in, so ``z = x W_effᵀ + h U_effᵀ + b``.

        Without autograd in eval mode (decoding step by step) they are computed once and kept
        until a parameter changes (in place, by a new load, or by moving device)."""
        if self.training or torch.is_grad_enabled() or _tracing():
            return self._compute_effective_weights()
        key = tuple((p.data_ptr(), p._version) for p in self.parameters())
        if self._effective_cache is None or self._effective_cache[0] != key:
            self._effective_cache = (key, self._compute_effective_weights())
        return self._effective_cache[1]

    def _compute_effective_weights(self) -> tuple[Tensor, Tensor]:
        m = self.masks()
        zx = self.theta_x * m["input"]
        zh = self.theta_h * m["hidden"]
        zz = (self.theta_z * m["preact"]).unsqueeze(1)
        w = self.weight_ih * m["weight_ih"] * zx * zz
        u = self.weight_hh * m["weight_hh"] * zh * zz
        return w, u

    @torch.no_grad()
    def sparsity(self) -> dict[str, float]:
        """Fraction of pruned variables per level (:data:`LEVELS`)."""
        return {k: 1.0 - float(m.float().mean()) for k, m in self.masks().items()}

    # -- the cell's hooks --------------------------------------------------------------------

    @contextlib.contextmanager
    def sequence_noise(self, batch: int, like: Tensor) -> Iterator[None]:
        """For step-by-step callers (the caption decoder projects its input every step): one
        noise draw for the whole sequence, used by every :meth:`input_projection` and
        :meth:`recurrent_matmuls` inside the block. Nothing is drawn outside training."""
        if not self._noisy():
            yield
            return
        self._pinned_noise = self._draw_noise(batch, like)
        try:
            yield
        finally:
            self._pinned_noise = self._seq_noise = None

    def _noisy(self) -> bool:
        return self.training and self.sparse_noise

    def _draw_noise(self, batch: int, like: Tensor) -> dict[str, Tensor]:
        def draw(theta, ls2, shape):
            eps = torch.randn(shape, device=like.device, dtype=theta.dtype)
            return theta + torch.exp(0.5 * ls2) * eps

        noise = {
            "x": draw(self.theta_x, self.log_sigma2_x, (batch, self.input_size)),
            "h": draw(self.theta_h, self.log_sigma2_h, (batch, self.hidden_size)),
            "z": draw(self.theta_z, self.log_sigma2_z, (batch, self.theta_z.shape[0])),
            "u": draw(self.weight_hh, self.log_sigma2_hh, self.weight_hh.shape),
        }
        self._seq_noise = noise
        return noise

    def input_projection(self, x: Tensor, *, pack: bool = False) -> Tensor:
        del pack  # the effective weights change with the noise: never pre-packed
        if x.shape[-1] != self.input_size:
            raise ConfigError(
                f"input has {x.shape[-1]} features but the cell expects input_size="
                f"{self.input_size}"
            )
        if not self._noisy():
            w, _ = self.effective_weights()
            return F.linear(x, w, self.bias)
        batch = x.shape[-2] if x.dim() >= 2 else 1
        noise = self._pinned_noise
        if noise is None or noise["x"].shape[0] != batch:
            # a new sequence (or step batch) starts here: per-sequence noise for the groups
            noise = self._draw_noise(batch, x)
        xs = x * noise["x"].to(x.dtype)
        mean = F.linear(xs, self.weight_ih)
        var = F.linear(xs * xs, torch.exp(self.log_sigma2_ih))
        xp = mean + torch.sqrt(var + 1e-8) * torch.randn_like(mean)
        xp = xp * noise["z"].to(xp.dtype)
        return xp + self.bias if self.bias is not None else xp

    def recurrent_matmuls(self, batch: int):
        if not self._noisy():
            _, u = self.effective_weights()
            if _can_pack(u, batch):
                try:
                    return _packed_matmul(u, batch), None
                except (RuntimeError, AttributeError):
                    pass
            return _plain_matmul(u), None
        noise = self._pinned_noise if self._pinned_noise is not None else self._seq_noise
        if noise is None or noise["h"].shape[0] != batch:
            noise = self._draw_noise(batch, self.weight_hh)
        if self._pinned_noise is None:
            self._seq_noise = None  # consumed (and no autograd tensors left on the module)
        zh, zz, u = noise["h"], noise["z"], noise["u"]

        def mm(add: Tensor | None, h: Tensor) -> Tensor:
            r = torch.mm(h * zh.to(h.dtype), u.t().to(h.dtype)) * zz.to(h.dtype)
            return r if add is None else add + r

        return mm, None

    def gate_preactivation(self, xp: Tensor, h: Tensor) -> Tensor:
        mm, _ = self.recurrent_matmuls(h.shape[0])
        return mm(xp, h)[:, : self.gate.n_blocks * self.hidden_size]


class SparseGatedLSTM(GatedLSTM):
    """:class:`GatedLSTM` whose layers are :class:`SparseGatedLSTMCell`; same call and shapes.

    :meth:`kl` (summed approximate KL, unweighted), :meth:`log_alphas` and :meth:`masks` (one
    dict per layer), :meth:`sparsity` (fraction of pruned variables per level).
    """

    cell_class = SparseGatedLSTMCell

    @classmethod
    def from_dense(cls, rnn: GatedLSTM) -> SparseGatedLSTM:
        """A sparse copy of a dense :class:`GatedLSTM` (θ = its weights, groups at 1)."""
        out = cls(
            rnn.input_size,
            rnn.hidden_size,
            rnn.num_layers,
            rnn.cells[0].has_bias,
            rnn.batch_first,
            rnn.dropout,
            rnn.config,
        )
        out.load_state_dict(rnn.state_dict(), strict=False)
        return out

    def kl(self) -> Tensor:
        return sum(cell.kl() for cell in self.cells)

    def log_alphas(self) -> list[dict[str, Tensor]]:
        return [cell.log_alphas() for cell in self.cells]

    def masks(self) -> list[dict[str, Tensor]]:
        return [cell.masks() for cell in self.cells]

    @torch.no_grad()
    def sparsity(self) -> dict[str, float]:
        """Fraction of pruned variables per level, over all layers."""
        masks = self.masks()
        return {
            k: 1.0 - sum(float(m[k].sum()) for m in masks) / sum(m[k].numel() for m in masks)
            for k in LEVELS
        }


class SparseNeurons(nn.Module):
    """Sparse variational dropout on the features of an input ``(..., N)`` (the read-out's
    input: the top layer's h): ``x ⊙ ẑ``, one variable per feature. Training: one draw per row
    of the batch, shared over time; evaluation: ``θ`` with pruned features zeroed. A pruned
    feature lets the unit that produces it die when nothing else reads it."""

    def __init__(self, features: int, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.theta = nn.Parameter(torch.ones(features, **kw))
        self.log_sigma2 = nn.Parameter(torch.full((features,), INIT_LOG_SIGMA2_GROUP, **kw))
        self.threshold = PRUNE_THRESHOLD

    def log_alpha(self) -> Tensor:
        return log_alpha(self.theta, self.log_sigma2)

    def mask(self) -> Tensor:
        """Bool ``(N,)``: the features that survive."""
        return keep_mask(self.log_alpha(), self.threshold)

    def effective(self) -> Tensor:
        """``(N,)``: θ with pruned features zeroed (the evaluation-time multiplier)."""
        return self.theta * self.mask()

    def kl(self) -> Tensor:
        return kl_log_uniform(self.log_alpha()).sum()

    @torch.no_grad()
    def sparsity(self) -> float:
        return 1.0 - float(self.mask().float().mean())

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(B, N)`` or ``(B, T, N)`` → the same shape."""
        if not self.training:
            return x * self.effective().to(x.dtype)
        eps = torch.randn(x.shape[0], self.theta.shape[0], device=x.device, dtype=self.theta.dtype)
        z = self.theta + torch.exp(0.5 * self.log_sigma2) * eps  # (B, N)
        if x.dim() == 3:
            z = z.unsqueeze(1)
        return x * z.to(x.dtype)


__all__ = [
    "SparseGatedLSTM",
    "SparseGatedLSTMCell",
    "SparseNeurons",
    "block_names",
    "keep_mask",
    "kl_log_uniform",
    "log_alpha",
]
