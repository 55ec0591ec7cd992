"""Pruning sparse models to smaller dense ones (bbservice.pruning): constant gates are
constants in the ONNX graph, the pruned models match the sparse ones (music and captions), and
the pruned exports are smaller and verified."""

from __future__ import annotations

import runpy
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import PRUNE_ALL as BIG
from conftest import SPARSE_H as H
from conftest import prune_some, tiny_caption_config
from conftest import sparse_music_model as sparse_model
from onnx import numpy_helper

from bbservice.decoding import greedy, sample_gate_passes
from bbservice.errors import ConfigError
from bbservice.models.caption import CaptionModel, TorchCaptionStepper
from bbservice.models.music import PianoRollModel, count_parameters
from bbservice.prune_report import prune_report
from bbservice.pruning import (
    Compaction,
    compare_pruned,
    compare_pruned_caption,
    decoder_parameter_count,
    dense_parameter_count,
    prune_caption,
    prune_to_dense,
)
from bbservice.vocab import END_ID, START_ID
from export.onnx_export import GraphSpec, export_graph, export_music
from export.pruned import export_pruned_caption, export_pruned_music


@pytest.mark.parametrize("family", ["lstm", "bbeta5"])
def test_forced_constant_gate_is_constant_in_the_onnx_graph(family, tmp_path):
    model = sparse_model(family)
    unit = 3
    cell = model.rnn.cells[0]
    n_gate = cell.gate.n_blocks
    with torch.no_grad():  # every gate block of `unit` pruned: i and f constant
        cell.log_sigma2_z[[j * H + unit for j in range(n_gate)]] = BIG
    dense = prune_to_dense(model, Compaction(min_gate_saving=0.0))  # even 1 unit
    pcell = dense.rnn.cells[0]
    assert pcell.weight_ih.shape[0] == (n_gate + 2) * H - n_gate  # its gate rows are gone
    kept = dense.kept_units[0].tolist()
    pos, other = kept.index(unit), kept.index((unit + 1) % H)
    assert pos == H - 1  # units with constant gates go last

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
    assert np.allclose(i[:, pos], float(expect_i[0, unit]), atol=1e-6)
    assert np.allclose(f[:, pos], float(expect_f[0, unit]), atol=1e-6)
    assert np.ptp(i[:, other]) > 1e-4  # other units still depend on the input
    report = prune_report(model)["layers"][0]["constant_gates"]
    assert report["i"]["constant_units"] == [unit] and report["f"]["constant_units"] == [unit]


@pytest.mark.parametrize("family", ["lstm", "bbeta5"])
@pytest.mark.parametrize("saving", [0.0, 0.5])
def test_pruned_dense_model_matches_and_is_smaller(family, saving):
    model = sparse_model(family)
    prune_some(model)
    dense = prune_to_dense(model, Compaction(min_column_saving=saving, min_gate_saving=saving))
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
        model, tmp_path / "export", store=False, compaction=Compaction(0.0, 0.0)
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


# -- captions ---------------------------------------------------------------------------------

CONST_UNIT = 3  # every block of this decoder unit is pruned: i, f, g, o are constants


def sparse_caption(family: str, seed: int = 0) -> CaptionModel:
    """A tiny sparse caption model pruned on every level of its decoder cell."""
    torch.manual_seed(seed)
    model = CaptionModel.build(tiny_caption_config(family)).eval()
    cell = model.decoder.cell
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cell.log_sigma2_ih[torch.rand(cell.weight_ih.shape, generator=g) < 0.5] = BIG
        cell.log_sigma2_x[10:40] = BIG  # 30 context features unused
        cell.log_sigma2_h[2] = BIG  # h_{t-1} of unit 2 is no longer read by the cell
        cell.log_sigma2_z[[j * H + CONST_UNIT for j in range(cell.n_blocks)]] = BIG
    return model


