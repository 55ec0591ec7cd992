"""What sparse variational dropout pruned (``log α > 3``), per layer of a sparse model.

:func:`prune_report` (piano-roll models) and :func:`caption_prune_report` (the caption decoder's
cell) → a JSON-ready dict: per layer the remaining weights (W and U, after all
three levels), input features, hidden units (variables kept, and units still live: able to
reach the read-out), gate pre-activations, the blocks and gates that became constant (with
their constant values: ``σ(b)`` for sigmoid blocks, ``tanh(b)`` for g, ``softplus(b) + eps``
for the Gamma concentrations of the Beta families, and the resulting i / f), and totals with
the compression ratios. :func:`format_report` renders it as text; :func:`write_report` writes
``prune_report.json``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bbservice import checkpoints
from bbservice.gates import BETA_FAMILIES, alpha_from_preactivation
from bbservice.models.music import count_parameters
from bbservice.pruning import (
    decoder_parameter_count,
    dense_parameter_count,
    live_units,
    prune_caption,
    prune_to_dense,
)
from bbservice.sparse import GATE_DEPENDENCIES, PRUNE_THRESHOLD, SparseGatedLSTMCell, block_names

REPORT_NAME = "prune_report.json"


def _count(mask: torch.Tensor) -> dict[str, int | float]:
    total, kept = mask.numel(), int(mask.sum())
    return {"total": total, "remaining": kept, "fraction": round(kept / max(total, 1), 6)}


def _block_value(family: str, name: str, b: torch.Tensor, eps: float) -> torch.Tensor:
    if name == "g":
        return torch.tanh(b)
    if name == "o" or family not in BETA_FAMILIES:
        return torch.sigmoid(b)
    return alpha_from_preactivation(b, eps)


@torch.no_grad()
def cell_report(cell: SparseGatedLSTMCell, layer: int, live: torch.Tensor | None = None) -> dict:
    """One layer of the report (``live``: bool ``(H,)`` units still read; default all)."""
    family, hid = cell.config.family, cell.hidden_size
    names = block_names(family)
    masks = cell.masks()
    w, u = (t.cpu() for t in cell.effective_weights())
    b = cell.bias.detach().cpu() if cell.bias is not None else torch.zeros(w.shape[0])
    const_rows = ~((w != 0).any(1) | (u != 0).any(1))
    preact_pruned = ~masks["preact"].cpu()
    blocks = {}
    for j, name in enumerate(names):
        rows = slice(j * hid, (j + 1) * hid)
        units = const_rows[rows].nonzero().squeeze(1)
        values = _block_value(family, name, b[rows][units], cell.config.alpha_eps)
        blocks[name] = {
            "preact_pruned": preact_pruned[rows].nonzero().squeeze(1).tolist(),
            "constant_units": units.tolist(),
            "values": [round(float(v), 6) for v in values],
        }
    n_gate = cell.gate.n_blocks
    gate_out = cell.gate.mean(b[: n_gate * hid].unsqueeze(0))
    gates = {}
    for gname, deps, value in zip(("i", "f"), GATE_DEPENDENCIES[family], gate_out[:2], strict=True):
        const = torch.stack([const_rows[d * hid : (d + 1) * hid] for d in deps]).all(0)
        units = const.nonzero().squeeze(1)
        gates[gname] = {
            "constant_units": units.tolist(),
            "values": [round(float(v), 6) for v in value[0, units]],
        }
    live_count = hid if live is None else int(live.sum())
    return {
        "layer": layer,
        "weights_ih": {**_count(w != 0), "variables_kept": int(masks["weight_ih"].sum())},
        "weights_hh": {**_count(u != 0), "variables_kept": int(masks["weight_hh"].sum())},
        "inputs": {**_count(masks["input"]), "used": int((w != 0).any(0).sum())},
        "hidden": {**_count(masks["hidden"]), "live_units": live_count},
        "preactivations": {**_count(masks["preact"]), "constant_rows": int(const_rows.sum())},
        "constant_blocks": blocks,
        "constant_gates": gates,
    }


def _weight_totals(layers: list[dict]) -> dict:
    total = sum(lay[k]["total"] for lay in layers for k in ("weights_ih", "weights_hh"))
    left = sum(lay[k]["remaining"] for lay in layers for k in ("weights_ih", "weights_hh"))
    return {
        "threshold_log_alpha": PRUNE_THRESHOLD,
        "recurrent_weights": total,
        "recurrent_weights_remaining": left,
        "weight_compression": round(total / max(left, 1), 4),
    }


@torch.no_grad()
def prune_report(model) -> dict:
    """The report of a sparse :class:`~bbservice.models.music.PianoRollModel` (on any device)."""
    was_training = model.training
    model.eval()
    rnn = model.rnn
    live = live_units(model)
    layers = [cell_report(cell, k, live[k]) for k, cell in enumerate(rnn.cells)]
    dense = prune_to_dense(model)
    dense_params, pruned_params = dense_parameter_count(model), count_parameters(dense)
    totals = {
        **_weight_totals(layers),
        "dense_parameters": dense_params,
        "pruned_dense_parameters": pruned_params,
        "parameter_compression": round(dense_params / max(pruned_params, 1), 4),
        "layer_widths": dense.widths,
        "readout_inputs": _count(model.readout_neurons.mask().cpu()),
        "sparsity": {k: round(v, 6) for k, v in model.sparsity().items()},
    }
    model.train(was_training)
    return {
        "kind": "music",
        "gate": rnn.config.family,
        "hidden_size": rnn.hidden_size,
        "layers": layers,
        "totals": totals,
    }


@torch.no_grad()
def caption_prune_report(model) -> dict:
    """The report of a sparse :class:`~bbservice.models.caption.CaptionModel`'s decoder cell.

    The cell's inputs are ``[embedding (E), β·context (C)]``; ``inputs`` says how many of each
    remain. Totals compare the dense decoder (and its cell alone) with the pruned one.
    """
    was_training = model.training
    model.eval()
    cell = model.decoder.cell
    layer = cell_report(cell, 0)
    keep = cell.masks()["input"].cpu()
    e = model.config.embed_dim
    layer["inputs"]["embedding_remaining"] = int(keep[:e].sum())
    layer["inputs"]["context_remaining"] = int(keep[e:].sum())
    pruned = prune_caption(model)
    pcell = pruned.decoder.cell
    k = cell.n_blocks
    cell_dense = k * cell.hidden_size * (cell.input_size + cell.hidden_size + 1)
    constants = pcell.gate_i.numel() + pcell.gate_f.numel()  # the precomputed gates
    cell_pruned = sum(p.numel() for p in pcell.parameters()) + constants
    dense_params = decoder_parameter_count(model)
    pruned_params = sum(p.numel() for p in pruned.decoder.parameters()) + constants
    totals = {
        **_weight_totals([layer]),
        "cell_parameters": cell_dense,
        "pruned_cell_parameters": cell_pruned,
        "cell_compression": round(cell_dense / max(cell_pruned, 1), 4),
        "dense_parameters": dense_params,
        "pruned_dense_parameters": pruned_params,
        "parameter_compression": round(dense_params / max(pruned_params, 1), 4),
        "sparsity": {k: round(v, 6) for k, v in cell.sparsity().items()},
    }
    model.train(was_training)
    return {
        "kind": "caption",
        "gate": cell.config.family,
        "hidden_size": cell.hidden_size,
        "layers": [layer],
        "totals": totals,
    }


def format_report(report: dict) -> str:
    """A few lines of text per layer."""
    t = report["totals"]
    lines = [
        f"pruning report ({report['gate']}, hidden {report['hidden_size']}, "
        f"log α > {t['threshold_log_alpha']:g} pruned)"
    ]
    for lay in report["layers"]:

        def frac(d, key="remaining"):
            return f"{d[key]}/{d['total']}"

        const_blocks = {
            k: len(v["constant_units"])
            for k, v in lay["constant_blocks"].items()
            if v["constant_units"]
        }
        const_gates = {k: len(v["constant_units"]) for k, v in lay["constant_gates"].items()}
        lines.append(
            f"  layer {lay['layer']}: W {frac(lay['weights_ih'])}, U {frac(lay['weights_hh'])}, "
            f"inputs {frac(lay['inputs'])} (used {lay['inputs']['used']}), "
            f"hidden {frac(lay['hidden'])} (live {lay['hidden']['live_units']}), "
            f"pre-activations {frac(lay['preactivations'])}"
        )
        lines.append(
            f"    constant blocks {const_blocks or '{}'}; constant gates (units) {const_gates}"
        )
    if "layer_widths" in t:
        what = "layer widths"
        detail = f"{t['layer_widths']}; read-out inputs {t['readout_inputs']['remaining']}/"
        detail += str(t["readout_inputs"]["total"])
    else:
        what = "cell parameters"
        detail = f"{t['pruned_cell_parameters']}/{t['cell_parameters']}"
    lines.append(
        f"  weights {t['recurrent_weights_remaining']}/{t['recurrent_weights']} "
        f"(×{t['weight_compression']:g}); parameters {t['pruned_dense_parameters']}/"
        f"{t['dense_parameters']} dense (×{t['parameter_compression']:g}); {what} {detail}"
    )
    return "\n".join(lines)


def write_report(report: dict, folder: str | Path) -> Path:
    """Write ``prune_report.json`` into ``folder``; returns its path."""
    path = Path(folder) / REPORT_NAME
    checkpoints.write_json(path, report)
    return path
