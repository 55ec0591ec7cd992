"""The pruning report (bbservice.prune_report) of sparse music and caption models."""

from __future__ import annotations

import json

import torch
from conftest import PRUNE_ALL, prune_some, tiny_caption_config
from conftest import SPARSE_H as H
from conftest import sparse_music_model as sparse_model

from bbservice.models.caption import CaptionModel
from bbservice.prune_report import caption_prune_report, format_report, prune_report


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


def test_caption_report_counts_embedding_and_context_inputs():
    torch.manual_seed(0)
    model = CaptionModel.build(tiny_caption_config()).eval()
    cell = model.decoder.cell
    with torch.no_grad():
        cell.log_sigma2_x[:3] = PRUNE_ALL  # 3 of the 8 embedding inputs
        cell.log_sigma2_x[8:80] = PRUNE_ALL  # 72 of the 128 context inputs
        cell.log_sigma2_z[[j * H + 1 for j in range(cell.n_blocks)]] = PRUNE_ALL  # unit 1
    report = caption_prune_report(model)
    json.dumps(report)
    (layer,) = report["layers"]
    assert layer["inputs"]["embedding_remaining"] == 5
    assert layer["inputs"]["context_remaining"] == cell.input_size - 8 - 72
    assert layer["constant_gates"]["i"]["constant_units"] == [1]
    assert layer["constant_gates"]["f"]["constant_units"] == [1]
    t = report["totals"]  # 75 of 136 input columns unused: the pruned cell gathers the rest
    assert t["pruned_cell_parameters"] < t["cell_parameters"]
    assert t["parameter_compression"] > 1
    assert "cell parameters" in format_report(report)
