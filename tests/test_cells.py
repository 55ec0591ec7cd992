"""The gated cell and stacked layers: nn.LSTM parity, masks, modes, errors, parameter counts."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from bbservice.cells import GatedLSTM, GatedLSTMCell, LockedDropout
from bbservice.errors import ConfigError
from bbservice.gates import GATE_FAMILIES, GateConfig

TOL = {"atol": 2e-6, "rtol": 1e-5}


def music_model_params(family: str, hidden: int) -> int:
    """2-layer 88-in gated RNN plus the 88-out linear layer."""
    rnn = GatedLSTM(88, hidden, num_layers=2, gate=family)
    return sum(p.numel() for p in rnn.parameters()) + hidden * 88 + 88


@pytest.mark.parametrize(
    "family,hidden,expected",
    [
        ("lstm", 200, 569_688),
        ("bbeta5", 148, 566_336),
        ("bbeta3", 177, 565_249),
        ("beta", 161, 567_774),
    ],
)
def test_parameter_budget_of_gates_md(family, hidden, expected):
    assert music_model_params(family, hidden) == expected


@pytest.mark.parametrize("family", GATE_FAMILIES)
def test_parameters_per_layer_are_k_h_d_h_1(family):
    if family == "mlstm":
        pytest.skip("mlstm has the extra m projections W_mx, W_mh")
    k = {"lstm": 4, "cifg": 3, "g2": 4, "beta": 6, "bbeta3": 5, "bbeta5": 7}[family]
    cell = GatedLSTMCell(10, 7, gate=family)
    assert sum(p.numel() for p in cell.parameters()) == k * 7 * (10 + 7 + 1)


def test_cell_matches_nn_lstmcell():
    torch.manual_seed(0)
    ref = nn.LSTMCell(5, 8)
    cell = GatedLSTMCell(5, 8)
    with torch.no_grad():
        cell.weight_ih.copy_(ref.weight_ih)
        cell.weight_hh.copy_(ref.weight_hh)
        cell.bias.copy_(ref.bias_ih + ref.bias_hh)
    x, h, c = torch.randn(3, 5), torch.randn(3, 8), torch.randn(3, 8)
    for got, want in zip(cell(x, (h, c)), ref(x, (h, c)), strict=True):
        torch.testing.assert_close(got, want, **TOL)
    for got, want in zip(cell(x[0]), ref(x[0]), strict=True):  # unbatched
        torch.testing.assert_close(got, want, **TOL)
    with torch.no_grad():  # the inference path (pre-packed weights)
        for got, want in zip(cell(x, (h, c)), ref(x, (h, c)), strict=True):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("grad", [True, False])
def test_stacked_matches_nn_lstm(batch_first, grad):
    torch.manual_seed(0)
    ref = nn.LSTM(6, 9, num_layers=3, batch_first=batch_first)
    ours = GatedLSTM(6, 9, num_layers=3, batch_first=batch_first).load_torch_lstm(ref)
    batch = 9  # >= PACKED_MIN_BATCH: without grad this runs the pre-packed oneDNN path
    x = torch.randn(batch, 11, 6) if batch_first else torch.randn(11, batch, 6)
    hx = (torch.randn(3, batch, 9), torch.randn(3, batch, 9))
    tol = TOL if grad else {"atol": 2e-5, "rtol": 1e-4}
    with torch.set_grad_enabled(grad):
        for args in [(x,), (x, hx)]:
            out, (h, c) = ours(*args)
            ref_out, (ref_h, ref_c) = ref(*args)
            torch.testing.assert_close(out, ref_out, **tol)
            torch.testing.assert_close(h, ref_h, **tol)
            torch.testing.assert_close(c, ref_c, **tol)


def test_gradients_match_nn_lstm():
    torch.manual_seed(0)
    ref = nn.LSTM(6, 9, num_layers=2)
    ours = GatedLSTM(6, 9, num_layers=2).load_torch_lstm(ref)
    x = torch.randn(7, 3, 6)
    ref(x)[0].square().sum().backward()
    ours(x)[0].square().sum().backward()
    torch.testing.assert_close(ours.cells[1].weight_hh.grad, ref.weight_hh_l1.grad, **TOL)
    torch.testing.assert_close(ours.cells[0].bias.grad, ref.bias_ih_l0.grad, **TOL)


def test_unbatched_input_matches_nn_lstm():
    torch.manual_seed(0)
    ref = nn.LSTM(4, 5, num_layers=2)
    ours = GatedLSTM(4, 5, num_layers=2).load_torch_lstm(ref)
    x = torch.randn(6, 4)
    out, (h, c) = ours(x)
    ref_out, (ref_h, ref_c) = ref(x)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(h, ref_h, **TOL)


@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_input_matches_nn_lstm(enforce_sorted):
    torch.manual_seed(0)
    ref = nn.LSTM(5, 7, num_layers=2)
    ours = GatedLSTM(5, 7, num_layers=2).load_torch_lstm(ref)
    lengths = torch.tensor([9, 7, 4, 1]) if enforce_sorted else torch.tensor([4, 9, 1, 7])
    x = torch.randn(9, 4, 5)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    out, (h, c) = ours(packed)
    ref_out, (ref_h, ref_c) = ref(packed)
    torch.testing.assert_close(out.data, ref_out.data, **TOL)
    assert torch.equal(out.batch_sizes, ref_out.batch_sizes)
    torch.testing.assert_close(h, ref_h, **TOL)
    torch.testing.assert_close(c, ref_c, **TOL)


@pytest.mark.parametrize("family", GATE_FAMILIES)
def test_padded_batch_gives_each_sequence_its_own_result(family):
    torch.manual_seed(0)
    rnn = GatedLSTM(5, 6, num_layers=2, gate=family).eval()
    lengths = torch.tensor([8, 3, 5])
    x = torch.randn(8, 3, 5)
    x[3:, 1] = 99.0  # padding garbage must not leak into sequence 1
    out, (h, c) = rnn(x, lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        alone, (h1, c1) = rnn(x[:n, b : b + 1])
        torch.testing.assert_close(out[:n, b : b + 1], alone, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(h[:, b : b + 1], h1, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(c[:, b : b + 1], c1, atol=2e-5, rtol=1e-4)
        assert (out[n:, b] == 0).all()


@pytest.mark.parametrize("family", ["g2", "beta", "bbeta3", "bbeta5"])
def test_seeded_sampling_is_reproducible_and_differs_from_mean(family):
    rnn = GatedLSTM(4, 6, num_layers=2, gate=family, dropout=0.3)
    x = torch.randn(10, 3, 4)
    torch.manual_seed(123)
    a, _ = rnn(x)  # training mode: sampled gates, locked dropout
    torch.manual_seed(123)
    b, _ = rnn(x)
    assert torch.equal(a, b)
    rnn.eval()
    m1, _ = rnn(x)
    m2, _ = rnn(x)
    assert torch.equal(m1, m2)
    assert not torch.allclose(a, m1)
    s1, _ = rnn(x, gate_mode="sample")  # Monte-Carlo on an eval model
    assert not torch.allclose(s1, m1)
    g = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)
    torch.testing.assert_close(
        rnn(x, gate_mode="sample", generator=g)[0], rnn(x, gate_mode="sample", generator=g2)[0]
    )


def test_gate_mode_attribute_and_validation():
    rnn = GatedLSTM(3, 4, gate="bbeta5").eval()
    x = torch.randn(5, 2, 3)
    mean, _ = rnn(x)
    rnn.gate_mode = "sample"
    sampled, _ = rnn(x)
    assert not torch.allclose(mean, sampled)
    with pytest.raises(ConfigError, match="unknown gate mode 'noisy'"):
        rnn(x, gate_mode="noisy")


def test_kl_prior_is_available_after_forward_and_masked_by_lengths():
    torch.manual_seed(0)
    rnn = GatedLSTM(3, 4, num_layers=2, gate=GateConfig(family="bbeta5", kl_weight=0.5))
    x = torch.randn(6, 2, 3)
    rnn(x)
    full = rnn.last_kl
    assert full.item() > 0 and full.requires_grad
    torch.testing.assert_close(rnn.kl_loss(), 0.5 * full)
    rnn(x, lengths=torch.tensor([6, 2]))
    assert rnn.last_kl.item() < full.item()
    plain = GatedLSTM(3, 4, gate="bbeta5")
    plain(x)
    assert plain.last_kl is None and plain.kl_loss().item() == 0.0


def test_gate_statistics_shapes_and_meaning():
    rnn = GatedLSTM(3, 4, num_layers=2, gate="bbeta5").eval()
    rnn.record_gate_stats = True
    rnn(torch.randn(5, 2, 3))
    stats = rnn.last_gate_stats
    assert len(stats) == 2
    assert set(stats[0]) == {"i", "f", "i_mean", "f_mean", "i_concentration", "f_concentration"}
    assert stats[0]["i"].shape == (5, 2, 4)
    torch.testing.assert_close(stats[1]["i"], stats[1]["i_mean"])  # mean mode: gates are means
    assert (stats[0]["i_concentration"] > 0).all()


def test_g2_reduces_to_lstm_with_no_noise_and_unit_temperature():
    torch.manual_seed(0)
    lstm = GatedLSTM(4, 5, gate="lstm")
    g2 = GatedLSTM(4, 5, gate=GateConfig(family="g2", g2_noise_prob=0.0, g2_tau=1.0))
    g2.load_state_dict(lstm.state_dict())
    x = torch.randn(6, 2, 4)
    torch.testing.assert_close(g2(x, gate_mode="sample")[0], lstm(x)[0])


def test_mlstm_forget_bias_and_shapes():
    torch.manual_seed(0)
    cell = GatedLSTMCell(4, 5, gate="mlstm")
    assert cell.bias[5:10].mean() > 0.5  # forget bias initialised to about 1
    out, (h, c) = GatedLSTM(4, 5, num_layers=2, gate="mlstm")(torch.randn(3, 2, 4))
    assert out.shape == (3, 2, 5) and h.shape == (2, 2, 5)


def test_bad_arguments_name_the_problem():
    rnn = GatedLSTM(3, 4, num_layers=2)
    with pytest.raises(ConfigError, match="unknown gate family"):
        GatedLSTM(3, 4, gate="sigmoid")
    with pytest.raises(ConfigError, match="rank 2 or 3"):
        rnn(torch.randn(2, 3, 4, 3))
    with pytest.raises(ConfigError, match="input has 5 features but the cell expects input_size=3"):
        rnn(torch.randn(2, 3, 5))
    with pytest.raises(ConfigError, match=r"hx h has shape \(1, 3, 4\), expected \(2, 3, 4\)"):
        rnn(torch.randn(2, 3, 3), (torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)))
    with pytest.raises(ConfigError, match="lengths must be"):
        rnn(torch.randn(2, 3, 3), lengths=torch.tensor([3, 1, 1]))
    with pytest.raises(ConfigError, match="num_layers"):
        GatedLSTM(3, 4, num_layers=0)
    with pytest.raises(ConfigError, match="dropout"):
        GatedLSTM(3, 4, dropout=1.0)
    with pytest.raises(ConfigError, match=r"\(B, D\) or \(D,\)"):
        GatedLSTMCell(3, 4)(torch.randn(1, 2, 3))


def test_locked_dropout_shares_mask_over_time():
    torch.manual_seed(0)
    drop = LockedDropout(0.5).train()
    y = drop(torch.ones(20, 3, 8))
    assert torch.equal(y[0], y[-1]) and set(y.unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(drop.eval()(torch.ones(2, 2)), torch.ones(2, 2))


def test_padded_packed_roundtrip_output_order():
    rnn = GatedLSTM(2, 3, gate="bbeta5").eval()
    x = torch.randn(5, 3, 2)
    lengths = torch.tensor([2, 5, 3])
    packed_out, _ = rnn(pack_padded_sequence(x, lengths, enforce_sorted=False))
    padded, out_lengths = pad_packed_sequence(packed_out)
    direct, _ = rnn(x, lengths=lengths)
    assert torch.equal(out_lengths, lengths)
    torch.testing.assert_close(padded, direct)
