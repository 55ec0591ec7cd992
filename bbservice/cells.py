"""The gated LSTM cell and stacked layers, mirroring ``torch.nn.LSTMCell`` / ``torch.nn.LSTM``.

One fused affine map per layer, split into blocks ``[gate blocks..., g, o]``::

    z_t = W x_t + U h_{t-1} + b        # (B, k·H); k = gate blocks + 2
    c_t = f_t ⊙ c_{t-1} + i_t ⊙ tanh(z_g)
    h_t = σ(z_o) ⊙ tanh(c_t)

For ``lstm`` the block order is nn.LSTM's (i, f, g, o), so its weights copy straight in
(:meth:`GatedLSTM.load_torch_lstm`). ``mlstm`` replaces ``U h`` by ``U m`` with
``m = (W_mx x) ⊙ (W_mh h)``.

Speed: the input projection of all time steps is one matrix product; the per-step work is a
single ``addmm`` and one fused kernel for the gates and the c/h update
(:mod:`bbservice.fused`, forward and backward), with the gate noise drawn inside the kernel
from one seed per sequence. The eager gate ops of :mod:`bbservice.gates` are the reference
and the fallback (CUDA, half precision, the ``implicit`` and reference samplers, ONNX export
and tracing); ``fused=False`` (or ``BBSERVICE_FUSED=0``) forces them.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from bbservice import fused as fused_kernels
from bbservice.errors import ConfigError
from bbservice.fused import FusedStepOutput, SequenceNoise, StepNoise, fused_step
from bbservice.fused.sequence import FusedSequence, run_inference
from bbservice.fused.step import sequence_spec
from bbservice.gates import Gate, GateConfig, GateOutput, make_gate, resolve_gate_mode, tanh

State = tuple[Tensor, Tensor]
# oneDNN pre-packed recurrent weights pay off from this batch size up (below, plain addmm wins).
PACKED_MIN_BATCH = 8


class GatedLSTMCell(nn.Module):
    """One gated LSTM cell; same arguments, call and shapes as ``nn.LSTMCell``.

    Parameters
    ----------
    input_size, hidden_size, bias : as ``nn.LSTMCell`` (a single bias vector of k·H).
    gate : a family name of :data:`bbservice.gates.GATE_FAMILIES` or a :class:`GateConfig`.
    fused : run the gate math and c/h update in the fused kernels of :mod:`bbservice.fused`
        where they apply; ``None`` (default) follows :func:`bbservice.fused.enabled` (on
        unless ``BBSERVICE_FUSED=0``). Same results as eager to float rounding.

    Call ``cell(x, (h, c), gate_mode=None)`` with ``x`` ``(B, D)`` or ``(D,)`` → ``(h, c)``
    each ``(B, H)`` or ``(H,)``. The prior KL of the last call is in :attr:`last_kl`.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        gate: str | GateConfig = "lstm",
        device=None,
        dtype=None,
        fused: bool | None = None,
    ) -> None:
        super().__init__()
        if input_size <= 0 or hidden_size <= 0:
            raise ConfigError(
                f"input_size and hidden_size must be positive, got {input_size}, {hidden_size}"
            )
        self.config = GateConfig.of(gate)
        self.gate: Gate = make_gate(self.config)
        self.gate.where = type(self).__name__  # names the layer in errors
        self.fused: bool | None = fused
        self.input_size, self.hidden_size, self.has_bias = input_size, hidden_size, bias
        self.n_blocks = self.gate.n_blocks + 2
        self.multiplicative = self.config.family == "mlstm"
        kw = {"device": device, "dtype": dtype}
        kh = self.n_blocks * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(kh, input_size, **kw))
        self.weight_hh = nn.Parameter(torch.empty(kh, hidden_size, **kw))
        self.bias = nn.Parameter(torch.empty(kh, **kw)) if bias else None
        if self.multiplicative:
            self.weight_mx = nn.Parameter(torch.empty(hidden_size, input_size, **kw))
            self.weight_mh = nn.Parameter(torch.empty(hidden_size, hidden_size, **kw))
        self.gate_mode: str | None = None  # None: sample in training, mean in eval
        self.last_kl: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.LSTM's uniform(±1/√H) initialisation, plus the configured forget-gate bias."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)
        forget_bias = self.config.forget_bias
        if forget_bias is None:
            forget_bias = 1.0 if self.multiplicative else 0.0
        if self.bias is not None and forget_bias and self.config.family in ("lstm", "mlstm", "g2"):
            with torch.no_grad():
                self.bias[self.hidden_size : 2 * self.hidden_size] += forget_bias

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, bias={self.has_bias}, "
            f"gate={self.config.family!r}"
        )

    # -- the pieces the sequence loop and the step-by-step callers share --------------------

    def input_projection(self, x: Tensor, *, pack: bool = False) -> Tensor:
        """``(..., D)`` → ``(..., P)``: the input part of every block (and of m for mlstm).

        ``pack=True`` (for a whole sequence at once) lets CPU inference pre-pack the weights
        for oneDNN with the bias fused; step-by-step callers leave it off, since packing
        every step would cost more than it saves.
        """
        if x.shape[-1] != self.input_size:
            raise ConfigError(
                f"input has {x.shape[-1]} features but the cell expects input_size="
                f"{self.input_size}"
            )
        weight, bias = self.weight_ih, self.bias
        if self.multiplicative:
            weight = torch.cat([weight, self.weight_mx])
            if bias is not None:
                bias = torch.cat([bias, bias.new_zeros(self.hidden_size)])
        rows = x.numel() // x.shape[-1]
        if pack and _can_pack(weight, rows):  # CPU inference: oneDNN with the bias fused
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
                flat = torch.ops.mkldnn._linear_pointwise(
                    x.reshape(rows, -1).contiguous(), packed, bias, "none", [], ""
                )
                return flat.reshape(*x.shape[:-1], weight.shape[0])
            except (RuntimeError, AttributeError):
                pass
        return nn.functional.linear(x, weight, bias)

    def sequence_noise(self, batch: int, like: Tensor) -> contextlib.AbstractContextManager:
        """Context for callers that run a sequence step by step (input projection per step):
        cells with per-sequence noise (:class:`bbservice.sparse.SparseGatedLSTMCell`) draw it
        once on entry and reuse it for every step inside. A no-op here."""
        del batch, like
        return contextlib.nullcontext()

    def recurrent_matmuls(self, batch: int):
        """``(mm_h, mm_m)``: functions ``(add (B, kH), h (B, H)) → add + h Uᵀ`` for this call.

        Without autograd on a float32 CPU tensor the recurrent weights are pre-packed once for
        oneDNN (about 3× faster per step than ``addmm`` at batch 64; slower below
        :data:`PACKED_MIN_BATCH`); otherwise plain ``addmm``.
        """
        weights = [self.weight_hh] + ([self.weight_mh] if self.multiplicative else [])
        if _can_pack(weights[0], batch):
            try:
                fns = [_packed_matmul(weight, batch) for weight in weights]
                return fns[0], (fns[1] if self.multiplicative else None)
            except (RuntimeError, AttributeError):  # op missing in this build: plain path
                pass
        fns = [_plain_matmul(weight) for weight in weights]
        return fns[0], (fns[1] if self.multiplicative else None)

    def recurrent_step(
        self,
        xp: Tensor,
        state: State,
        mode: str,
        noise: object = None,
        matmuls=None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, GateOutput]:
        """One step from a projected input ``xp`` ``(B, P)`` and ``state`` ``(h, c)`` ``(B, H)``.

        Returns ``(h, c, gates)``. ``mode`` is ``"sample"`` or ``"mean"``; ``noise`` one step
        of :meth:`Gate.draw_noise` (drawn here if ``None`` and needed); ``matmuls`` from
        :meth:`recurrent_matmuls` (made here if ``None``).
        """
        h, c = state
        z = self._preactivation(xp, h, matmuls, c.dtype)
        if self.uses_fused(z):
            out = self._fused(z, c, mode, noise, generator, want_gates=True)
            i, f = out.gates.chunk(2, dim=1)
            alpha = None
            if self.config.kl_weight > 0:  # the callers sum gate.kl(alpha)
                alpha = self.gate.alphas(z[:, : self.gate.n_blocks * self.hidden_size])
            return out.h, out.c, GateOutput(i, f, alpha)
        return self._eager_step(z, c, mode, noise, generator)

    # -- fused or eager ----------------------------------------------------------------------

    def fused_wanted(self) -> bool:
        """This cell's switch: :attr:`fused`, or the process default when it is ``None``."""
        return fused_kernels.enabled() if self.fused is None else bool(self.fused)

    def uses_fused(self, like: Tensor) -> bool:
        """Whether a step on tensors like ``like`` runs the fused kernels (see
        :func:`bbservice.fused.supported`: CPU float32/float64, the Marsaglia sampler, not
        while exporting or tracing)."""
        return self.fused_wanted() and fused_kernels.supported(self.config, like)

    def draw_sequence_noise(self, steps: int, batch: int, like: Tensor, generator=None):
        """Gate noise for ``steps`` steps (indexable by step; ``None`` for deterministic
        families): one seed for the fused kernels, or :meth:`Gate.draw_noise`'s tensors."""
        if not self.gate.stochastic:
            return None
        if self.uses_fused(like):
            return SequenceNoise(generator, like.device)
        return self.gate.draw_noise(steps, batch, self.hidden_size, like, generator)

    def _preactivation(self, xp: Tensor, h: Tensor, matmuls, dtype: torch.dtype) -> Tensor:
        mm_h, mm_m = matmuls or self.recurrent_matmuls(h.shape[0])
        if self.multiplicative:
            xz, xm = xp.split([xp.shape[1] - self.hidden_size, self.hidden_size], dim=1)
            m = xm * mm_m(None, h)
            z = mm_h(xz, m)
        else:
            z = mm_h(xp, h)
        if z.dtype != dtype:  # autocast: matmuls in half precision, gate math in float32
            z = z.to(dtype)
        return z

    def _fused(
        self, z: Tensor, c: Tensor, mode: str, noise, generator, *, want_kl=False, want_gates=False
    ) -> FusedStepOutput:
        return fused_step(
            self.config,
            z,
            c,
            mode,
            noise,
            want_kl=want_kl,
            want_gates=want_gates,
            where=self.gate.where,
            generator=generator,
        )

    def _eager_step(self, z: Tensor, c: Tensor, mode: str, noise, generator):
        """The reference: the gate ops of :mod:`bbservice.gates` and the c/h update."""
        if isinstance(noise, StepNoise):  # drawn for the fused kernels: draw eager noise
            noise = None
        hs = self.hidden_size
        zgate, zg, zo = z.split([z.shape[1] - 2 * hs, hs, hs], dim=1)
        gates = self.gate(zgate, mode, noise, generator)
        c = torch.addcmul(gates.f * c, gates.i, tanh(zg))
        h = torch.sigmoid(zo) * tanh(c)
        return h, c, gates

    def gate_preactivation(self, xp: Tensor, h: Tensor) -> Tensor:
        """The gate blocks of z ``(B, n·H)`` for statistics (recomputed, off the fast path)."""
        if self.multiplicative:
            xz, xm = xp.split([xp.shape[1] - self.hidden_size, self.hidden_size], dim=1)
            z = torch.addmm(xz, xm * torch.mm(h, self.weight_mh.t()), self.weight_hh.t())
        else:
            z = torch.addmm(xp, h, self.weight_hh.t())
        return z[:, : self.gate.n_blocks * self.hidden_size]

    def zero_state(self, batch: int, like: Tensor) -> State:
        zeros = like.new_zeros(batch, self.hidden_size)
        return zeros, zeros

    def forward(
        self,
        input: Tensor,
        hx: State | None = None,
        *,
        gate_mode: str | None = None,
        generator: torch.Generator | None = None,
    ):
        if input.dim() not in (1, 2):
            raise ConfigError(
                f"GatedLSTMCell expects input of shape (B, D) or (D,), got {tuple(input.shape)}"
            )
        unbatched = input.dim() == 1
        x = input.unsqueeze(0) if unbatched else input
        if hx is None:
            hx = self.zero_state(x.shape[0], x)
        else:
            hx = tuple(s.unsqueeze(0) if unbatched else s for s in hx)
            _check_state(hx, (x.shape[0], self.hidden_size), "hx")
        mode = resolve_gate_mode(gate_mode or self.gate_mode, self.training)
        h, c, gates = self.recurrent_step(self.input_projection(x), hx, mode, generator=generator)
        self.last_kl = self.gate.kl(gates.alpha).sum() if self.config.kl_weight > 0 else None
        if unbatched:
            return h.squeeze(0), c.squeeze(0)
        return h, c


