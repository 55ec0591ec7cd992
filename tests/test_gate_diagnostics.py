"""Gate diagnostics: gate values without padding, i/f correlation, gradient norms, pictures."""

import json

import numpy as np
import pytest
import torch

from bbservice import checkpoints
from bbservice.models.music import MusicConfig, PianoRollModel
from training import common
from training.gate_diagnostics import (
    GradNormMeter,
    cell_gradient_norms,
    diagnose,
    gate_summary,
    gate_values,
    gradient_by_lag,
)


def model(family, hidden=6, seed=0):
    torch.manual_seed(seed)
    return PianoRollModel(MusicConfig.preset(family, hidden_size=hidden, num_layers=2))


def songs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.random((n, 88)) < 0.1).astype(np.float32) for n in lengths]


def test_gate_values_leave_out_padding_and_restore_the_model():
    m = model("lstm").train()
    seqs = songs([5, 9, 1, 12])  # the 1-frame sequence predicts nothing
    layers = gate_values(m, seqs, batch_size=3)
    assert len(layers) == 2
    for layer in layers:
        assert layer["i"].shape == layer["f"].shape == (4 + 8 + 11, 6)
        assert 0 <= layer["i"].min() and layer["f"].max() <= 1
    assert m.training and not m.rnn.record_gate_stats
    # the same frames one sequence at a time give the same values (padding changes nothing)
    alone = np.concatenate([gate_values(m, [s])[0]["f"] for s in sorted(seqs, key=len)[1:]])
    np.testing.assert_allclose(np.sort(alone, axis=None), np.sort(layers[0]["f"], axis=None),
                               atol=1e-6)  # fmt: skip


def test_summary_correlation_and_saturation():
    (cifg,) = gate_summary(gate_values(model("cifg"), songs([10, 7]))[:1])
    assert cifg["corr_if"] == pytest.approx(-1.0, abs=1e-5)  # coupled: i = 1 − f
    rows = gate_summary(
        [{"i": np.array([0.0, 0.5, 1.0, 0.5]), "f": np.array([0.2, 0.4, 0.6, 0.4])}]
    )
    assert rows[0]["i_saturated"] == 0.5 and rows[0]["f_saturated"] == 0.0
    assert rows[0]["corr_if"] == pytest.approx(1.0) and rows[0]["i_mean"] == 0.5
    sampled = gate_values(model("bbeta5"), songs([8]), mode="sample", seed=3)
    again = gate_values(model("bbeta5"), songs([8]), mode="sample", seed=3)
    np.testing.assert_array_equal(sampled[1]["i"], again[1]["i"])


def test_cell_gradient_norm_meter():
    m = model("bbeta5")
    x = torch.from_numpy(np.stack(songs([6, 6])))
    meter = GradNormMeter()
    expected = []
    for _ in range(2):
        m.zero_grad()
        logits, _ = m(x)
        logits.square().mean().backward()
        norms = meter.update(m.rnn)
        manual = [
            float(torch.sqrt(sum(p.grad.square().sum() for p in cell.parameters())))
            for cell in m.rnn.cells
        ]
        assert norms == pytest.approx(manual, rel=1e-5)
        expected.append(manual)
    record = meter.epoch_record()
    means = np.mean(expected, axis=0)
    assert record["cell_grad_norm_l0"] == pytest.approx(means[0], rel=1e-5)
    assert record["cell_grad_norm"] == pytest.approx(float(np.linalg.norm(means)), rel=1e-5)
    assert meter.epoch_record() == {}  # reset for the next epoch
    assert cell_gradient_norms(model("lstm").rnn) == [0.0, 0.0]  # no backward yet
    assert cell_gradient_norms(m.rnn.cells[1]) == pytest.approx([manual[1]], rel=1e-5)  # one cell


def test_gradient_by_lag():
    lag = gradient_by_lag(model("lstm"), songs([20, 30, 4]), lags=8)
    assert lag.shape == (8,) and np.all(lag >= 0) and lag[0] > 0
    with pytest.raises(ValueError, match="longer than"):
        gradient_by_lag(model("lstm"), songs([4]), lags=8)


def test_diagnose_writes_the_pictures(tmp_path):
    data = {s: [[[60, 64], [62], [64, 67]] * 8] * 3 for s in ("train", "valid", "test")}
    (tmp_path / "d.json").write_text(json.dumps(data))
    runs = []
    for family in ("lstm", "bbeta5"):
        m = model(family)
        run = tmp_path / family
        config = {
            "kind": "music",
            "model": m.config.to_dict(),
            "train": {"data": str(tmp_path / "d.json")},
        }
        checkpoints.save_checkpoint(run / "best", m, config)
        for epoch in (1, 2):
            common.append_jsonl(
                run / "metrics.jsonl", {"epoch": epoch, "cell_grad_norm": 1.0 / epoch}
            )
        runs.append(run)
    report = diagnose(runs, tmp_path / "out", lags=4)
    assert set(report) == {"lstm", "bbeta5"}
    assert report["bbeta5"]["cell_grad_norm"] == [1.0, 0.5]
    assert len(report["lstm"]["layers"]) == 2 and len(report["lstm"]["gradient_by_lag"]) == 4
    for name in ("gates_hist.png", "gates_joint.png", "gradient_lag.png", "grad_norm.png"):
        assert (tmp_path / "out" / name).stat().st_size > 1000
    assert json.loads((tmp_path / "out" / "gates.json").read_text())["lstm"]["layers"]
