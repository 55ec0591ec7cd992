"""Sparse variational dropout (bbservice.sparse): the KL approximation, the pruning rule, the
noise in training, pruning to a smaller dense model, its ONNX export (constant gates, matching
outputs, fewer parameters), the report, and a tiny ``--sparsify`` training run."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from bbservice.cli import main
from bbservice.models.music import MusicConfig, PianoRollModel, count_parameters
from bbservice.sparse import (
    SparseGatedLSTM,
    compare_pruned,
    dense_parameter_count,
    export_pruned_music,
    keep_mask,
    kl_log_uniform,
    log_alpha,
    prune_to_dense,
)
from export.onnx_export import GraphSpec, export_graph
from training.prune_report import format_report, prune_report

H = 8
BIG = 20.0  # log σ² that prunes any variable (log α clips to 8 > 3)


def sparse_model(family: str, seed: int = 0) -> PianoRollModel:
    torch.manual_seed(seed)
    return PianoRollModel(MusicConfig.preset(family, hidden_size=H, sparse=True)).eval()


@torch.no_grad()
def prune_some(model: PianoRollModel, seed: int = 0) -> None:
    """Prune on every level: weights, inputs, a dead hidden unit, pre-activation rows."""
    g = torch.Generator().manual_seed(seed)
    c0, c1 = model.rnn.cells
    c0.log_sigma2_ih[torch.rand(c0.weight_ih.shape, generator=g) < 0.5] = BIG
    c1.log_sigma2_hh[torch.rand(c1.weight_hh.shape, generator=g) < 0.4] = BIG
    c0.log_sigma2_x[:50] = BIG  # 50 of 88 keys unused
    c0.log_sigma2_h[5] = BIG  # unit 5 of layer 0: no recurrent reader ...
    c1.log_sigma2_x[5] = BIG  # ... and no reader above: dead
    c0.log_sigma2_z[[1, H + 2, 3 * H + 4]] = BIG  # three constant rows of layer 0
    c1.log_sigma2_z[2 * H : 2 * H + 3] = BIG


def test_kl_approximation_is_monotone_positive_and_vanishes():
    la = torch.linspace(-8, 8, 401, dtype=torch.float64)
    kl = kl_log_uniform(la)
    assert bool((kl.diff() < 0).all())  # more noise, closer to the prior
    assert float(kl.min()) >= 0.0 and float(kl[-1]) < 1e-3
    # GATES.md's form 0.5·log1p(e^{-la}) − 0.64·σ(1.5(la + 1.3)) agrees up to a constant
    gates_md = 0.5 * torch.nn.functional.softplus(-la) - 0.64 * torch.sigmoid(1.5 * (la + 1.3))
    offset = kl - gates_md
    assert float(offset.max() - offset.min()) < 0.03


def test_log_alpha_clipping_and_the_pruning_rule():
    theta = torch.tensor([1.0, 1.0, 1.0, 0.0])
    la = log_alpha(theta, torch.tensor([100.0, -100.0, 2.99, -5.0]))
    assert la.tolist()[:2] == [8.0, -8.0] and float(la[3]) == 8.0  # θ = 0: pruned
    assert keep_mask(torch.tensor([2.99, 3.0, 3.01])).tolist() == [True, True, False]


def test_sparse_lstm_call_noise_kl_and_masks():
    rnn = SparseGatedLSTM(5, H, num_layers=2, gate="bbeta5")
    x = torch.randn(7, 3, 5)
    rnn.train()
    out1, _ = rnn(x)
    out2, _ = rnn(x)
    assert out1.shape == (7, 3, H) and not torch.allclose(out1, out2)  # noise in training
    (out1.sum() + rnn.kl()).backward()
    copy.deepcopy(rnn)  # no autograd tensors left on the modules (export copies models)
    for name, p in rnn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    rnn.eval()
    a, _ = rnn(x)
    b, _ = rnn(x)
    assert torch.equal(a, b)
    assert [set(d) for d in rnn.log_alphas()] == [set(d) for d in rnn.masks()]
    assert rnn.kl().ndim == 0 and float(rnn.kl().detach()) > 0


def test_eval_uses_means_with_pruned_entries_zeroed():
    model = sparse_model("lstm")
    frames = (torch.rand(2, 6, 88) < 0.2).float()
    cell = model.rnn.cells[0]
    with torch.no_grad():
        cell.log_sigma2_ih[:, :10] = BIG
        before, _ = model(frames)
        cell.weight_ih[:, :10] = 123.0  # pruned θ do not matter ...
        cell.log_sigma2_ih[:, :10] = BIG + 20  # (θ grew; keep log α > 3)
        after, _ = model(frames)
    assert torch.allclose(before, after)
    w, _ = cell.effective_weights()
    assert bool((w[:, :10] == 0).all())


def test_old_configs_load_as_dense():
    cfg = MusicConfig.preset("lstm", hidden_size=H).to_dict()
    cfg.pop("sparse")
    assert MusicConfig.from_dict(cfg).sparse is False


@pytest.mark.parametrize("family", ["lstm", "bbeta5"])
def test_forced_constant_gate_is_constant_in_the_onnx_graph(family, tmp_path):
    model = sparse_model(family)
    unit = 3
    cell = model.rnn.cells[0]
    n_gate = cell.gate.n_blocks
    with torch.no_grad():  # every gate block of `unit` pruned: i and f constant
        cell.log_sigma2_z[[j * H + unit for j in range(n_gate)]] = BIG
    dense = prune_to_dense(model, min_row_saving=0.0)  # take even 1 constant row out
    pcell = dense.rnn.cells[0]
    assert pcell.weight_ih.shape[0] == (n_gate + 2) * H - n_gate  # constant rows dropped

    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = pcell

        def forward(self, x, h):
            i, f, _ = self.cell.gates(x, h)
            return i, f

    spec = GraphSpec("probe", Probe(), {"x": torch.rand(2, 88), "h": torch.rand(2, H)}, ["i", "f"])
    path = tmp_path / "probe.onnx"
    export_graph(spec, path, {})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x = (rng.random((6, 88)) < 0.3).astype(np.float32)
    h = rng.uniform(-1, 1, (6, H)).astype(np.float32)
    i, f = sess.run(["i", "f"], {"x": x, "h": h})
    b = cell.bias.detach()
    expect_i, expect_f, _ = cell.gate.mean(b[: n_gate * H].unsqueeze(0))
    if family == "lstm":
        assert np.allclose(expect_i[0, unit], torch.sigmoid(b[unit]))
    assert np.allclose(i[:, unit], float(expect_i[0, unit]), atol=1e-6)
    assert np.allclose(f[:, unit], float(expect_f[0, unit]), atol=1e-6)
    assert np.ptp(i[:, (unit + 1) % H]) > 1e-4  # other units still depend on the input
    report = prune_report(model)["layers"][0]["constant_gates"]
    assert report["i"]["constant_units"] == [unit] and report["f"]["constant_units"] == [unit]


@pytest.mark.parametrize("family", ["lstm", "bbeta5"])
@pytest.mark.parametrize("saving", [0.0, 0.5])
def test_pruned_dense_model_matches_and_is_smaller(family, saving):
    model = sparse_model(family)
    prune_some(model)
    dense = prune_to_dense(model, min_row_saving=saving, min_column_saving=saving)
    assert dense.widths == [H - 1, H]  # the dead unit is gone from h and c
    diff = compare_pruned(model, dense, steps=16)
    assert max(diff.values()) < 1e-5
    assert count_parameters(dense) < dense_parameter_count(model)
    frames = (torch.rand(2, 9, 88) < 0.2).float()
    with torch.no_grad():
        assert torch.allclose(model(frames)[0], dense(frames)[0], atol=1e-5)


def test_pruned_export_matches_the_sparse_model_on_ort(tmp_path):
    model = sparse_model("bbeta5", seed=1)
    prune_some(model, seed=1)
    result = export_pruned_music(
        model, tmp_path / "export", store=False, min_row_saving=0.0, min_column_saving=0.0
    )
    manifest = result.manifest
    assert manifest["verification"]["passed"]
    assert manifest["config"]["pruned"]["widths"] == [H - 1, H]
    path = tmp_path / "export" / "music_step.onnx"
    proto = onnx.load(str(path))
    n_init = sum(numpy_helper.to_array(t).size for t in proto.graph.initializer)
    assert n_init < dense_parameter_count(model)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    hmax = sess.get_inputs()[1].shape[2]
    rng = np.random.default_rng(0)
    b = 4
    h = c = np.zeros((2, b, hmax), np.float32)
    hs = cs = torch.zeros(2, b, H)
    for _ in range(10):
        frame = (rng.random((b, 88)) < 0.2).astype(np.float32)
        probs, h, c = sess.run(["probs", "h_out", "c_out"], {"frame": frame, "h": h, "c": c})
        with torch.no_grad():
            ref, hs, cs = model.step(torch.from_numpy(frame), hs, cs)
        assert np.abs(probs - ref.numpy()).max() < 1e-4


def test_prune_report_counts():
    model = sparse_model("lstm")
    prune_some(model)
    report = prune_report(model)
    json.dumps(report)
    lay0, lay1 = report["layers"]
    assert lay0["inputs"]["remaining"] == 38 and lay0["hidden"]["live_units"] == H - 1
    assert lay0["preactivations"]["remaining"] == 4 * H - 3
    assert lay0["constant_blocks"]["f"]["preact_pruned"] == [2]
    assert lay1["constant_blocks"]["g"]["constant_units"] == [0, 1, 2]
    assert report["totals"]["parameter_compression"] > 1
    assert "layer 0" in format_report(report)


def test_tiny_sparsify_training_run(tmp_path, capsys):
    rng = np.random.default_rng(0)

    def song():
        root = int(rng.integers(48, 60))
        return [[root + k % 3 * 4, root + 12] for k in range(int(rng.integers(8, 16)))]

    data = {s: [song() for _ in range(n)] for s, n in (("train", 12), ("valid", 4), ("test", 4))}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "run"
    argv = ["train", "music", "--data", str(path), "--out", str(out), "--gate", "lstm"]
    argv += ["--hidden", "12", "--epochs", "2", "--batch-size", "6", "--lr", "1e-2"]
    argv += ["--sparsify", "--sparse-kl-weight", "1", "--sparse-kl-warmup", "2"]
    assert main(argv) == 0
    assert "pruning report" in capsys.readouterr().out
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert 0 < records[0]["sparse_kl_weight"] < records[1]["sparse_kl_weight"] <= 1
    assert all(np.isfinite(r["valid_nll"]) and r["sparse_kl"] > 0 for r in records)
    report = json.loads((out / "prune_report.json").read_text())
    assert report["gate"] == "lstm" and (out / "best" / "prune_report.json").exists()
    assert main(["eval", "music", "--checkpoint", str(out)]) == 0
    captured = capsys.readouterr()
    assert "pruning report" in captured.err and "prune" in json.loads(captured.out)
    export = tmp_path / "export"
    assert main(["export", "music", str(out), "--out", str(export), "--no-store"]) == 0
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["verification"]["passed"] and "pruned" in manifest["config"]