class LockedDropout(nn.Module):
    """Variational dropout: one mask per sequence, shared over time. ``(T, B, D)`` in and out."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor, time_dim: int = 0) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        shape = list(x.shape)
        shape[time_dim] = 1
        mask = x.new_empty(shape).bernoulli_(1.0 - self.p) / (1.0 - self.p)
        return x * mask


class GatedLSTM(nn.Module):
    """Stacked gated LSTM; same arguments, call and return shapes as ``nn.LSTM``.

    Parameters
    ----------
    input_size, hidden_size, num_layers, bias, batch_first : as ``nn.LSTM``.
    dropout : locked (variational) dropout on the outputs of every layer but the last.
    gate : family name or :class:`GateConfig`, shared by all layers.
    fused : the cells' switch for the fused kernels (:class:`GatedLSTMCell`); ``None`` follows
        the process default. The :attr:`fused` property reads and sets it on every layer.

    ``forward(input, hx=None, *, gate_mode=None, lengths=None)``: ``input`` ``(T, B, D)``
    (``(B, T, D)`` if ``batch_first``), ``(T, D)`` unbatched, or a ``PackedSequence``;
    ``lengths`` ``(B,)`` optionally marks right-padding of a padded batch (steps past a
    sequence's end leave its state unchanged and output zeros). Returns ``output``
    ``(T, B, H)`` and ``(h_n, c_n)`` each ``(num_layers, B, H)``.

    After a forward pass: :attr:`last_kl` (summed prior KL, unweighted; ``None`` without a
    prior) and, if :attr:`record_gate_stats` is set, :attr:`last_gate_stats`: one dict per
    layer of ``(T, B, H)`` tensors (``i``, ``f``, ``i_mean``, ``f_mean`` and for Beta families
    ``i_concentration``, ``f_concentration``).
    """

    cell_class: type[GatedLSTMCell] = GatedLSTMCell  # subclasses swap in their own cell

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        gate: str | GateConfig = "lstm",
        device=None,
        dtype=None,
        fused: bool | None = None,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ConfigError(f"num_layers must be >= 1, got {num_layers}")
        self.config = GateConfig.of(gate)
        self.input_size, self.hidden_size = input_size, hidden_size
        self.num_layers, self.batch_first, self.dropout = num_layers, batch_first, dropout
        self.cells = nn.ModuleList(
            self.cell_class(
                input_size if layer == 0 else hidden_size,
                hidden_size,
                bias,
                self.config,
                device=device,
                dtype=dtype,
            )
            for layer in range(num_layers)
        )
        for layer, cell in enumerate(self.cells):
            cell.gate.where = f"{type(self).__name__} layer {layer}"
        self.fused = fused
        self.locked_dropout = LockedDropout(dropout)
        self.gate_mode: str | None = None
        self.record_gate_stats = False
        self.last_kl: Tensor | None = None
        self.last_gate_stats: list[dict[str, Tensor]] | None = None

    @property
    def fused(self) -> bool | None:
        """The layers' fused switch (``None``: the process default)."""
        return self.cells[0].fused

    @fused.setter
    def fused(self, value: bool | None) -> None:
        for cell in self.cells:
            cell.fused = value

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"batch_first={self.batch_first}, dropout={self.dropout}, "
            f"gate={self.config.family!r}"
        )

    @torch.no_grad()
    def load_torch_lstm(self, lstm: nn.LSTM) -> GatedLSTM:
        """Copy the weights of an ``nn.LSTM`` (gate must be ``lstm``; biases are summed)."""
        if self.config.family != "lstm":
            raise ConfigError(f"only gate='lstm' can load nn.LSTM weights, not {self.config}")
        if (lstm.input_size, lstm.hidden_size, lstm.num_layers) != (
            self.input_size,
            self.hidden_size,
            self.num_layers,
        ):
            raise ConfigError("nn.LSTM sizes differ from this GatedLSTM's")
        if lstm.bidirectional or lstm.proj_size:
            raise ConfigError("bidirectional or projected nn.LSTM weights are not supported")
        for layer, cell in enumerate(self.cells):
            cell.weight_ih.copy_(getattr(lstm, f"weight_ih_l{layer}"))
            cell.weight_hh.copy_(getattr(lstm, f"weight_hh_l{layer}"))
            if cell.bias is not None:
                cell.bias.copy_(
                    getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
                )
        return self

    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: State | None = None,
        *,
        gate_mode: str | None = None,
        lengths: Tensor | None = None,
        generator: torch.Generator | None = None,
    ):
        packed = input if isinstance(input, PackedSequence) else None
        unbatched = False
        if packed is not None:
            x, lengths = pad_packed_sequence(packed)  # (T, B, D), original batch order
        else:
            if input.dim() == 2:
                unbatched, x = True, input.unsqueeze(1)
            elif input.dim() == 3:
                x = input.transpose(0, 1) if self.batch_first else input
            else:
                raise ConfigError(
                    f"GatedLSTM expects input of rank 2 or 3 (or a PackedSequence), "
                    f"got shape {tuple(input.shape)}"
                )
        steps, batch = x.shape[0], x.shape[1]
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=x.device)
            if lengths.shape != (batch,) or int(lengths.max()) > steps or int(lengths.min()) < 1:
                raise ConfigError(
                    f"lengths must be ({batch},) with values in [1, {steps}], got "
                    f"{tuple(lengths.shape)} in [{int(lengths.min())}, {int(lengths.max())}]"
                )
        if hx is not None:
            h0, c0 = (s.unsqueeze(1) for s in hx) if unbatched else hx
            _check_state((h0, c0), (self.num_layers, batch, self.hidden_size), "hx")
        mode = resolve_gate_mode(gate_mode or self.gate_mode, self.training)

        kl_total = x.new_zeros(()) if self.config.kl_weight > 0 else None
        stats: list[dict[str, Tensor]] | None = [] if self.record_gate_stats else None
        h_n, c_n = [], []
        layer_input = x
        active = None
        if lengths is not None:
            t_index = torch.arange(steps, device=x.device).unsqueeze(1)
            active = (t_index < lengths.unsqueeze(0)).unsqueeze(2)  # (T, B, 1)
        for layer, cell in enumerate(self.cells):
            if layer > 0:
                layer_input = self.locked_dropout(layer_input)
            state = (h0[layer], c0[layer]) if hx is not None else cell.zero_state(batch, x)
            out, state, kl, layer_stats = _run_layer(
                cell, layer_input, state, mode, active, generator, kl_total is not None, stats
            )
            if kl_total is not None:
                kl_total = kl_total + kl
            if stats is not None:
                stats.append(layer_stats)
            h_n.append(state[0])
            c_n.append(state[1])
            layer_input = out
        self.last_kl = kl_total
        self.last_gate_stats = stats
        output = layer_input
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)
        if packed is not None:
            return _repack(output, lengths, packed), (h_n, c_n)
        if unbatched:
            return output.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)

    def kl_loss(self) -> Tensor:
        """λ · (prior KL of the last forward pass); 0 when there is no prior."""
        if self.last_kl is None:
            return torch.zeros(())
        return self.config.kl_weight * self.last_kl


