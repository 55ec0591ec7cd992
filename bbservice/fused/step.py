"""One fused gated-LSTM step on the CPU: ``(z, c_prev) → (h, c[, kl])`` in one kernel call
forward and one backward (:mod:`bbservice.fused.build` compiles them).

``z`` ``(B, k·H)`` is the full pre-activation ``[gate blocks, g, o]`` of the step; the kernel
forms the gates (mean or sampled), updates c and h and, when asked, the per-unit prior KL
``(B, H)`` summed over the Gammas. Its backward recomputes the forward from ``z``, ``c_prev``
and the noise (nothing else is saved) and returns ``dz`` and ``dc_prev``.

Noise, three ways (``noise`` argument of :func:`fused_step`):

* :class:`StepNoise` ``(seed, step)``: drawn inside the kernel from a counter-based generator
  (SplitMix64 at position (seed, step, row, unit, Gamma)); Marsaglia–Tsang proposals are tried
  in order until one is accepted (up to 20; acceptance is above 95% each), so no random numbers
  cross memory and the draw is reproducible whatever the thread count. One seed per sequence
  comes from the torch generator.
* the eager format of :meth:`bbservice.gates.Gate.draw_noise` (``(eps, log_u_accept,
  log_u_boost)`` for the Beta families, a tensor for ``g2``): Marsaglia acceptance and redraws
  happen as in eager, then the kernel runs on the accepted noise — the same result as eager.
* ``None`` with ``mode="mean"``.

The noise actually used comes back (:attr:`FusedStepOutput.noise`, eager format with every
candidate accepted), so a test can replay any fused step in eager.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch
from torch import Tensor

from bbservice.fused.build import load
from bbservice.gates import GateConfig, NonFiniteAlphaError, accept_marsaglia_noise, softplus

FAMILY_IDS = {"lstm": 0, "mlstm": 0, "cifg": 1, "g2": 2, "beta": 3, "bbeta3": 4, "bbeta5": 5}
GATE_BLOCKS = {"lstm": 2, "mlstm": 2, "cifg": 1, "g2": 2, "beta": 4, "bbeta3": 3, "bbeta5": 5}
_MEAN, _NOISE_IN, _RNG = 0, 1, 2


class StepNoise(NamedTuple):
    """In-kernel noise of one step: ``seed`` of the sequence and the ``step`` index."""

    seed: int
    step: int


class SequenceNoise:
    """In-kernel noise of a sequence: one seed (one draw from the torch generator);
    ``noise[t]`` is the :class:`StepNoise` of step ``t``."""

    def __init__(self, generator: torch.Generator | None = None, device=None) -> None:
        self.seed = draw_seed(generator, device)

    def __getitem__(self, step: int) -> StepNoise:
        return StepNoise(self.seed, step)


def draw_seed(generator: torch.Generator | None = None, device=None) -> int:
    """A 63-bit seed from ``generator`` (or torch's default generator of ``device``)."""
    device = generator.device if generator is not None else device
    return int(torch.randint(2**63 - 1, (1,), generator=generator, device=device).item())


class _Params(ctypes.Structure):
    _fields_ = [
        ("batch", ctypes.c_int64),
        ("hidden", ctypes.c_int64),
        ("alpha_eps", ctypes.c_double),
        ("kl_alpha0", ctypes.c_double),
        ("g2_tau", ctypes.c_double),
        ("g2_prob", ctypes.c_double),
        ("seed", ctypes.c_uint64),
        ("step", ctypes.c_uint64),
        *[
            (name, ctypes.c_void_p)
            for name in (
                "z", "c_prev", "h", "c", "eps", "lub", "gates", "kl",
                "grad_h", "grad_c", "grad_kl", "grad_z", "grad_c_prev",
            )
        ],
        ("save_log", ctypes.c_int64),
    ]  # fmt: skip


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def supported(config: GateConfig, z: Tensor) -> bool:
    """Whether the fused kernels can run this step (else the caller runs eager): a plain CPU
    float32/float64 tensor, the default Marsaglia sampler, and no export or compile tracing."""
    return (
        type(z) is torch.Tensor
        and z.device.type == "cpu"
        and z.dtype in (torch.float32, torch.float64)
        and config.gamma_sampler == "marsaglia"
        and not config.reference_sample_eps
        and not torch.onnx.is_in_onnx_export()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and load() is not None
    )


class _Spec(NamedTuple):
    """What a kernel call computes: the family (and its hyper-parameters), the noise mode
    (0 mean, 1 noise passed in, 2 drawn in the kernel) and the layer name for errors."""

    config: GateConfig
    family: int
    n_gate: int  # gate blocks
    mode: int
    where: str
    save_log: bool = False  # Beta, RNG: keep log G and d log G / d alpha instead of the noise


def make_spec(config: GateConfig, mode: int, where: str) -> _Spec:
    return _Spec(config, FAMILY_IDS[config.family], GATE_BLOCKS[config.family], mode, where)


def _params(spec: _Spec, batch: int, hidden: int, seed: int = 0, step: int = 0) -> _Params:
    c = spec.config
    return _Params(batch, hidden, c.alpha_eps, c.kl_alpha0, c.g2_tau, c.g2_noise_prob, seed, step)


def _check(status: int, spec: _Spec) -> None:
    if status == 1:
        raise NonFiniteAlphaError(spec.where, spec.config.family)
    if status == 2:
        raise RuntimeError(f"{spec.where}: every Marsaglia proposal of an entry was rejected")
    if status != 0:
        raise RuntimeError(f"{spec.where}: fused kernel failed with status {status}")


def _run(fn_name: str, dtype: torch.dtype, spec: _Spec, params: _Params) -> None:
    lib = load()
    fn = getattr(lib, f"{fn_name}_{'f32' if dtype == torch.float32 else 'f64'}")
    _check(fn(spec.family, spec.mode, ctypes.byref(params)), spec)


def noise_width(spec: _Spec, hidden: int) -> int:
    """Columns of one step's noise: 2H for ``g2``, n·H for the Beta families."""
    return 2 * hidden if spec.config.family == "g2" else spec.n_gate * hidden


def kernel_forward(
    spec: _Spec,
    z: Tensor,
    c_prev: Tensor,
    h: Tensor,
    c: Tensor,
    eps: Tensor | None = None,
    lub: Tensor | None = None,
    gates: Tensor | None = None,
    kl: Tensor | None = None,
    seed: int = 0,
    step: int = 0,
) -> None:
    """One forward kernel call on contiguous tensors (outputs written in place): ``h``, ``c``;
    ``eps``/``lub`` (noise, written in RNG mode, read otherwise), ``gates``, ``kl`` optional."""
    batch, hidden = c_prev.shape
    p = _params(spec, batch, hidden, seed, step)
    p.z, p.c_prev, p.h, p.c = z.data_ptr(), c_prev.data_ptr(), h.data_ptr(), c.data_ptr()
    p.eps, p.lub, p.gates, p.kl = _ptr(eps), _ptr(lub), _ptr(gates), _ptr(kl)
    _run("bb_fused_forward", z.dtype, spec, p)


def kernel_backward(
    spec: _Spec,
    z: Tensor,
    c_prev: Tensor,
    eps: Tensor | None,
    lub: Tensor | None,
    grad_h: Tensor | None,
    grad_c: Tensor | None,
    grad_kl: Tensor | None,
    grad_z: Tensor,
    grad_c_prev: Tensor,
) -> None:
    """One backward kernel call on contiguous tensors: writes ``grad_z``, ``grad_c_prev``."""
    batch, hidden = c_prev.shape
    p = _params(spec, batch, hidden)
    p.z, p.c_prev, p.eps, p.lub = z.data_ptr(), c_prev.data_ptr(), _ptr(eps), _ptr(lub)
    p.grad_h, p.grad_c, p.grad_kl = _ptr(grad_h), _ptr(grad_c), _ptr(grad_kl)
    p.grad_z, p.grad_c_prev = grad_z.data_ptr(), grad_c_prev.data_ptr()
    backward_spec = spec._replace(mode=_MEAN if spec.mode == _MEAN else _NOISE_IN)
    _run("bb_fused_backward", z.dtype, backward_spec, p)


class KernelCaller:
    """Repeated kernel calls of one sequence with one parameter block: only the pointers change
    between steps (a few µs less Python per step than :func:`kernel_forward`)."""

    def __init__(self, spec: _Spec, dtype: torch.dtype, batch: int, hidden: int, seed: int = 0):
        lib = load()
        suffix = "f32" if dtype == torch.float32 else "f64"
        self.spec = spec
        self._fwd = getattr(lib, f"bb_fused_forward_{suffix}")
        self._bwd = getattr(lib, f"bb_fused_backward_{suffix}")
        self._fwd_mode = spec.mode
        self._bwd_mode = _MEAN if spec.mode == _MEAN else _NOISE_IN
        self.params = _params(spec, batch, hidden, seed, 0)
        self._ref = ctypes.byref(self.params)

    def forward(self, step, z, c_prev, h, c, eps=None, lub=None, kl=None) -> None:
        p = self.params
        p.step = step
        p.z, p.c_prev, p.h, p.c = z.data_ptr(), c_prev.data_ptr(), h.data_ptr(), c.data_ptr()
        p.eps, p.lub, p.kl = _ptr(eps), _ptr(lub), _ptr(kl)
        _check(self._fwd(self.spec.family, self._fwd_mode, self._ref), self.spec)

    def backward(self, z, c_prev, eps, lub, grad_h, grad_c, grad_kl, grad_z, grad_c_prev):
        p = self.params
        p.z, p.c_prev, p.eps, p.lub = z.data_ptr(), c_prev.data_ptr(), _ptr(eps), _ptr(lub)
        p.grad_h, p.grad_c, p.grad_kl = _ptr(grad_h), _ptr(grad_c), _ptr(grad_kl)
        p.grad_z, p.grad_c_prev = grad_z.data_ptr(), grad_c_prev.data_ptr()
        _check(self._bwd(self.spec.family, self._bwd_mode, self._ref), self.spec)


def _forward_outputs(spec, z, c_prev, eps, lub, want_kl, want_gates):
    """Fresh output tensors of a forward call (and the noise buffers in RNG mode)."""
    batch, hidden = c_prev.shape
    h, c = torch.empty_like(c_prev), torch.empty_like(c_prev)
    if spec.mode == _RNG:
        eps = z.new_empty(batch, noise_width(spec, hidden))
        lub = torch.empty_like(eps) if spec.config.family != "g2" else None
    kl = z.new_empty(batch, hidden) if want_kl else None
    gates = z.new_empty(batch, 2 * hidden) if want_gates else None
    return h, c, kl, eps, lub, gates


class _FusedStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, c_prev, spec, eps, lub, seed, step, want_kl, want_gates):
        z, c_prev = z.contiguous(), c_prev.contiguous()
        h, c, kl, eps, lub, gates = _forward_outputs(spec, z, c_prev, eps, lub, want_kl, want_gates)
        kernel_forward(spec, z, c_prev, h, c, eps, lub, gates, kl, seed, step)
        ctx.spec, ctx.want_kl = spec, want_kl
        ctx.save_for_backward(z, c_prev, eps, lub)
        ctx.mark_non_differentiable(*[t for t in (eps, lub, gates) if t is not None])
        return h, c, kl, eps, lub, gates

    @staticmethod
    def backward(ctx, grad_h, grad_c, grad_kl, *_):
        z, c_prev, eps, lub = ctx.saved_tensors
        grad_z, grad_c_prev = torch.empty_like(z), torch.empty_like(c_prev)
        grads = [None if g is None else g.contiguous() for g in (grad_h, grad_c, grad_kl)]
        if not ctx.want_kl:
            grads[2] = None
        kernel_backward(ctx.spec, z, c_prev, eps, lub, *grads, grad_z, grad_c_prev)
        return grad_z, grad_c_prev, None, None, None, None, None, None, None


