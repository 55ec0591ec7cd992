"""What sparse variational dropout pruned (``log α > 3``), per layer of a sparse music model.

:func:`prune_report` → a JSON-ready dict: per layer the remaining weights (W and U, after all
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

from bbservice.gates import BETA_FAMILIES, alpha_from_preactivation
from bbservice.models.music import count_parameters
from bbservice.sparse import (
    GATE_DEPENDENCIES,
    PRUNE_THRESHOLD,
    block_names,
    dense_parameter_count,
    live_units,
    prune_to_dense,
)
from training import common

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
def prune_report(model) -> dict:
    """The report of a sparse :class:`~bbservice.models.music.PianoRollModel` (on any device)."""
    was_training = model.training
    model.eval()
    rnn = model.rnn
    family, hid = rnn.config.family, rnn.hidden_size
    names = block_names(family)
    live = live_units(model)
    layers = []
    weights_total = weights_left = 0
    for layer, cell in enumerate(rnn.cells):
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
        for gname, deps, value in zip(
            ("i", "f"), GATE_DEPENDENCIES[family], gate_out[:2], strict=True
        ):
            const = torch.stack([const_rows[d * hid : (d + 1) * hid] for d in deps]).all(0)
            units = const.nonzero().squeeze(1)
            gates[gname] = {
                "constant_units": units.tolist(),
                "values": [round(float(v), 6) for v in value[0, units]],
            }
        nz_w, nz_u = int((w != 0).sum()), int((u != 0).sum())
        weights_total += w.numel() + u.numel()
        weights_left += nz_w + nz_u
        layers.append(
            {
                "layer": layer,
                "weights_ih": {**_count(w != 0), "variables_kept": int(masks["weight_ih"].sum())},
                "weights_hh": {**_count(u != 0), "variables_kept": int(masks["weight_hh"].sum())},
                "inputs": {**_count(masks["input"]), "used": int((w != 0).any(0).sum())},
                "hidden": {**_count(masks["hidden"]), "live_units": int(live[layer].sum())},
                "preactivations": {
                    **_count(masks["preact"]),
                    "constant_rows": int(const_rows.sum()),
                },
                "constant_blocks": blocks,
                "constant_gates": gates,
            }
        )
    dense = prune_to_dense(model)
    dense_params, pruned_params = dense_parameter_count(model), count_parameters(dense)
    totals = {
        "threshold_log_alpha": PRUNE_THRESHOLD,
        "recurrent_weights": weights_total,
        "recurrent_weights_remaining": weights_left,
        "weight_compression": round(weights_total / max(weights_left, 1), 4),
        "dense_parameters": dense_params,
        "pruned_dense_parameters": pruned_params,
        "parameter_compression": round(dense_params / max(pruned_params, 1), 4),
        "layer_widths": dense.widths,
        "sparsity": {k: round(v, 6) for k, v in rnn.sparsity().items()},
    }
    model.train(was_training)
    return {"gate": family, "hidden_size": hid, "layers": layers, "totals": totals}


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
    lines.append(
        f"  weights {t['recurrent_weights_remaining']}/{t['recurrent_weights']} "
        f"(×{t['weight_compression']:g}); parameters {t['pruned_dense_parameters']}/"
        f"{t['dense_parameters']} dense (×{t['parameter_compression']:g}); "
        f"layer widths {t['layer_widths']}"
    )
    return "\n".join(lines)


def write_report(report: dict, folder: str | Path) -> Path:
    """Write ``prune_report.json`` into ``folder``; returns its path."""
    path = Path(folder) / REPORT_NAME
    common.write_json(path, report)
    return path