def _run_layer(
    cell: GatedLSTMCell,
    x: Tensor,
    state: State,
    mode: str,
    active: Tensor | None,
    generator: torch.Generator | None,
    want_kl: bool,
    stats: list | None,
) -> tuple[Tensor, State, Tensor | None, dict[str, Tensor] | None]:
    """Run one layer over ``x`` ``(T, B, D)`` → ``(T, B, H)``, final state, KL, statistics."""
    steps, batch = x.shape[0], x.shape[1]
    xp = cell.input_projection(x, pack=True)  # (T, B, P): one product for all steps
    fused = stats is None and cell.uses_fused(xp)
    noise = None
    if mode == "sample":
        noise = cell.draw_sequence_noise(steps, batch, xp, generator)
    h, c = state
    if active is not None:
        active = active.to(x.dtype)  # float masks: blending is cheaper than torch.where here
    if fused and _whole_sequence(cell, xp, h):
        spec = sequence_spec(cell.config, mode, cell.gate.where)
        seed = noise.seed if isinstance(noise, SequenceNoise) else 0
        out, h, c, kl_rows = FusedSequence.apply(
            xp, cell.weight_hh, h, c, active, spec, seed, want_kl
        )
        kl = None
        if want_kl:
            kl = (kl_rows * active[:, :, 0]).sum() if active is not None else kl_rows.sum()
        return out, (h, c), kl, None
    if fused and not torch.is_grad_enabled() and xp.dtype == h.dtype:
        spec = sequence_spec(cell.config, mode, cell.gate.where)
        seed = noise.seed if isinstance(noise, SequenceNoise) else 0
        out, h, c, kl_rows = run_inference(
            xp, h, c, active, spec, seed, cell.recurrent_matmuls(batch), want_kl
        )
        kl = None
        if want_kl:
            kl = (kl_rows * active[:, :, 0]).sum() if active is not None else kl_rows.sum()
        return out, (h, c), kl, None
    outputs: list[Tensor] = []
    kl = x.new_zeros(()) if want_kl else None
    step_stats: list[dict[str, Tensor]] = []
    matmuls = cell.recurrent_matmuls(batch)
    for t, xp_t in enumerate(xp.unbind(0)):
        step_noise = None if noise is None else noise[t]
        if fused:
            z = cell._preactivation(xp_t, h, matmuls, c.dtype)
            out = cell._fused(z, c, mode, step_noise, generator, want_kl=want_kl)
            h_new, c_new = out.h, out.c
            if want_kl:
                kl_t = out.kl.sum(dim=1)
        else:
            z = cell._preactivation(xp_t, h, matmuls, c.dtype)
            h_new, c_new, gates = cell._eager_step(z, c, mode, step_noise, generator)
            if want_kl:
                kl_t = cell.gate.kl(gates.alpha)
        if want_kl:
            kl = kl + (kl_t * active[t, :, 0] if active is not None else kl_t).sum()
        if stats is not None:
            with torch.no_grad():
                step_stats.append(cell.gate.statistics(cell.gate_preactivation(xp_t, h), gates))
        if active is not None:
            mask = active[t]
            h = torch.lerp(h, h_new, mask)
            c = torch.lerp(c, c_new, mask)
            outputs.append(h_new * mask)
        else:
            h, c = h_new, c_new
            outputs.append(h)
    layer_stats = None
    if stats is not None:
        layer_stats = {k: torch.stack([s[k] for s in step_stats]) for k in step_stats[0]}
    return torch.stack(outputs), (h, c), kl, layer_stats