class FusedStepOutput(NamedTuple):
    """``h``, ``c`` ``(B, H)``; ``kl`` ``(B, H)`` per-unit prior KL or ``None``; ``gates``
    ``(B, 2H)`` = ``[i | f]`` (no gradient) or ``None``; ``noise``: the noise used (``eps`` for
    ``g2``, ``(eps, log_u_boost)`` for the Beta families, ``None`` for deterministic gates;
    :func:`as_eager_noise` turns it into eager noise)."""

    h: Tensor
    c: Tensor
    kl: Tensor | None
    gates: Tensor | None
    noise: object


def fused_step(
    config: GateConfig,
    z: Tensor,
    c_prev: Tensor,
    mode: str,
    noise: object = None,
    *,
    want_kl: bool = False,
    want_gates: bool = False,
    where: str = "gated cell",
    generator: torch.Generator | None = None,
) -> FusedStepOutput:
    """One fused step (see the module docstring). ``z`` ``(B, k·H)``, ``c_prev`` ``(B, H)``;
    ``mode`` ``"sample"`` or ``"mean"``; ``where`` names the layer in errors. ``noise=None``
    in sample mode draws a fresh seed from ``generator``."""
    family = config.family
    n_gate = GATE_BLOCKS[family]
    stochastic = family in ("g2", "beta", "bbeta3", "bbeta5")
    sample = mode == "sample" and stochastic
    eps = lub = None
    seed = step = 0
    kernel_mode = _MEAN
    if sample:
        if noise is None:
            noise = StepNoise(draw_seed(generator, z.device), 0)
        if isinstance(noise, StepNoise):
            kernel_mode, seed, step = _RNG, noise.seed, noise.step
        else:
            kernel_mode = _NOISE_IN
            if family == "g2":
                eps = noise.contiguous()
            else:
                hidden = c_prev.shape[1]
                eps, log_u_accept, lub = noise
                alpha = softplus(z[:, : n_gate * hidden].detach()) + config.alpha_eps
                eps = accept_marsaglia_noise(alpha, eps, log_u_accept, generator, where=where)
                eps, lub = eps.contiguous(), lub.contiguous()
    spec = make_spec(config, kernel_mode, where)
    if torch.is_grad_enabled() and (z.requires_grad or c_prev.requires_grad):
        h, c, kl, eps, lub, gates = _FusedStep.apply(
            z, c_prev, spec, eps, lub, seed, step, want_kl, want_gates
        )
    else:  # no autograd node: call the kernel directly
        h, c, kl, eps, lub, gates = _forward_outputs(
            spec, z.contiguous(), c_prev.contiguous(), eps, lub, want_kl, want_gates
        )
        kernel_forward(
            spec, z.contiguous(), c_prev.contiguous(), h, c, eps, lub, gates, kl, seed, step
        )
    used = (eps if family == "g2" else (eps, lub)) if sample else None
    return FusedStepOutput(h, c, kl, gates, used)


def as_eager_noise(noise: object) -> object:
    """The noise of :attr:`FusedStepOutput.noise` in the format of
    :meth:`bbservice.gates.Gate.draw_noise` (every Marsaglia candidate marked accepted)."""
    if isinstance(noise, tuple):
        eps, lub = noise
        return eps, torch.full_like(eps, -torch.inf), lub
    return noise


def sequence_spec(config: GateConfig, mode: str, where: str) -> _Spec:
    """The spec of a sequence's kernel calls: in-kernel noise for sampled stochastic gates,
    mean otherwise."""
    stochastic = config.family in ("g2", "beta", "bbeta3", "bbeta5")
    return make_spec(config, _RNG if mode == "sample" and stochastic else _MEAN, where)
