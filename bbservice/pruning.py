"""Pruning a sparse model (:mod:`bbservice.sparse`) to the equivalent smaller dense one.

After training with sparse variational dropout, every variable with ``log α > 3`` is zero. A
layer's effective weights (``SparseGatedLSTMCell.effective_weights``) then have:

* constant rows: a pruned pre-activation variable (or all the weights of a row) leaves
  ``z = b``, so that block of that unit is a constant for every input (its gate is ``σ(b)``);
* unused columns: pruned input features and hidden-unit variables;
* dead hidden units (music only): units whose h no longer reaches the read-out.

:func:`prune_cell` builds one :class:`PrunedCell` from a sparse cell: units whose gates are all
constant get precomputed mean gates and their gate rows leave the matrix products (no gate math
runs for them), unused columns are gathered away, dead units are dropped.
:func:`prune_to_dense` does it for a piano-roll model (:class:`PrunedPianoRollModel`, layers of
their own widths, units with constant gates placed last), :func:`prune_caption` for a caption
model (the decoder's cell is replaced; h and c keep all H units in their order, since the
attention, β and the output layer read every unit). The exporters of pruned models live in
:mod:`export.pruned`.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bbservice.errors import ConfigError
from bbservice.gates import GateConfig, GateOutput, make_gate, tanh
from bbservice.sparse import SparseGatedLSTM, SparseGatedLSTMCell


@dataclass(frozen=True)
class Compaction:
    """What a pruned cell takes out of its graph, as fractions of a layer (0: always).

    A saving below its minimum stays in the dense products: exact too, and faster than the
    extra gathers when there is little to save (ONNX Runtime timings on JSB, 1 thread).

    min_column_saving : unused input / recurrent columns are gathered away from this fraction
        of the columns on.
    min_gate_saving : units whose every gate block is constant get precomputed mean gates, and
        their gate rows leave the matrix products, from this fraction of the units on (always
        when all of them are). The pruned models place those units last, so putting the gates
        back costs one concat; on JSB (`lstm`, 1 thread, batch 16) a layer pair with most units
        constant stepped 0.68× the dense time with it and 0.90× without.
    """

    min_column_saving: float = 0.25
    min_gate_saving: float = 0.25

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _optional_index(index: Tensor, size: int) -> Tensor | None:
    return None if index.numel() == size else index


def _restore_order(first: Tensor, rest: Tensor) -> Tensor | None:
    """The gather index that puts ``cat([x[first], x[rest]])`` back in the original order
    (``None`` when it already is)."""
    order = torch.cat([first, rest])
    perm = torch.empty_like(order)
    perm[order] = torch.arange(order.numel())
    return None if bool((perm == torch.arange(perm.numel())).all()) else perm


class PrunedCell(nn.Module):
    """A dense cell over the kept units, without the rows of its constant gates.

    Units whose every gate block is constant (``const_units``) have mean gates ``i``, ``f``
    that do not depend on the input: they are precomputed (``gate_i``, ``gate_f``) and the
    gate rows of those units are not computed at all. The affine map computes, in this order::

        z = [gate blocks of the other units (n·V) | g (H') | o (H')] = x Wᵀ + h Uᵀ + b

    over the used input columns (``in_index``) and hidden columns (``rec_index``). Constant g or
    o rows stay in the product (zero weights: exact). ``gate_perm`` puts ``[i_var, i_const]``
    back in unit order (``None`` when the constant units are already the last ones, as
    :func:`prune_to_dense` arranges).

    ``step(x, h, c)``: ``x`` ``(B, D)``, ``h``, ``c`` ``(B, H')`` → ``(h, c)``.
    ``gate_mode="sample"`` samples the gates as the dense cell does (PyTorch only: a constant
    Beta parameter still gives a random gate; the exported graph is the mean-gate one). It
    also has the dense cell's step interface (``input_projection``, ``recurrent_matmuls``,
    ``recurrent_step``), so it can stand in for the caption decoder's cell.
    """

    def __init__(
        self,
        gate: GateConfig,
        w: Tensor,
        u: Tensor,
        b: Tensor,
        const_units: Tensor,
        in_index: Tensor | None,
        rec_index: Tensor | None,
    ) -> None:
        """``w``, ``u``, ``b``: the effective weights of the kept units in block order
        ``(k·H', D)``, ``(k·H', H')``, ``(k·H',)``, used columns already selected;
        ``const_units``: bool ``(H',)``, the units whose gates are precomputed."""
        super().__init__()
        self.config = replace(gate, kl_weight=0.0)  # an inference cell: no prior term
        self.gate = make_gate(self.config)
        n = self.gate.n_blocks
        self.hidden_size = hs = int(const_units.numel())
        var = (~const_units).nonzero().squeeze(1)
        const = const_units.nonzero().squeeze(1)
        self.n_var, self.n_constant_gates = int(var.numel()), int(const.numel())
        block = torch.arange(n).unsqueeze(1) * hs
        rows = torch.cat([(block + var).reshape(-1), torch.arange(n * hs, (n + 2) * hs)])
        self.weight_ih = nn.Parameter(w[rows].clone())
        self.weight_hh = nn.Parameter(u[rows].clone())
        self.bias = nn.Parameter(b[rows].clone())
        mean = self.gate.mean(b[: n * hs].unsqueeze(0))
        self.register_buffer("gate_i", mean.i[0, const].clone())
        self.register_buffer("gate_f", mean.f[0, const].clone())
        self.register_buffer("const_gate_bias", b[: n * hs].view(n, hs)[:, const].clone())
        self.register_buffer("gate_perm", _restore_order(var, const))
        self.register_buffer("in_index", in_index)
        self.register_buffer("rec_index", rec_index)

    def preactivation(self, x: Tensor, h: Tensor) -> Tensor:
        """``(B, n·V + 2·H')``: the computed rows of z (see the class docstring)."""
        xi = x if self.in_index is None else x.index_select(1, self.in_index)
        hi = h if self.rec_index is None else h.index_select(1, self.rec_index)
        z = F.linear(xi, self.weight_ih, self.bias)
        return z + F.linear(hi, self.weight_hh) if hi.shape[1] else z

    def _unit_order(self, var: Tensor, const: Tensor) -> Tensor:
        """``cat([var, const], 1)`` in unit order (``(B, V)``, ``(B, C)`` → ``(B, H')``)."""
        out = var if not self.n_constant_gates else torch.cat([var, const], 1)
        return out if self.gate_perm is None else out.index_select(1, self.gate_perm)

    def _gates(self, zgate: Tensor, gate_mode: str, noise, generator) -> GateOutput:
        batch, n = zgate.shape[0], self.gate.n_blocks
        if gate_mode == "mean" or not self.gate.stochastic:
            if not self.n_var:  # every unit constant: no gate math at all
                return GateOutput(
                    self.gate_i.expand(batch, -1), self.gate_f.expand(batch, -1), None
                )
            i, f, _ = self.gate.mean(zgate)
            i = self._unit_order(i, self.gate_i.expand(batch, -1))
            f = self._unit_order(f, self.gate_f.expand(batch, -1))
            return GateOutput(i, f, None)
        # sampled: rebuild every unit's gate pre-activations (constant ones are the bias)
        zvar = zgate.view(batch, n, self.n_var)
        zconst = self.const_gate_bias.unsqueeze(0).expand(batch, -1, -1)
        full = torch.cat([zvar, zconst], 2)
        if self.gate_perm is not None:
            full = full.index_select(2, self.gate_perm)
        return self.gate(full.reshape(batch, -1), gate_mode, noise, generator)

    def gates(self, x: Tensor, h: Tensor) -> GateOutput:
        """Mean gates ``(i, f, alpha)`` of one step (for tests and inspection)."""
        z = self.preactivation(x, h)
        return self._gates(z[:, : self.gate.n_blocks * self.n_var], "mean", None, None)

    def step_with_gates(
        self, x: Tensor, h: Tensor, c: Tensor, gate_mode: str = "mean", noise=None, generator=None
    ) -> tuple[Tensor, Tensor, GateOutput]:
        z = self.preactivation(x, h)
        hs = self.hidden_size
        zgate, zg, zo = z.split([z.shape[1] - 2 * hs, hs, hs], dim=1)
        gates = self._gates(zgate, gate_mode, noise, generator)
        c = gates.f * c + gates.i * tanh(zg)
        h = torch.sigmoid(zo) * tanh(c)
        return h, c, gates

    def step(self, x: Tensor, h: Tensor, c: Tensor, gate_mode: str = "mean", generator=None):
        h, c, _ = self.step_with_gates(x, h, c, gate_mode, None, generator)
        return h, c

    # -- the dense cell's step interface (the caption decoder drives these) ------------------

    def sequence_noise(self, batch: int, like: Tensor) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def input_projection(self, x: Tensor, *, pack: bool = False) -> Tensor:
        """The identity: the whole affine map happens in :meth:`recurrent_step` (the input
        columns and rows are gathered there)."""
        return x

    def recurrent_matmuls(self, batch: int):
        return None

    def recurrent_step(self, xp, state, mode, noise=None, matmuls=None, generator=None):
        """As :meth:`GatedLSTMCell.recurrent_step`, with ``xp`` the raw input ``(B, D)``."""
        return self.step_with_gates(xp, state[0], state[1], mode, noise, generator)


def _unit_rows(n_blocks: int, hidden: int, kept: Tensor) -> Tensor:
    """Row indices of z for the kept units of every block, in block order."""
    return (torch.arange(n_blocks).unsqueeze(1) * hidden + kept.unsqueeze(0)).reshape(-1)


def constant_rows(cell: SparseGatedLSTMCell) -> Tensor:
    """Bool ``(k·H,)``: rows of z that are the bias for every input."""
    w, u = cell.effective_weights()
    return ~((w != 0).any(1) | (u != 0).any(1))


def constant_gate_units(cell: SparseGatedLSTMCell) -> Tensor:
    """Bool ``(H,)``: units whose every gate block is a constant row (their i and f are)."""
    n, hs = cell.gate.n_blocks, cell.hidden_size
    return constant_rows(cell)[: n * hs].view(n, hs).all(0)


@torch.no_grad()
def prune_cell(
    cell: SparseGatedLSTMCell,
    kept: Tensor | None = None,
    prev_kept: Tensor | None = None,
    compaction: Compaction | None = None,
) -> PrunedCell:
    """The :class:`PrunedCell` of one sparse cell (on the CPU, mean θ, pruned entries zeroed).

    ``kept``: the hidden units to keep, in the order they get (default: all); ``prev_kept``:
    the input features the previous layer still produces (default: all); ``compaction``: what
    is taken out of the products (:class:`Compaction`).
    """
    compact = compaction or Compaction()
    hid, nb = cell.hidden_size, cell.n_blocks
    k = torch.arange(hid) if kept is None else kept.cpu()
    w, u = (t.detach().cpu() for t in cell.effective_weights())
    b = cell.bias.detach().cpu() if cell.bias is not None else w.new_zeros(w.shape[0])
    const_units = constant_gate_units(cell).cpu()[k]
    share = float(const_units.float().mean()) if k.numel() else 0.0
    if share < compact.min_gate_saving and not bool(const_units.all()):
        const_units = torch.zeros_like(const_units)
    rows = _unit_rows(nb, hid, k)
    w, u, b = w[rows], u[rows][:, k], b[rows]
    if prev_kept is not None:
        w = w[:, prev_kept.cpu()]
    n_gate, width = cell.gate.n_blocks, int(k.numel())
    needed = torch.ones(w.shape[0], dtype=torch.bool)  # the rows the products still compute
    needed[: n_gate * width] = (~const_units).repeat(n_gate)
    in_cols = (w[needed] != 0).any(0).nonzero().squeeze(1)
    rec_cols = (u[needed] != 0).any(0).nonzero().squeeze(1)
    if in_cols.numel() > (1.0 - compact.min_column_saving) * w.shape[1]:
        in_cols = torch.arange(w.shape[1])
    if rec_cols.numel() > (1.0 - compact.min_column_saving) * u.shape[1]:
        rec_cols = torch.arange(u.shape[1])
    return PrunedCell(
        cell.config,
        w[:, in_cols],
        u[:, rec_cols],
        b,
        const_units,
        _optional_index(in_cols, w.shape[1]),
        _optional_index(rec_cols, u.shape[1]),
    )


# --------------------------------------------------------------------------------------------
# Music
# --------------------------------------------------------------------------------------------


class _PrunedRNN(nn.Module):
    def __init__(self, cells: list[PrunedCell]) -> None:
        super().__init__()
        self.cells = nn.ModuleList(cells)


class PrunedPianoRollModel(nn.Module):
    """The dense equivalent of a pruned sparse :class:`~bbservice.models.music.PianoRollModel`,
    with its ``step`` / ``forward`` / ``zero_state`` / ``config`` interface.

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

    def _layers(self, frame: Tensor, h: Tensor, c: Tensor, gate_mode: str, generator):
        x, hs, cs = frame, [], []
        hmax = self.config.hidden_size
        for layer, cell in enumerate(self.rnn.cells):
            w = self.widths[layer]
            h_l, c_l = cell.step(x, h[layer, :, :w], c[layer, :, :w], gate_mode, generator)
            hs.append(F.pad(h_l, (0, hmax - w)) if w < hmax else h_l)
            cs.append(F.pad(c_l, (0, hmax - w)) if w < hmax else c_l)
            x = h_l
        return x, torch.stack(hs), torch.stack(cs)

    def step(self, frame, h, c, gate_mode: str = "mean", matmuls=None, generator=None):
        """``frame`` ``(B, 88)``, ``h``, ``c`` ``(L, B, H_max)`` → probs, h, c."""
        top, h, c = self._layers(frame, h, c, gate_mode, generator)
        return torch.sigmoid(self.readout(top)), h, c

    def forward(self, frames: Tensor, lengths=None, state=None, *, gate_mode=None, generator=None):
        """``frames`` ``(B, T, 88)`` → logits ``(B, T, 88)``, final state (``lengths`` ignored:
        steps past a sequence's end are computed but masked by the loss)."""
        mode = gate_mode or "mean"
        h, c = state if state is not None else self.zero_state(frames.shape[0], frames.device)
        outs = []
        for frame in frames.unbind(1):
            top, h, c = self._layers(frame, h, c, mode, generator)
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


def readout_weight(model) -> Tensor:
    """The read-out weight ``(88, H)`` with the sparse read-out inputs folded in (pruned
    columns zero)."""
    weight = model.readout.weight
    neurons = getattr(model, "readout_neurons", None)
    return weight if neurons is None else weight * neurons.effective()


@torch.no_grad()
def live_units(model) -> list[Tensor]:
    """Bool ``(H,)`` per layer of a sparse piano-roll model: the hidden units whose h can reach
    the read-out (backwards reachability through the nonzero effective weights)."""
    rnn = model.rnn
    hid = rnn.hidden_size
    eff = [cell.effective_weights() for cell in rnn.cells]

    def unit_deps(weight: Tensor) -> Tensor:  # (H_rows_units, cols): unit i reads column j
        nb = weight.shape[0] // hid
        return (weight != 0).view(nb, hid, -1).any(0)

    live: list[Tensor] = [torch.zeros(hid, dtype=torch.bool)] * len(eff)
    reads = (readout_weight(model) != 0).any(0)
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
def prune_to_dense(model, compaction: Compaction | None = None) -> PrunedPianoRollModel:
    """The smaller dense equivalent of a sparse piano-roll model, on the CPU.

    Hidden units that cannot reach the read-out are always dropped; constant rows, unused
    columns and constant gates are taken out as ``compaction`` (:class:`Compaction`) says.
    """
    if not isinstance(getattr(model, "rnn", None), SparseGatedLSTM):
        raise ConfigError("prune_to_dense needs a model with a SparseGatedLSTM (sparse=True)")
    if any(p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).cpu()
    was_training = model.training
    model.eval()
    kept = []  # per layer the live units, those with constant gates last (no gather needed)
    for live, cell in zip(live_units(model), model.rnn.cells, strict=True):
        const = constant_gate_units(cell).cpu()
        kept.append(torch.cat([(live & ~const).nonzero(), (live & const).nonzero()]).squeeze(1))
    cells, prev_kept = [], None
    for layer, cell in enumerate(model.rnn.cells):
        cells.append(prune_cell(cell, kept[layer], prev_kept, compaction))
        prev_kept = kept[layer]
    readout = nn.Linear(int(kept[-1].numel()), model.readout.out_features)
    readout.weight.copy_(readout_weight(model)[:, kept[-1]])
    readout.bias.copy_(model.readout.bias)
    dense = PrunedPianoRollModel(model.config, cells, readout, kept, model.rnn.hidden_size)
    model.train(was_training)
    return dense.eval()


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


def dense_parameter_count(model) -> int:
    """Parameters of the equivalent dense piano-roll model (θ of weights and biases, no σ, no
    group variables)."""
    cfg = model.config
    k = make_gate(cfg.gate).n_blocks + 2
    total, d = 0, cfg.n_keys
    for _ in range(cfg.num_layers):
        total += k * cfg.hidden_size * (d + cfg.hidden_size + 1)
        d = cfg.hidden_size
    return total + cfg.hidden_size * cfg.n_keys + cfg.n_keys


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def prune_caption(model, compaction: Compaction | None = None):
    """A CPU copy of a sparse :class:`~bbservice.models.caption.CaptionModel` whose decoder
    cell is the :class:`PrunedCell`. The encoder, attention, β and output layer keep their
    weights, and the graphs their inputs and outputs.

    The hidden units are renumbered so that those with constant gates come last (no gather
    is needed to put the precomputed gates back in order): the rows of ``init_h`` / ``init_c``
    and the columns of every reader of h (attention, β, output layer) follow. h and c are
    the decoder's internal state, so only :attr:`unit_order` (new position → old unit) tells.
    """
    cell = getattr(getattr(model, "decoder", None), "cell", None)
    if not isinstance(cell, SparseGatedLSTMCell):
        raise ConfigError("prune_caption needs a caption model trained with sparse=True")
    pruned = copy.deepcopy(model).cpu().eval()
    decoder = pruned.decoder
    const = constant_gate_units(decoder.cell).cpu()
    order = torch.cat([(~const).nonzero(), const.nonzero()]).squeeze(1)
    with torch.no_grad():
        for producer in (decoder.init_h, decoder.init_c):
            producer.weight.copy_(producer.weight[order])
            producer.bias.copy_(producer.bias[order])
        for reader in (decoder.attention.hidden_proj, decoder.f_beta, decoder.fc):
            reader.weight.copy_(reader.weight[:, order])
    decoder.cell = prune_cell(decoder.cell, kept=order, compaction=compaction)
    pruned.unit_order = order
    dense_config = replace(model.config, sparse=False)
    pruned.config = decoder.config = dense_config
    return pruned


def decoder_parameter_count(model) -> int:
    """Parameters of the caption decoder without the sparse variables (σ, group θ): the size of
    the equivalent dense decoder."""
    from bbservice.models.caption import count_decoder_parameters

    return count_decoder_parameters(replace(model.config, sparse=False))


@torch.no_grad()
def compare_pruned_caption(
    sparse_model, pruned, *, batch: int = 3, steps: int = 8, seed: int = 0
) -> dict[str, float]:
    """Largest differences between a sparse caption model (eval, mean gates) and
    :func:`prune_caption` of it, over ``steps`` decoder steps from random images and tokens:
    log-probabilities, h, c and attention."""
    was_training = sparse_model.training
    sparse_model.eval()
    g = torch.Generator().manual_seed(seed)
    cfg = sparse_model.config
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    tokens = torch.randint(0, cfg.vocab_size, (steps, batch), generator=g)
    diff = {"log_probs": 0.0, "h": 0.0, "c": 0.0, "attention": 0.0}
    states = []
    for m in (sparse_model, pruned):
        dev = next(m.parameters()).device
        feats = m.encoder(images.to(dev))
        projected, h, c = m.decoder.encode_features(feats)
        states.append([dev, feats, projected, h, c])
    for t in range(steps):
        outs = []
        for st, m in zip(states, (sparse_model, pruned), strict=True):
            dev, feats, projected, h, c = st
            lp, h, c, att = m.decoder.step(
                tokens[t].to(dev), h, c, feats, "mean", projected, matmuls=None
            )
            st[3], st[4] = h, c
            outs.append({"log_probs": lp, "h": h, "c": c, "attention": att})
        for key in diff:
            ref, got = outs[0][key].float().cpu(), outs[1][key].float().cpu()
            if key in ("h", "c"):  # the pruned decoder's units are renumbered
                ref = ref[:, pruned.unit_order]
            diff[key] = max(diff[key], float((ref - got).abs().max()))
    sparse_model.train(was_training)
    return diff


__all__ = [
    "Compaction",
    "PrunedCell",
    "PrunedPianoRollModel",
    "compare_pruned",
    "compare_pruned_caption",
    "constant_gate_units",
    "constant_rows",
    "decoder_parameter_count",
    "dense_parameter_count",
    "live_units",
    "prune_caption",
    "prune_cell",
    "prune_to_dense",
    "readout_weight",
]
