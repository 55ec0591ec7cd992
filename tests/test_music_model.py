"""The piano-roll model: presets, shapes, the exported step, NLL helpers."""

import math

import numpy as np
import pytest
import torch

from bbservice.errors import ConfigError
from bbservice.models.music import (
    BUDGET_HIDDEN,
    MusicConfig,
    PianoRollModel,
    count_parameters,
    frame_nll_sum,
    probability_nll_sum,
)
from bbservice.music_generation import GenerationParams, generate_rolls, tempered


@pytest.mark.parametrize("family", sorted(BUDGET_HIDDEN))
def test_presets_sit_at_the_parameter_budget(family):
    n = count_parameters(PianoRollModel(MusicConfig.preset(family)))
    assert abs(n - 570_000) / 570_000 < 0.01, n


def test_config_roundtrip_and_errors():
    cfg = MusicConfig.preset("bbeta5", kl_weight=1.0, dropout=0.1)
    again = MusicConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.gate.kl_weight == 1.0
    with pytest.raises(ConfigError, match="unknown gate family"):
        MusicConfig.preset("gru")


@pytest.mark.parametrize("family", ["lstm", "bbeta5", "mlstm"])
def test_step_equals_sequence_forward_with_mean_gates(family):
    torch.manual_seed(0)
    model = PianoRollModel(MusicConfig.preset(family, hidden_size=16, num_layers=2)).eval()
    frames = (torch.rand(3, 7, 88) < 0.1).float()
    logits, _ = model(frames)
    h, c = model.zero_state(3)
    for t in range(7):
        probs, h, c = model.step(frames[:, t], h, c)
        torch.testing.assert_close(probs, torch.sigmoid(logits[:, t]), atol=1e-5, rtol=1e-4)


def test_nll_helpers_agree_and_mask():
    logits = torch.randn(2, 5, 88)
    targets = (torch.rand(2, 5, 88) < 0.2).float()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]).float()
    a = frame_nll_sum(logits, targets, mask)
    b = probability_nll_sum(torch.sigmoid(logits), targets, mask)
    torch.testing.assert_close(a.double(), b, atol=1e-3, rtol=1e-5)
    half = probability_nll_sum(torch.full((1, 1, 88), 0.5), targets[:1, :1])
    assert math.isclose(float(half), 88 * math.log(2), rel_tol=1e-9)


class _FixedStepper:
    """Probabilities that depend only on the previous frame (a toy model)."""

    def start(self, batch):
        return {"t": np.zeros(batch)}

    def step(self, frame, state):
        probs = np.full(frame.shape, 0.05, dtype=np.float32)
        probs[:, 40] = 0.9
        return probs, {"t": state["t"] + 1}


def test_generation_is_seeded_and_shaped():
    params = GenerationParams(frames=32, seed=3, num_outputs=2)
    a = generate_rolls(_FixedStepper(), params)
    b = generate_rolls(_FixedStepper(), params)
    assert a.shape == (2, 32, 88) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert a[:, :, 40].mean() > 0.7 and a[:, :, 0].mean() < 0.2
    primer = np.zeros((5, 88), np.uint8)
    primer[:, 60] = 1
    c = generate_rolls(_FixedStepper(), params, primer)
    assert c.shape == (2, 37, 88) and (c[:, :5, 60] == 1).all()
    cold = generate_rolls(_FixedStepper(), GenerationParams(frames=64, temperature=0.1, seed=3))
    assert cold[:, :, 0].sum() == 0  # low temperature sharpens 0.05 towards 0


def test_generation_params_are_validated():
    for bad in ({"frames": 0}, {"temperature": 0.0}, {"num_outputs": 100}, {"seed": -1}):
        with pytest.raises(ConfigError):
            GenerationParams(**bad)
    p = np.array([0.2, 0.5, 0.8])
    assert np.allclose(tempered(p, 1.0), p) and tempered(p, 0.5)[0] < 0.2
