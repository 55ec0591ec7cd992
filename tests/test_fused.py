"""The fused kernels (bbservice.fused) against the eager reference: every family, sample and
mean modes, the same noise; gradcheck in float64; the switch, the fallback and the errors."""

import copy
import math
import warnings

import pytest
import torch

from bbservice import fused as fused_mod
from bbservice.cells import GatedLSTM, GatedLSTMCell
from bbservice.fused import StepNoise, as_eager_noise, build, draw_seed, fused_step
from bbservice.gates import (
    BETA_FAMILIES,
    GATE_FAMILIES,
    GateConfig,
    NonFiniteAlphaError,
    accept_marsaglia_noise,
    alpha_from_preactivation,
    make_gate,
)

STOCHASTIC = ("g2", *BETA_FAMILIES)
EXACT = {"atol": 1e-6, "rtol": 1e-6}
GRAD = {"atol": 1e-6, "rtol": 1e-5}
pytestmark = pytest.mark.skipif(build.load() is None, reason="no C++ compiler for the kernels")


def eager_step(config: GateConfig, z, c, mode, noise):
    """The reference: gates of bbservice.gates and the c/h update on z (B, k·H)."""
    gate = make_gate(config)
    hidden = c.shape[1]
    zgate, zg, zo = z.split([z.shape[1] - 2 * hidden, hidden, hidden], dim=1)
    out = gate(zgate, mode, noise)
    c_new = out.f * c + out.i * torch.tanh(zg)
    return torch.sigmoid(zo) * torch.tanh(c_new), c_new, out


def random_step(family, batch=6, hidden=5, dtype=torch.float32, scale=2.0):
    k = make_gate(GateConfig(family=family)).n_blocks + 2
    z = (torch.randn(batch, k * hidden, dtype=dtype) * scale).requires_grad_()
    c = torch.randn(batch, hidden, dtype=dtype).requires_grad_()
    return z, c


@pytest.mark.parametrize("mode", ["sample", "mean"])
@pytest.mark.parametrize("family", GATE_FAMILIES)
def test_step_equals_eager_with_the_same_noise(family, mode):
    torch.manual_seed(0)
    config = GateConfig(family=family)
    z, c = random_step(family)
    out = fused_step(config, z, c, mode, StepNoise(11, 3))
    noise = as_eager_noise(out.noise) if out.noise is not None else None
    h, c_new, _ = eager_step(config, z, c, mode, noise)
    torch.testing.assert_close(out.h, h, **EXACT)
    torch.testing.assert_close(out.c, c_new, **EXACT)
    gh, gc = torch.randn_like(h), torch.randn_like(h)
    fused_grads = torch.autograd.grad((out.h * gh).sum() + (out.c * gc).sum(), (z, c))
    eager_grads = torch.autograd.grad((h * gh).sum() + (c_new * gc).sum(), (z, c))
    for got, want in zip(fused_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, **GRAD)


@pytest.mark.parametrize("family", STOCHASTIC)
def test_eager_noise_passed_in_gives_the_eager_result(family):
    torch.manual_seed(1)
    config = GateConfig(family=family)
    gate = make_gate(config)
    z, c = random_step(family)
    noise = gate.draw_noise(1, z.shape[0], c.shape[1], z)[0]
    out = fused_step(config, z, c, "sample", noise, generator=torch.Generator().manual_seed(2))
    h, _, _ = eager_step(config, z, c, "sample", as_eager_noise(out.noise))
    torch.testing.assert_close(out.h, h, **EXACT)
    if family != "g2":  # the accepted candidates are the ones eager would accept
        eps, log_u_accept, _ = noise
        alpha = alpha_from_preactivation(z[:, : gate.n_blocks * c.shape[1]].detach())
        accepted = accept_marsaglia_noise(alpha, eps, log_u_accept, torch.Generator())
        kept = accepted == eps
        assert kept.float().mean() > 0.9
        assert torch.equal(out.noise[0][kept], eps[kept])


@pytest.mark.parametrize("mode", ["sample", "mean"])
@pytest.mark.parametrize("family", GATE_FAMILIES)
def test_gradcheck_float64(family, mode):
    torch.manual_seed(2)
    config = GateConfig(family=family, kl_weight=1.0 if family in BETA_FAMILIES else 0.0)
    z, c = random_step(family, batch=2, hidden=3, dtype=torch.float64, scale=1.0)
    noise = None
    if mode == "sample" and family in STOCHASTIC:  # fix the accepted noise, then perturb z
        noise = as_eager_noise(fused_step(config, z, c, mode, StepNoise(5, 0)).noise)
    want_kl = config.kl_weight > 0

    def fn(z, c):
        out = fused_step(config, z, c, mode, noise, want_kl=want_kl)
        return (out.h, out.c, out.kl) if want_kl else (out.h, out.c)

    assert torch.autograd.gradcheck(fn, (z, c))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("family", BETA_FAMILIES)
