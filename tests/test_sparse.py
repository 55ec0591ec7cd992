"""Sparse variational dropout (bbservice.sparse): the KL approximation, the pruning rule, the
noise in training (per sequence, also for step-by-step callers), evaluation with the means,
and a tiny ``--sparsify`` music training run through eval and export."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import PRUNE_ALL as BIG
from conftest import SPARSE_H as H
from conftest import sparse_music_model as sparse_model

from bbservice.cli import main
from bbservice.models.music import MusicConfig, PianoRollModel
from bbservice.sparse import (
    SparseGatedLSTM,
    SparseGatedLSTMCell,
    keep_mask,
    kl_log_uniform,
    log_alpha,
)


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


def test_sequence_noise_is_drawn_once_for_step_by_step_callers():
    torch.manual_seed(0)
    cell = SparseGatedLSTMCell(5, H, gate="lstm").train()
    with torch.no_grad():
        cell.log_sigma2_x.fill_(0.0)  # large input-neuron noise, so draws differ visibly
        cell.log_sigma2_ih.fill_(-40.0)  # no weight noise: the projection is deterministic
    x = torch.ones(2, 5)
    with cell.sequence_noise(2, x):
        a = cell.input_projection(x)
        b = cell.input_projection(x)
        pinned = {k: v.clone() for k, v in cell._pinned_noise.items()}
        cell.recurrent_matmuls(2)
        assert torch.equal(cell._pinned_noise["x"], pinned["x"])  # not consumed in the block
    assert cell._pinned_noise is None and cell._seq_noise is None
    with torch.no_grad():  # both steps used the pinned neuron and pre-activation noise
        mean = torch.nn.functional.linear(x * pinned["x"], cell.weight_ih) * pinned["z"]
        mean = mean + cell.bias
        assert (a - mean).abs().max() < 1e-3 and (b - mean).abs().max() < 1e-3
        c = cell.input_projection(x)  # outside: a fresh draw (input noise σ = 1)
        assert (c - mean).abs().max() > 0.2
    cell.eval()
    with cell.sequence_noise(2, x):  # nothing drawn in eval
        assert cell._pinned_noise is None


def test_old_configs_load_as_dense():
    cfg = MusicConfig.preset("lstm", hidden_size=H).to_dict()
    cfg.pop("sparse")
    assert MusicConfig.from_dict(cfg).sparse is False


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
    assert json.loads((out / "summary.json").read_text())["prune"] == report["totals"]
    assert main(["eval", "music", "--checkpoint", str(out)]) == 0
    captured = capsys.readouterr()
    assert "pruning report" in captured.err and "prune" in json.loads(captured.out)
    export = tmp_path / "export"
    assert main(["export", "music", str(out), "--out", str(export), "--no-store"]) == 0
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["verification"]["passed"] and "pruned" in manifest["config"]


def test_export_cli_pruning_options_reach_the_pruned_graph(tmp_path, capsys):
    import onnx
    from conftest import prune_some
    from safetensors.torch import save_file

    model = sparse_model("lstm", seed=2)
    prune_some(model)
    with torch.no_grad():  # unit 6 of layer 0: constant i and f (1 of 7 units: below 0.25)
        model.rnn.cells[0].log_sigma2_z[[6, H + 6]] = BIG
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(ckpt / "model.safetensors"))
    config = {"kind": "music", "model": model.config.to_dict()}
    (ckpt / "config.json").write_text(json.dumps(config))
    rows = {}
    for option, out in ((None, "default"), ("0", "all")):
        argv = ["export", "music", str(ckpt), "--out", str(tmp_path / out), "--no-store"]
        if option is not None:
            argv += ["--min-gate-saving", option]
        assert main(argv) == 0
        manifest = json.loads((tmp_path / out / "manifest.json").read_text())
        expected = 0.25 if option is None else float(option)
        assert manifest["config"]["pruned"]["compaction"]["min_gate_saving"] == expected
        graph = onnx.load(str(tmp_path / out / "music_step.onnx")).graph
        rows[out] = {tuple(t.dims)[0] for t in graph.initializer if len(t.dims) == 2}
    width = 4 * (H - 1)  # layer 0 lost its dead unit
    assert width - 2 in rows["all"] and width in rows["default"]  # unit 6's i and f rows out
    capsys.readouterr()
    bad = ["export", "music", str(ckpt), "--out", str(tmp_path / "bad"), "--min-gate-saving", "2"]
    assert main(bad) == 2
    assert "--min-gate-saving must be in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_readout_neurons_noise_kl_and_pruning():
    model = sparse_model("lstm")
    neurons = model.readout_neurons
    assert neurons is not None and neurons.theta.shape == (H,)
    frames = (torch.rand(2, 5, 88) < 0.2).float()
    model.train()
    with torch.no_grad():
        neurons.log_sigma2.fill_(0.0)  # visible noise
        a, _ = model(frames)
        b, _ = model(frames)
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        neurons.log_sigma2[:3] = BIG
        kl_rnn = model.rnn.kl()
        assert torch.allclose(model.sparse_kl(), kl_rnn + neurons.kl())
        assert model.sparsity()["readout"] == 3 / H
        x, _ = model(frames)
        model.readout.weight[:, :3] = 99.0  # pruned inputs are not read
        y, _ = model(frames)
    assert torch.allclose(x, y)
    dense = PianoRollModel(MusicConfig.preset("lstm", hidden_size=H))
    assert dense.readout_neurons is None


def test_bad_sparse_options_fail_before_any_work(tmp_path, capsys):
    data = "no-such-data.json"  # the options are refused before the data is read
    argv = ["train", "music", "--data", data, "--out", str(tmp_path / "run"), "--sparsify"]
    assert main([*argv, "--sparse-kl-weight", "-1"]) == 2
    assert "--sparse-kl-weight and --sparse-kl-warmup must be >= 0" in capsys.readouterr().err
    assert main([*argv, "--gate", "mlstm"]) == 2
    assert "does not support the 'mlstm' family" in capsys.readouterr().err
    assert main([*argv, "--sparse-lr-scale", "0"]) == 2
    assert "--sparse-lr-scale must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_variational_parameters_get_their_own_learning_rate():
    from training.sparse_training import is_variational, split_parameters

    model = sparse_model("bbeta5")
    names = {id(p): n for n, p in model.named_parameters()}
    groups = split_parameters(model, 1e-3, 10.0)
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    variational = {names[id(p)] for p in groups[1]["params"]}
    assert {"readout_neurons.theta", "rnn.cells.0.log_sigma2_ih", "rnn.cells.1.theta_z"} <= (
        variational
    )
    assert {"rnn.cells.0.weight_ih", "readout.weight", "rnn.cells.1.bias"}.isdisjoint(variational)
    assert len(variational) + len(groups[0]["params"]) == len(names)
    assert not is_variational("rnn.cells.0.weight_hh")
    assert len(split_parameters(model, 1e-3, 1.0)) == 1


def test_eval_effective_weights_are_cached_until_a_parameter_changes():
    cell = SparseGatedLSTMCell(5, H, gate="lstm").eval()
    with torch.no_grad():
        w1, _ = cell.effective_weights()
        assert cell.effective_weights()[0] is w1  # cached while nothing changes
        cell.weight_ih[0, 0] += 1.0  # in place: the version counter moves
        w2, _ = cell.effective_weights()
        assert w2 is not w1 and float(w2[0, 0] - w1[0, 0]) == pytest.approx(1.0)
        cell.load_state_dict({k: v.clone() for k, v in cell.state_dict().items()})
        assert cell.effective_weights()[0] is not w2
    w3, _ = cell.effective_weights()  # with autograd: computed fresh, with a graph
    assert w3.requires_grad
    cell.train()
    with torch.no_grad():
        assert cell.effective_weights()[0] is not cell.effective_weights()[0]
