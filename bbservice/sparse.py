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

A pruned pre-activation variable makes its row of z the constant ``b``: the gate of that unit is
``σ(b)`` (``tanh(b)`` for g; for the Beta families the block's α is ``softplus(b) + eps``) for
every input. :func:`prune_to_dense` turns a trained model into an equivalent smaller dense one
(constant rows become constants, pruned rows and columns are removed, dead hidden units are
dropped from h and c) and :func:`export_pruned_music` exports that through the usual
:func:`export.onnx_export.export_music`, after checking it against the sparse model.
"""

from __future__ import annotations

import copy
from dataclasses import replace

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
from bbservice.gates import GateConfig, make_gate, tanh

K1, K2, K3 = 0.63576, 1.87320, 1.48695
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
        pre-activation variables folded in, so ``z = x W_effᵀ + h U_effᵀ + b``."""
        m = self.masks()
        zx = self.theta_x * m["input"]
        zh = self.theta_h * m["hidden"]
        zz = (self.theta_z * m["preact"]).unsqueeze(1)
        w = self.weight_ih * m["weight_ih"] * zx * zz
        u = self.weight_hh * m["weight_hh"] * zh * zz
        return w, u

    # -- the cell's hooks --------------------------------------------------------------------

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
        # a new sequence (or step batch) starts here: per-sequence noise for the groups
        batch = x.shape[-2] if x.dim() >= 2 else 1
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
        noise = self._seq_noise
        if noise is None or noise["h"].shape[0] != batch:
            noise = self._draw_noise(batch, self.weight_hh)
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


# --------------------------------------------------------------------------------------------
# Pruning to a smaller dense model
# --------------------------------------------------------------------------------------------


def _optional_index(index: Tensor, size: int) -> Tensor | None:
    return None if index.numel() == size else index


class PrunedCell(nn.Module):
    """A dense cell over the kept units only, with the constant pre-activation rows folded out.

    ``step(x, h, c)``: ``x`` ``(B, D_full)`` (the previous layer's kept units, or the frame),
    ``h``, ``c`` ``(B, H')`` → ``(h, c)`` ``(B, H')``. Active rows of z come from one matrix
    product each over the used input columns / hidden columns; constant rows are the bias.
    """

    def __init__(
        self,
        gate: GateConfig,
        hidden: int,
        w: Tensor,
        u: Tensor,
        b: Tensor,
        active: Tensor,
        in_index: Tensor | None,
        rec_index: Tensor | None,
    ) -> None:
        super().__init__()
        self.config = gate
        self.gate = make_gate(gate)
        self.hidden_size = hidden
        self.n_rows = b.numel()
        act_rows = active.nonzero().squeeze(1)
        const_rows = (~active).nonzero().squeeze(1)
        self.n_active, self.n_const = act_rows.numel(), const_rows.numel()
        self.weight_ih = nn.Parameter(w[act_rows].clone())
        self.weight_hh = nn.Parameter(u[act_rows].clone())
        self.bias = nn.Parameter(b[act_rows].clone())
        self.register_buffer("constants", b[const_rows].clone())
        order = torch.cat([act_rows, const_rows])
        perm = torch.empty_like(order)
        perm[order] = torch.arange(order.numel())
        identity = bool((perm == torch.arange(perm.numel())).all())
        self.register_buffer("perm", None if identity else perm)
        self.register_buffer("in_index", in_index)
        self.register_buffer("rec_index", rec_index)

    def recurrent_matmuls(self, batch: int):  # the TorchMusicStepper interface
        return None

    def preactivation(self, x: Tensor, h: Tensor) -> Tensor:
        """Full ``z`` ``(B, k·H')`` in block order."""
        parts = []
        if self.n_active:
            xi = x if self.in_index is None else x.index_select(1, self.in_index)
            hi = h if self.rec_index is None else h.index_select(1, self.rec_index)
            za = F.linear(xi, self.weight_ih, self.bias)
            if hi.shape[1]:
                za = za + F.linear(hi, self.weight_hh)
            parts.append(za)
        if self.n_const:
            parts.append(self.constants.unsqueeze(0).expand(x.shape[0], -1))
        z = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        return z if self.perm is None else z.index_select(1, self.perm)

    def gates(self, x: Tensor, h: Tensor):
        """Mean gates ``(i, f, alpha)`` of one step (for tests and inspection)."""
        z = self.preactivation(x, h)
        return self.gate.mean(z[:, : self.gate.n_blocks * self.hidden_size])

    def step(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        z = self.preactivation(x, h)
        hs = self.hidden_size
        zgate, zg, zo = z.split([z.shape[1] - 2 * hs, hs, hs], dim=1)
        gates = self.gate.mean(zgate)
        c = gates.f * c + gates.i * tanh(zg)
        h = torch.sigmoid(zo) * tanh(c)
        return h, c


class _PrunedRNN(nn.Module):
    def __init__(self, cells: list[PrunedCell]) -> None:
        super().__init__()
        self.cells = nn.ModuleList(cells)


class PrunedPianoRollModel(nn.Module):
    """The dense equivalent of a pruned sparse :class:`~bbservice.models.music.PianoRollModel`,
    with its ``step`` / ``zero_state`` / ``config`` interface (mean gates only).

    Layers have their own widths ``widths[l]``; the exported state stays ``(L, B, H_max)``:
    layer ``l`` reads and writes its first ``widths[l]`` units, the rest stay zero.
    :attr:`kept_units` maps them back to the sparse model's units.
    """

    def __init__(
        self, config, cells: list[PrunedCell], readout: nn.Linear, kept: list[Tensor], source_hidden
    ):
        super().__init__()
        self.source_hidden = source_hidden
        self.widths = [int(k.numel()) for k in kept]
        self.config = replace(config, hidden_size=max(max(self.widths), 1), sparse=False)
        self.rnn = _PrunedRNN(cells)
        self.readout = readout
        self.kept_units = kept

    def _layers(self, frame: Tensor, h: Tensor, c: Tensor):
        x, hs, cs = frame, [], []
        hmax = self.config.hidden_size
        for layer, cell in enumerate(self.rnn.cells):
            w = self.widths[layer]
            h_l, c_l = cell.step(x, h[layer, :, :w], c[layer, :, :w])
            hs.append(F.pad(h_l, (0, hmax - w)) if w < hmax else h_l)
            cs.append(F.pad(c_l, (0, hmax - w)) if w < hmax else c_l)
            x = h_l
        return x, torch.stack(hs), torch.stack(cs)

    def step(self, frame, h, c, gate_mode: str = "mean", matmuls=None, generator=None):
        """``frame`` ``(B, 88)``, ``h``, ``c`` ``(L, B, H_max)`` → probs, h, c."""
        if gate_mode != "mean":
            raise ConfigError("a pruned dense model has mean gates only")
        top, h, c = self._layers(frame, h, c)
        return torch.sigmoid(self.readout(top)), h, c

    def forward(self, frames: Tensor, lengths=None, state=None, *, gate_mode=None, generator=None):
        """``frames`` ``(B, T, 88)`` → logits ``(B, T, 88)``, final state (``lengths`` ignored:
        steps past a sequence's end are computed but masked by the loss)."""
        if gate_mode not in (None, "mean"):
            raise ConfigError("a pruned dense model has mean gates only")
        h, c = state if state is not None else self.zero_state(frames.shape[0], frames.device)
        outs = []
        for frame in frames.unbind(1):
            top, h, c = self._layers(frame, h, c)
            outs.append(top)
        return self.readout(torch.stack(outs, 1)), (h, c)

    def zero_state(self, batch: int, device=None):
        shape = (self.config.num_layers, batch, self.config.hidden_size)
        zeros = torch.zeros(shape, device=device)
        return zeros, zeros.clone()

    def expand_state(self, h: Tensor) -> Tensor:
        """``(L, B, H_max)`` → the sparse model's ``(L, B, H)`` (dropped units as zeros)."""
        out = h.new_zeros(h.shape[0], h.shape[1], self.source_hidden)
        for layer, kept in enumerate(self.kept_units):
            out[layer][:, kept] = h[layer, :, : kept.numel()]
        return out


@torch.no_grad()
def live_units(model) -> list[Tensor]:
    """Bool ``(H,)`` per layer: the hidden units whose h can reach the read-out (backwards
    reachability through the nonzero effective weights)."""
    rnn = model.rnn
    hid = rnn.hidden_size
    eff = [cell.effective_weights() for cell in rnn.cells]

    def unit_deps(weight: Tensor) -> Tensor:  # (H_rows_units, cols): unit i reads column j
        nb = weight.shape[0] // hid
        return (weight != 0).view(nb, hid, -1).any(0)

    live: list[Tensor] = [torch.zeros(hid, dtype=torch.bool)] * len(eff)
    reads = (model.readout.weight != 0).any(0)
    for layer in range(len(eff) - 1, -1, -1):
        cur = reads.clone()
        dep_u = unit_deps(eff[layer][1])
        while True:
            nxt = cur | dep_u[cur].any(0)
            if bool((nxt == cur).all()):
                break
            cur = nxt
        live[layer] = cur
        reads = unit_deps(eff[layer][0])[cur].any(0)
    return live


@torch.no_grad()
def prune_to_dense(
    model, *, min_row_saving: float = 0.5, min_column_saving: float = 0.25
) -> PrunedPianoRollModel:
    """The smaller dense equivalent (mean gates) of a sparse piano-roll model, on the CPU.

    Hidden units that cannot reach the read-out are always dropped. Constant rows of z are
    taken out of the matrix products (a concat and a gather put them back) only where they are
    at least ``min_row_saving`` of a layer's rows; unused input / recurrent columns are gathered
    away only where they are at least ``min_column_saving`` of the columns (below that, the zero
    rows and columns stay in the dense products, which is exact too and avoids the gathers).
    The defaults come from ONNX Runtime timings (1 thread, batch 16, JSB lstm H = 200): taking a
    third of the rows out through the concat + gather was ~1.5× *slower* than the zero rows.
    """
    if not isinstance(model.rnn, SparseGatedLSTM):
        raise ConfigError("prune_to_dense needs a model with a SparseGatedLSTM (sparse=True)")
    if any(p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).cpu()
    was_training = model.training
    model.eval()
    rnn = model.rnn
    hid, nb = rnn.hidden_size, rnn.cells[0].n_blocks
    live = live_units(model)
    kept = [m.nonzero().squeeze(1) for m in live]
    cells = []
    prev_kept = None
    for layer, cell in enumerate(rnn.cells):
        w, u = cell.effective_weights()
        b = cell.bias if cell.bias is not None else w.new_zeros(w.shape[0])
        k = kept[layer]
        rows = (torch.arange(nb).unsqueeze(1) * hid + k.unsqueeze(0)).reshape(-1)
        w, u, b = w[rows], u[rows][:, k], b[rows]
        if prev_kept is not None:
            w = w[:, prev_kept]
        active = (w != 0).any(1) | (u != 0).any(1)
        if float((~active).float().mean()) < min_row_saving or bool(active.all()):
            active = torch.ones_like(active)
        in_cols = (w[active] != 0).any(0).nonzero().squeeze(1)
        rec_cols = (u[active] != 0).any(0).nonzero().squeeze(1)
        if in_cols.numel() > (1.0 - min_column_saving) * w.shape[1]:
            in_cols = torch.arange(w.shape[1])
        if rec_cols.numel() > (1.0 - min_column_saving) * u.shape[1]:
            rec_cols = torch.arange(u.shape[1])
        cells.append(
            PrunedCell(
                rnn.config,
                int(k.numel()),
                w[:, in_cols],
                u[:, rec_cols],
                b,
                active,
                _optional_index(in_cols, w.shape[1]),
                _optional_index(rec_cols, u.shape[1]),
            )
        )
        prev_kept = k
    readout = nn.Linear(int(kept[-1].numel()), model.readout.out_features)
    readout.weight.copy_(model.readout.weight[:, kept[-1]])
    readout.bias.copy_(model.readout.bias)
    dense = PrunedPianoRollModel(model.config, cells, readout, kept, hid).eval()
    model.train(was_training)
    return dense


@torch.no_grad()
def compare_pruned(
    sparse_model, dense: PrunedPianoRollModel, *, batch: int = 3, steps: int = 12, seed: int = 0
) -> dict[str, float]:
    """Largest differences between the sparse model (eval, mean gates) and its dense pruning
    on random binary frames: probabilities of every step and the kept units of h and c."""
    was_training = sparse_model.training
    sparse_model.eval()
    g = torch.Generator().manual_seed(seed)
    frames = (torch.rand(batch, steps, sparse_model.config.n_keys, generator=g) < 0.15).float()
    L, H = sparse_model.config.num_layers, sparse_model.config.hidden_size
    h = c = torch.zeros(L, batch, H)
    hd, cd = dense.zero_state(batch)
    diff = {"probs": 0.0, "h": 0.0, "c": 0.0}
    for t in range(steps):
        p, h, c = sparse_model.step(frames[:, t], h, c, "mean")
        pd, hd, cd = dense.step(frames[:, t], hd, cd)
        diff["probs"] = max(diff["probs"], float((p - pd).abs().max()))
        for name, full, small in (("h", h, hd), ("c", c, cd)):
            for layer, k in enumerate(dense.kept_units):
                d = (full[layer][:, k] - small[layer, :, : k.numel()]).abs()
                diff[name] = max(diff[name], float(d.max()) if d.numel() else 0.0)
    sparse_model.train(was_training)
    return diff


def export_pruned_music(
    model,
    out,
    *,
    config: dict | None = None,
    tolerance: float = 1e-4,
    min_row_saving: float = 0.5,
    min_column_saving: float = 0.25,
    **kwargs,
):
    """Prune a sparse piano-roll model to dense, check it against the sparse model (max abs
    difference <= ``tolerance`` on probabilities and kept states), then
    :func:`export.onnx_export.export_music` it (which verifies ONNX against the dense model).

    The recorded config gains ``pruned`` (layer widths, the report's totals and the check);
    no PyTorch checkpoint is embedded (the dense module is not a PianoRollModel).
    """
    from export.onnx_export import export_music
    from export.verify import VerificationError
    from training.prune_report import prune_report

    dense = prune_to_dense(
        model, min_row_saving=min_row_saving, min_column_saving=min_column_saving
    )
    check = compare_pruned(model, dense)
    if max(check.values()) > tolerance:
        raise VerificationError(f"pruned dense model differs from the sparse model: {check}")
    config = dict(config or {"kind": "music", "model": model.config.to_dict()})
    config["model"] = {**config["model"], "hidden_size": dense.config.hidden_size}
    config["pruned"] = {
        "widths": dense.widths,
        "source_hidden_size": model.config.hidden_size,
        "totals": prune_report(model)["totals"],
        "max_abs_diff_vs_sparse": check,
    }
    kwargs["checkpoint"] = False  # the dense module is no PianoRollModel checkpoint
    return export_music(dense, out, config=config, tolerance=tolerance, **kwargs)


def dense_parameter_count(model) -> int:
    """Parameters of the equivalent dense model (θ of weights and biases, no σ, no groups)."""
    cfg = model.config
    k = make_gate(cfg.gate).n_blocks + 2
    total, d = 0, cfg.n_keys
    for _ in range(cfg.num_layers):
        total += k * cfg.hidden_size * (d + cfg.hidden_size + 1)
        d = cfg.hidden_size
    return total + cfg.hidden_size * cfg.n_keys + cfg.n_keys


__all__ = [
    "SparseGatedLSTM",
    "SparseGatedLSTMCell",
    "PrunedPianoRollModel",
    "compare_pruned",
    "export_pruned_music",
    "keep_mask",
    "kl_log_uniform",
    "log_alpha",
    "prune_to_dense",
]