def test_step_kl_equals_eager(family, dtype):
    """Against eager in float64: exact in float64; in float32 within float32's own error on
    this sum (eager float32 is off the float64 value by as much: ~1e-4 relative)."""
    torch.manual_seed(3)
    config = GateConfig(family=family, kl_weight=1.0)
    z, c = random_step(family, scale=3.0, dtype=dtype)
    out = fused_step(config, z, c, "mean", want_kl=True)
    z64 = z.detach().double().requires_grad_()
    _, _, gates = eager_step(config, z64, c.detach().double(), "mean", None)
    want = make_gate(config).kl(gates.alpha)
    got_grad = torch.autograd.grad(out.kl.sum(), z)[0]
    want_grad = torch.autograd.grad(want.sum(), z64)[0]
    tol = {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 3e-4, "atol": 1e-4}
    torch.testing.assert_close(out.kl.sum(1).double(), want, **tol)
    torch.testing.assert_close(got_grad.double(), want_grad, **tol)


def _pair(family, **kw):
    torch.manual_seed(4)
    config = GateConfig(family=family, kl_weight=1.0 if family in BETA_FAMILIES else 0.0)
    fused = GatedLSTM(5, 6, gate=config, fused=True, **kw)
    eager = copy.deepcopy(fused)
    eager.fused = False
    return fused, eager


def _loss(model, out, h, c):
    kl = model.last_kl * 1e-2 if model.last_kl is not None else 0.0
    return out.square().sum() + h.sum() + c.square().sum() + kl