@pytest.mark.parametrize("family", ["lstm", "bbeta5"])
def test_pruned_caption_model_matches_and_decodes_the_same(family):
    model = sparse_caption(family)
    pruned = prune_caption(model, Compaction(0.0, 0.0))
    pcell, cell = pruned.decoder.cell, model.decoder.cell
    assert pcell.n_constant_gates >= 1 and pcell.gate_perm is None  # constant units last
    assert CONST_UNIT in pruned.unit_order[-pcell.n_constant_gates :].tolist()
    rows = cell.n_blocks * H - cell.gate.n_blocks * pcell.n_constant_gates
    assert pcell.weight_ih.shape[0] == rows
    assert not set(range(10, 40)) & set(pcell.in_index.tolist())
    assert 2 not in pcell.rec_index.tolist()
    diff = compare_pruned_caption(model, pruned, steps=10)
    assert max(diff.values()) < 1e-5, diff
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)).numpy()
    kw = {"start_id": START_ID, "end_id": END_ID, "max_length": 6}
    a = greedy(TorchCaptionStepper(model), images, **kw)
    b = greedy(TorchCaptionStepper(pruned), images, **kw)
    assert [h.tokens for h in a] == [h.tokens for h in b]
    # gate sampling stays available on the PyTorch path of the pruned model
    sampler = TorchCaptionStepper(pruned, "sample", seed=0)
    passes = sample_gate_passes(sampler, images, passes=2, **kw)
    assert len(passes) == 3
    sparse_params = sum(p.numel() for p in model.decoder.parameters())
    dense_params = sum(p.numel() for p in pruned.decoder.parameters())
    assert dense_params < decoder_parameter_count(model) < sparse_params
    with pytest.raises(ConfigError, match="sparse=True"):
        prune_caption(CaptionModel.build(tiny_caption_config(family, sparse=False)))


def test_pruned_caption_export_has_constant_gates_and_matches(tmp_path):
    model = sparse_caption("bbeta5", seed=2)
    result = export_pruned_caption(
        model, tmp_path / "export", store=False, compaction=Compaction(0.0, 0.0)
    )
    manifest = result.manifest
    assert manifest["verification"]["passed"] and "pruned" in manifest["config"]
    path = tmp_path / "export" / "caption_step.onnx"
    shapes = [tuple(t.dims) for t in onnx.load(str(path)).graph.initializer]
    cell = model.decoder.cell
    assert (cell.n_blocks * H, cell.input_size) not in shapes  # the full W is gone
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    n = 5
    feeds = {
        "tokens": rng.integers(0, 11, n).astype(np.int64),
        "h": rng.uniform(-1, 1, (n, H)).astype(np.float32),
        "c": rng.uniform(-2, 2, (n, H)).astype(np.float32),
        "features": rng.uniform(0, 1, (n, 4, cell.input_size - 8)).astype(np.float32),
        "projected": rng.uniform(-1, 1, (n, 4, 8)).astype(np.float32),
    }
    log_probs, h_out, c_out = sess.run(["log_probs", "h_out", "c_out"], feeds)
    order = prune_caption(model, Compaction(0.0, 0.0)).unit_order  # the graph's unit numbering
    pos = order.tolist().index(CONST_UNIT)
    b = cell.bias.detach()
    n_gate = cell.gate.n_blocks
    i, f, _ = cell.gate.mean(b[: n_gate * H].unsqueeze(0))
    b_g, b_o = b[n_gate * H : (n_gate + 1) * H], b[(n_gate + 1) * H :]

    def constant_gate_c(unit: int, position: int):
        return float(f[0, unit]) * feeds["c"][:, position] + float(i[0, unit]) * np.tanh(
            float(b_g[unit])
        )

    assert np.allclose(c_out[:, pos], constant_gate_c(CONST_UNIT, pos), atol=1e-5)
    assert np.allclose(
        h_out[:, pos], torch.sigmoid(b_o[CONST_UNIT]).item() * np.tanh(c_out[:, pos]), atol=1e-5
    )
    other = int(order[0])
    assert not np.allclose(c_out[:, 0], constant_gate_c(other, 0), atol=1e-3)
    with torch.no_grad():  # and the graph agrees with the sparse PyTorch model
        t = {k: torch.from_numpy(v) for k, v in feeds.items()}
        back = torch.argsort(order)  # graph numbering → the sparse model's
        h, c = t["h"][:, back], t["c"][:, back]
        ref = model.decoder.step(t["tokens"], h, c, t["features"], "mean", t["projected"])
    assert np.abs(log_probs - ref[0].numpy()).max() < 1e-4
    assert np.abs(c_out - ref[2][:, order].numpy()).max() < 1e-4