def _whole_sequence(cell: GatedLSTMCell, xp: Tensor, h: Tensor) -> bool:
    """Whether a layer trains as one :class:`FusedSequence` node: the plain (not sparse, not
    multiplicative) cell, with autograd on and matching dtypes."""
    return (
        torch.is_grad_enabled()
        and (xp.requires_grad or cell.weight_hh.requires_grad)
        and not cell.multiplicative
        and type(cell).recurrent_matmuls is GatedLSTMCell.recurrent_matmuls
        and type(cell).input_projection is GatedLSTMCell.input_projection
        and xp.dtype == h.dtype == cell.weight_hh.dtype
    )


def _can_pack(weight: Tensor, rows: int) -> bool:
    """Whether oneDNN pre-packed weights serve this product (CPU float32 inference only)."""
    return (
        not torch.is_grad_enabled()
        and rows >= PACKED_MIN_BATCH
        and weight.is_cpu
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and not torch.onnx.is_in_onnx_export()
        and not torch.compiler.is_compiling()
    )


def _plain_matmul(weight: Tensor):
    def mm(add: Tensor | None, x: Tensor) -> Tensor:
        return torch.mm(x, weight.t()) if add is None else torch.addmm(add, x, weight.t())

    return mm


def _packed_matmul(weight: Tensor, batch: int):
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch)

    def mm(add: Tensor | None, x: Tensor) -> Tensor:
        if add is None:
            return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, add, packed, None, "add")

    return mm


def _repack(output: Tensor, lengths: Tensor, like: PackedSequence) -> PackedSequence:
    """Padded ``(T, B, H)`` in original batch order → a PackedSequence laid out like ``like``."""
    order = like.sorted_indices
    if order is not None:
        output, lengths = output[:, order], lengths[order.to(lengths.device)]
    steps = output.shape[0]
    mask = torch.arange(steps, device=output.device).unsqueeze(1) < lengths.unsqueeze(0)
    return PackedSequence(
        output[mask], like.batch_sizes, like.sorted_indices, like.unsorted_indices
    )


def _check_state(state: State, expected: tuple[int, ...], name: str) -> None:
    for part, label in zip(state, ("h", "c"), strict=True):
        if tuple(part.shape) != expected:
            raise ConfigError(f"{name} {label} has shape {tuple(part.shape)}, expected {expected}")
