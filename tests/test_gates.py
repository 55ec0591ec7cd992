"""Facts of GATES.md about the gate families themselves (mean, sample, KL, stability)."""

import math

import pytest
import torch
from scipy import stats

from bbservice.errors import ConfigError
from bbservice.fused import StepNoise, draw_seed, fused_step
from bbservice.gates import (
    GATE_FAMILIES,
    GateConfig,
    accept_marsaglia_noise,
    alpha_from_preactivation,
    gamma_kl,
    gate_blocks,
    log_gamma_implicit,
    log_gamma_marsaglia,
    make_gate,
    ratio_of_exp_sums,
    softplus,
    tanh,
)


def preact_for_alpha(alpha: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """z with softplus(z) + eps == alpha (inverse softplus)."""
    a = alpha.double() - eps
    return torch.where(a > 30, a, torch.log(torch.expm1(a.clamp_min(1e-300))))


def sample_gates(family: str, alpha: list[float], n: int, path: str = "eager", **cfg) -> tuple:
    """n sampled (i, f) pairs for one unit with the given Gamma concentrations, from the eager
    gates or from the fused kernel (its in-kernel noise, seeded from torch's generator)."""
    config = GateConfig(family=family, **cfg)
    gate = make_gate(config)
    z = preact_for_alpha(torch.tensor(alpha))  # (k,) float64: float32 rounds i to 1.0
    z = z.view(1, -1).expand(n, -1).contiguous()  # (n, k·1): H = 1
    if path == "fused":
        z_full = torch.cat([z, torch.zeros(n, 2, dtype=z.dtype)], dim=1)  # g, o blocks
        noise = StepNoise(draw_seed(), 0)
        out = fused_step(
            config, z_full, torch.zeros(n, 1, dtype=z.dtype), "sample", noise, want_gates=True
        )
        return out.gates[:, 0], out.gates[:, 1], gate.mean(z[:1])
    noise = gate.draw_noise(1, n, 1, z)[0]
    out = gate.sample(z, noise)
    return out.i.squeeze(1), out.f.squeeze(1), gate.mean(z[:1])


def test_block_counts():
    expected = {"lstm": 4, "cifg": 3, "g2": 4, "beta": 6, "bbeta3": 5, "bbeta5": 7, "mlstm": 4}
    assert {f: gate_blocks(f) for f in GATE_FAMILIES} == expected


def test_unknown_family_and_bad_config_name_the_problem():
    with pytest.raises(ConfigError, match="unknown gate family 'bbeta7'"):
        GateConfig(family="bbeta7")
    with pytest.raises(ConfigError, match="kl_weight > 0 needs a Beta gate family"):
        GateConfig(family="lstm", kl_weight=1.0)
    with pytest.raises(ConfigError, match="g2_noise_prob"):
        GateConfig(family="g2", g2_noise_prob=1.5)


def test_fast_primitives_match_torch():
    z = torch.linspace(-60, 60, 10001)
    torch.testing.assert_close(softplus(z), torch.nn.functional.softplus(z), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(tanh(z / 10), torch.tanh(z / 10), atol=1e-6, rtol=0)
    a, b, c, d = (torch.randn(1000) * s for s in (1, 50, 500, 5))
    expect = torch.sigmoid(torch.logaddexp(a, b) - torch.logaddexp(c, d))
    torch.testing.assert_close(ratio_of_exp_sums((a, b), (c, d)), expect)


@pytest.mark.parametrize(
    "family,alpha",
    [
        ("beta", [0.7, 2.0, 3.0, 0.4]),
        ("bbeta3", [0.7, 2.0, 1.3]),
        ("bbeta5", [1.0, 1.0, 3.0, 0.1, 0.1]),
        ("bbeta5", [0.5, 0.5, 0.5, 0.5, 0.5]),
    ],
)
@pytest.mark.parametrize("path", ["eager", "fused"])
def test_monte_carlo_mean_matches_mean_gate(family, alpha, path):
    torch.manual_seed(0)
    i, f, mean = sample_gates(family, alpha, 200_000, path)
    assert abs(i.mean().item() - mean.i.item()) < 4e-3
    assert abs(f.mean().item() - mean.f.item()) < 4e-3


@pytest.mark.parametrize(
    "sampler,path", [("marsaglia", "eager"), ("implicit", "eager"), ("marsaglia", "fused")]
)
@pytest.mark.parametrize(
    "family,alpha,marginal_i",
    [
        ("beta", [0.7, 2.0, 3.0, 0.4], (0.7, 2.0)),
        ("bbeta3", [0.3, 2.0, 1.3], (0.3, 1.3)),
        ("bbeta5", [1.0, 1.0, 3.0, 0.1, 0.1], (4.0, 0.2)),
        ("bbeta5", [0.05, 0.5, 0.02, 2.0, 0.5], (0.07, 2.5)),
    ],
)
def test_sampled_input_gate_follows_its_beta_marginal(family, alpha, marginal_i, sampler, path):
    torch.manual_seed(1)
    i, _, _ = sample_gates(family, alpha, 20_000, path, gamma_sampler=sampler)
    result = stats.kstest(i.double().numpy(), "beta", args=marginal_i)
    assert result.pvalue > 1e-3, result


def test_ks_test_can_fail_on_the_wrong_marginal():
    torch.manual_seed(1)
    i, _, _ = sample_gates("beta", [0.7, 2.0, 3.0, 0.4], 20_000)
    assert stats.kstest(i.double().numpy(), "beta", args=(0.9, 2.0)).pvalue < 1e-6


@pytest.mark.parametrize(
    "family,alpha,expected",
    [
        ("bbeta5", [1, 1, 3, 0.1, 0.1], -0.20),
        ("bbeta5", [1, 1, 0.1, 0.1, 3], 0.22),
        ("bbeta5", [0.5] * 5, -0.22),
        ("bbeta3", [1.0, 1.0, 1.0], None),
    ],
)
@pytest.mark.parametrize("path", ["eager", "fused"])
def test_correlation_signs(family, alpha, expected, path):
    torch.manual_seed(2)
    i, f, _ = sample_gates(family, alpha, 200_000, path)
    corr = torch.corrcoef(torch.stack([i, f]))[0, 1].item()
    if expected is None:
        assert corr > 0.1  # bbeta3 shares G3: always positive
    else:
        assert abs(corr - expected) < 0.02


@pytest.mark.parametrize("family", ["beta", "bbeta3", "bbeta5"])
@pytest.mark.parametrize("alpha", [1e-3, 1e-2, 1e3])
@pytest.mark.parametrize("sampler", ["marsaglia", "implicit"])
def test_extreme_concentrations_give_finite_gates_and_gradients(family, alpha, sampler):
    torch.manual_seed(3)
    gate = make_gate(GateConfig(family=family, gamma_sampler=sampler))
    hidden, batch = 16, 256
    z = preact_for_alpha(torch.full((batch, gate.n_blocks * hidden), alpha)).float()
    z.requires_grad_(True)
    for mode in ("sample", "mean"):
        out = gate(z, mode)
        for g in (out.i, out.f):
            assert torch.isfinite(g).all() and (g >= 0).all() and (g <= 1).all()
        (out.i.sum() + out.f.sum()).backward()
        assert torch.isfinite(z.grad).all()
        z.grad = None


def test_reference_mode_adds_eps_and_biases_small_alpha_towards_half():
    torch.manual_seed(4)
    alpha = [0.01, 0.01, 0.01, 0.01]
    ref_i, _, _ = sample_gates("beta", alpha, 50_000, reference_sample_eps=True)
    ours_i, _, _ = sample_gates("beta", alpha, 50_000)
    # Beta(0.01, 0.01) puts almost all mass near 0 and 1; the +1e-3 rule pulls it to 0.5.
    assert ((ours_i > 0.05) & (ours_i < 0.95)).float().mean() < 0.05
    assert ((ref_i > 0.05) & (ref_i < 0.95)).float().mean() > 0.5


def test_cifg_couples_gates():
    gate = make_gate(GateConfig(family="cifg"))
    out = gate(torch.randn(4, 8), "mean")
    torch.testing.assert_close(out.i + out.f, torch.ones(4, 8))


def test_g2_without_noise_at_unit_temperature_is_sigmoid():
    gate = make_gate(GateConfig(family="g2", g2_noise_prob=0.0, g2_tau=1.0))
    z = torch.randn(5, 6)
    out = gate(z, "sample")
    torch.testing.assert_close(torch.cat([out.i, out.f], 1), torch.sigmoid(z))


def test_g2_noise_density_matches_p():
    torch.manual_seed(5)
    gate = make_gate(GateConfig(family="g2", g2_noise_prob=0.2))
    noise = gate.draw_noise(10, 100, 50, torch.zeros(1))
    assert abs((noise != 0).float().mean().item() - 0.2) < 0.01


@pytest.mark.parametrize("family", GATE_FAMILIES)
def test_mean_mode_is_deterministic(family):
    gate = make_gate(GateConfig(family=family))
    z = torch.randn(3, gate.n_blocks * 4)
    a, b = gate(z, "mean"), gate(z, "mean")
    assert torch.equal(a.i, b.i) and torch.equal(a.f, b.f)


def test_kl_closed_form_matches_torch_distributions():
    alpha = torch.tensor([1e-3, 0.1, 0.5, 1.0, 3.0, 50.0], dtype=torch.float64)
    for alpha0 in (0.5, 2.0):
        expected = torch.distributions.kl_divergence(
            torch.distributions.Gamma(alpha, torch.ones_like(alpha)),
            torch.distributions.Gamma(torch.full_like(alpha, alpha0), torch.ones_like(alpha)),
        )
        torch.testing.assert_close(gamma_kl(alpha, alpha0), expected)
    assert gamma_kl(torch.tensor([0.5]), 0.5).item() == 0.0


def test_gate_kl_sums_over_units_and_gammas():
    gate = make_gate(GateConfig(family="bbeta5", kl_weight=1.0))
    z = torch.randn(2, 5 * 3)
    alpha = alpha_from_preactivation(z)
    torch.testing.assert_close(gate.kl(alpha), gamma_kl(alpha, 0.5).sum(1))


@pytest.mark.parametrize("family", ["g2", "beta", "bbeta3", "bbeta5", "cifg"])
def test_gradcheck_mean_path(family):
    gate = make_gate(GateConfig(family=family))
    z = torch.randn(2, gate.n_blocks * 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: tuple(gate(z, "mean")[:2]), (z,))


@pytest.mark.parametrize("family", ["beta", "bbeta3", "bbeta5"])
def test_gradcheck_sampled_path_with_noise_passed_in(family):
    torch.manual_seed(6)
    gate = make_gate(GateConfig(family=family))
    z = torch.randn(2, gate.n_blocks * 3, dtype=torch.float64)
    eps, log_u_accept, log_u_boost = gate.draw_noise(1, 2, 3, z)[0]
    eps = accept_marsaglia_noise(alpha_from_preactivation(z), eps, log_u_accept)
    always_accept = torch.full_like(log_u_accept, -math.inf)
    z.requires_grad_(True)
    check = torch.autograd.gradcheck(
        lambda z: tuple(gate.sample(z, (eps, always_accept, log_u_boost))[:2]), (z,)
    )
    assert check


def test_gradcheck_log_gamma_marsaglia():
    alpha = torch.tensor([0.05, 0.7, 3.0], dtype=torch.float64, requires_grad=True)
    eps = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    log_u = torch.tensor([-0.5, -2.0, -0.1], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: log_gamma_marsaglia(a, eps, log_u), (alpha,))


@pytest.mark.parametrize("alpha", [0.01, 0.3, 1.0, 5.0])
def test_log_space_gamma_samplers_have_gamma_law(alpha):
    torch.manual_seed(7)
    a = torch.full((30_000,), alpha, dtype=torch.float64)
    log_u = torch.log(torch.rand_like(a))
    eps = accept_marsaglia_noise(a, torch.randn_like(a), torch.log(torch.rand_like(a)))
    law = stats.gamma(alpha)

    def cdf(log_x):  # compare on the log scale: G underflows for small alpha, log G does not
        return law.cdf(torch.as_tensor(log_x).exp().numpy())

    for log_g in (log_gamma_marsaglia(a, eps, log_u), log_gamma_implicit(a, log_u)):
        assert stats.kstest(log_g.numpy(), cdf).pvalue > 1e-3
        assert torch.isfinite(log_g).all()