@pytest.mark.parametrize("family", ["lstm", "bbeta5"])
@pytest.mark.parametrize("which", ["all", "first half", "last half"])
def test_constant_gates_are_precomputed_and_match(family, which, tmp_path):
    model = sparse_model(family, seed=3)
    cell = model.rnn.cells[1]
    units = {
        "all": list(range(H)),
        "first half": list(range(H // 2)),
        "last half": list(range(H // 2, H)),
    }[which]
    with torch.no_grad():
        for j in range(cell.gate.n_blocks):
            cell.log_sigma2_z[[j * H + u for u in units]] = BIG
    assert prune_to_dense(model, Compaction(min_gate_saving=1.0)).rnn.cells[1].n_constant_gates == (
        H if which == "all" else 0
    )  # 1: whole layers only
    dense = prune_to_dense(model)  # half of the units: above the default minimum
    pcell = dense.rnn.cells[1]
    assert pcell.n_constant_gates == len(units) and pcell.gate_perm is None  # placed last
    assert pcell.n_var == H - len(units)  # all constant: no gate math left
    assert pcell.weight_ih.shape[0] == (cell.n_blocks * H) - cell.gate.n_blocks * len(units)
    assert dense.rnn.cells[0].n_constant_gates == 0
    assert max(compare_pruned(model, dense, steps=10).values()) < 1e-5
    frame = (torch.rand(4, 88) < 0.2).float()
    h, c = dense.zero_state(4)
    positions = [dense.kept_units[1].tolist().index(u) for u in units]
    with torch.no_grad():
        i, f, _ = pcell.gates(torch.rand(4, H), torch.rand(4, H))
        assert torch.allclose(i[:, positions], i[:1, positions].expand(4, -1))  # constant
        mean_probs = dense.step(frame, h, c, "mean")[0]
        torch.manual_seed(0)
        sampled = dense.step(frame, h, c, "sample")[0]  # sampled gates still work
    assert sampled.shape == mean_probs.shape and torch.isfinite(sampled).all()
    if cell.gate.stochastic:
        assert not torch.allclose(sampled, mean_probs)
    if family == "bbeta5" and which == "all":
        result = export_pruned_music(model, tmp_path / "export", store=False)
        assert result.manifest["verification"]["passed"]


def test_bench_pruned_compares_exports(tmp_path, capsys):
    root = Path(__file__).resolve().parents[1]
    bench = runpy.run_path(str(root / "bench" / "bench_pruned.py"))
    model = sparse_model("bbeta5", seed=5)
    cell = model.rnn.cells[1]
    with torch.no_grad():
        cell.log_sigma2_z[: cell.gate.n_blocks * H] = BIG  # every gate of layer 1 constant
    dense_model = PianoRollModel(replace(model.config, sparse=False)).eval()
    export_music(dense_model, tmp_path / "dense", store=False)
    export_pruned_music(model, tmp_path / "pruned", store=False)
    argv = [str(tmp_path / "dense"), str(tmp_path / "pruned"), "--steps", "3", "--repeats", "1"]
    assert bench["main"](argv + ["--batch", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    dense_row, pruned_row = lines[1].split(), lines[2].split()
    assert dense_row[1] == "no" and pruned_row[1] == "yes"
    assert float(dense_row[-1]) == 1.0  # the baseline's ratio against itself
    assert int(pruned_row[4].replace(",", "")) < int(dense_row[4].replace(",", ""))


def test_a_pruned_readout_input_lets_the_top_unit_die():
    model = sparse_model("lstm", seed=6)
    top = model.rnn.cells[1]
    with torch.no_grad():
        top.log_sigma2_h[4] = BIG  # layer 1 unit 4: no recurrent reader ...
        model.readout_neurons.log_sigma2[4] = BIG  # ... and the read-out does not read it
    dense = prune_to_dense(model)
    assert dense.widths == [H, H - 1] and 4 not in dense.kept_units[1].tolist()
    assert max(compare_pruned(model, dense).values()) < 1e-5
    assert prune_report(model)["totals"]["readout_inputs"]["remaining"] == H - 1