@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("family", GATE_FAMILIES)
def test_layer_mean_gates_equal_eager_forward_and_backward(family, with_lengths):
    fused, eager = _pair(family, num_layers=2)
    x = torch.randn(7, 4, 5)
    lengths = torch.tensor([7, 3, 5, 1]) if with_lengths else None
    results = []
    for model in (fused, eager):
        out, (h, c) = model(x, gate_mode="mean", lengths=lengths)
        grads = torch.autograd.grad(_loss(model, out, h, c), list(model.parameters()))
        results.append((out, h, c, model.last_kl, grads))
    (out, h, c, kl, grads), (out_e, h_e, c_e, kl_e, grads_e) = results
    for got, want in ((out, out_e), (h, h_e), (c, c_e)):
        torch.testing.assert_close(got, want, **EXACT)
    if kl_e is not None:
        torch.testing.assert_close(kl, kl_e, rtol=1e-5, atol=0)
    for got, want in zip(grads, grads_e, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # inference: pre-packed matmuls and direct kernel calls
        torch.testing.assert_close(
            fused.eval()(x, lengths=lengths)[0], eager.eval()(x, lengths=lengths)[0], **GRAD
        )


@pytest.mark.parametrize("family", STOCHASTIC)
def test_layer_sampled_gates_replay_in_eager(family):
    """The whole-sequence training node with in-kernel noise equals eager steps fed that noise."""
    fused, eager = _pair(family)
    x = torch.randn(6, 3, 5)
    out, (h, c) = fused(x, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad(_loss(fused, out, h, c), list(fused.parameters()))

    seed = draw_seed(torch.Generator().manual_seed(7))  # the layer's one draw
    cell = eager.cells[0]
    xp = cell.input_projection(x)
    h_t, c_t = cell.zero_state(3, x)
    outs, kl = [], 0.0
    for t, xp_t in enumerate(xp.unbind(0)):
        z = cell._preactivation(xp_t, h_t, None, c_t.dtype)
        used = fused_step(cell.config, z.detach(), c_t.detach(), "sample", StepNoise(seed, t))
        h_t, c_t, gates = cell._eager_step(z, c_t, "sample", as_eager_noise(used.noise), None)
        if gates.alpha is not None:
            kl = kl + cell.gate.kl(gates.alpha).sum()
        outs.append(h_t)
    out_e = torch.stack(outs)
    eager.last_kl = kl if family in BETA_FAMILIES else None
    grads_e = torch.autograd.grad(_loss(eager, out_e, h_t, c_t), list(eager.parameters()))
    torch.testing.assert_close(out, out_e, **EXACT)
    torch.testing.assert_close(c[0], c_t, **EXACT)
    for got, want in zip(grads, grads_e, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_in_kernel_noise_is_seeded():
    torch.manual_seed(5)
    model = GatedLSTM(4, 6, num_layers=2, gate="bbeta5")
    x = torch.randn(5, 3, 4)
    a = model(x, generator=torch.Generator().manual_seed(1))[0]
    b = model(x, generator=torch.Generator().manual_seed(1))[0]
    d = model(x, generator=torch.Generator().manual_seed(2))[0]
    assert torch.equal(a, b) and not torch.allclose(a, d)


@pytest.mark.parametrize("family", GATE_FAMILIES)
def test_cell_step_by_step_equals_eager(family):
    torch.manual_seed(6)
    cell = GatedLSTMCell(4, 5, gate=family, fused=True)
    ref = copy.deepcopy(cell)
    ref.fused = False
    x, h, c = torch.randn(3, 4), torch.randn(3, 5), torch.randn(3, 5)
    got, want = cell(x, (h, c), gate_mode="mean"), ref(x, (h, c), gate_mode="mean")
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **EXACT)


def _nan_model(family, sampler="marsaglia", reference=False, fused=True):
    config = GateConfig(family=family, gamma_sampler=sampler, reference_sample_eps=reference)
    model = GatedLSTM(3, 4, num_layers=2, gate=config, fused=fused)
    with torch.no_grad():
        model.cells[1].weight_hh.fill_(math.nan)
    return model


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "family,sampler,reference,fused",
    [
        ("bbeta5", "marsaglia", False, True),
        ("beta", "marsaglia", False, True),
        ("bbeta3", "marsaglia", False, False),
        ("bbeta5", "implicit", False, False),
        ("bbeta5", "marsaglia", True, False),
    ],
)
def test_non_finite_alpha_raises_naming_the_layer(family, sampler, reference, fused):
    model = _nan_model(family, sampler, reference, fused)
    with pytest.raises(NonFiniteAlphaError, match="GatedLSTM layer 1: non-finite Gamma"):
        model(torch.randn(4, 2, 3))


@pytest.mark.timeout(60)
def test_non_finite_alpha_in_the_sampler_itself_and_in_a_cell():
    alpha = torch.tensor([1.0, math.inf, math.nan])
    eps, log_u = torch.zeros(3), torch.zeros(3)
    with pytest.raises(NonFiniteAlphaError, match="somewhere"):
        accept_marsaglia_noise(alpha, eps, log_u, where="somewhere")
    cell = GatedLSTMCell(3, 4, gate="bbeta5").train()
    with torch.no_grad():
        cell.bias.fill_(math.inf)
    with pytest.raises(NonFiniteAlphaError, match="GatedLSTMCell"):
        cell(torch.randn(2, 3))


def test_switch_turns_the_kernels_off(monkeypatch):
    calls = []
    real_step, real_caller = fused_mod.step.kernel_forward, fused_mod.step.KernelCaller.forward

    def counting(real):
        def wrapped(*args, **kw):
            calls.append(1)
            return real(*args, **kw)

        return wrapped

    monkeypatch.setattr("bbservice.fused.step.kernel_forward", counting(real_step))
    monkeypatch.setattr("bbservice.fused.step.KernelCaller.forward", counting(real_caller))
    model = GatedLSTM(3, 4, gate="bbeta5")
    x = torch.randn(2, 2, 3)
    model(x)
    assert calls, "fused by default (training)"
    calls.clear()
    with torch.no_grad():
        model.eval()(x)
    assert calls, "fused by default (inference)"
    model.train()
    calls.clear()
    model.fused = False
    model(x)
    assert not calls
    model.fused = None
    fused_mod.set_enabled(False)
    try:
        model(x)
        assert not calls
    finally:
        fused_mod.set_enabled(True)
    with torch.no_grad():  # tracing (the ONNX exporter's path) keeps the plain ops
        torch.jit.trace(model.eval(), x, check_trace=False)
    assert not calls


def test_without_a_compiler_cells_run_eager_with_one_warning(monkeypatch):
    torch.manual_seed(0)
    model = GatedLSTM(3, 4, gate="bbeta3").eval()
    x = torch.randn(4, 2, 3)
    with torch.no_grad():
        with_kernels = model(x)[0]
    real_compiler = build.compiler
    monkeypatch.setattr(build, "compiler", lambda: None)
    monkeypatch.setattr(build, "_state", {})
    with pytest.warns(UserWarning, match=r"fused gate kernels unavailable.*no C\+\+ compiler"):
        assert build.load() is None
    assert build.unavailable_reason() == "no C++ compiler (g++/c++) found"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per process, not per call
        with torch.no_grad():
            eager = model(x)[0]
    torch.testing.assert_close(eager, with_kernels, **GRAD)
    monkeypatch.setattr(build, "compiler", real_compiler)
    monkeypatch.setattr(build, "_state", {})
    assert build.load() is not None  # the cached library, no rebuild
    assert build.unavailable_reason() is None
