"""Exporting pruned models: prune a sparse model (:mod:`bbservice.pruning`), check the pruned
model against the sparse one, then export it through :mod:`export.onnx_export`, whose
verification runs against the pruned model.
"""

from __future__ import annotations

from bbservice.hashing import content_hash
from bbservice.prune_report import caption_prune_report, prune_report
from bbservice.pruning import (
    Compaction,
    compare_pruned,
    compare_pruned_caption,
    prune_caption,
    prune_to_dense,
)
from export.onnx_export import export_caption, export_music
from export.verify import VerificationError


def _pruned_record(
    model, config: dict, compaction: Compaction, report: dict, check: dict[str, float]
) -> dict:
    """``config["pruned"]`` of an export: the sparse source model's config and content hash
    (as its checkpoint's ``config.json`` gives them: the service accepts that checkpoint for
    ``mode=stochastic``, where the gates are sampled in PyTorch), the compaction, the report's
    totals and the largest differences against the sparse model."""
    return {
        "source_model": config["model"],
        "source_content_hash": content_hash(model, config),
        "compaction": compaction.to_dict(),
        "totals": report["totals"],
        "max_abs_diff_vs_sparse": check,
    }


def export_pruned_music(
    model,
    out,
    *,
    config: dict | None = None,
    tolerance: float = 1e-4,
    compaction: Compaction | None = None,
    **kwargs,
):
    """Prune a sparse piano-roll model to dense, check it against the sparse model (max abs
    difference <= ``tolerance`` on probabilities and kept states), then
    :func:`export.onnx_export.export_music` it (which verifies ONNX against the dense model).

    The recorded config gains ``pruned`` (layer widths, the report's totals, the check, and
    the sparse model's config and content hash); no PyTorch checkpoint is embedded (the dense
    module is not a PianoRollModel): the sparse checkpoint serves ``mode=stochastic``.
    """
    compaction = compaction or Compaction()
    dense = prune_to_dense(model, compaction)
    check = compare_pruned(model, dense)
    if max(check.values()) > tolerance:
        raise VerificationError(f"pruned dense model differs from the sparse model: {check}")
    config = dict(config or {"kind": "music", "model": model.config.to_dict()})
    record = _pruned_record(model, config, compaction, prune_report(model), check)
    config["model"] = {**config["model"], "hidden_size": dense.config.hidden_size}
    config["pruned"] = {
        **record,
        "widths": dense.widths,
        "source_hidden_size": model.config.hidden_size,
    }
    kwargs["checkpoint"] = False  # the dense module is no PianoRollModel checkpoint
    return export_music(dense, out, config=config, tolerance=tolerance, **kwargs)


def export_pruned_caption(
    model,
    out,
    *,
    config: dict | None = None,
    tolerance: float = 1e-4,
    compaction: Compaction | None = None,
    **kwargs,
):
    """:func:`prune_caption`, check it against the sparse model (max abs difference <=
    ``tolerance`` on log-probabilities, state and attention), then
    :func:`export.onnx_export.export_caption` it (verified against the pruned model).

    The recorded config gains ``pruned`` (the report's totals, the check, and the sparse
    model's config and content hash); no PyTorch checkpoint is embedded (its cell is not the
    dense cell): the sparse checkpoint serves ``mode=stochastic``.
    """
    compaction = compaction or Compaction()
    pruned = prune_caption(model, compaction)
    check = compare_pruned_caption(model, pruned)
    if max(check.values()) > tolerance:
        raise VerificationError(f"pruned caption model differs from the sparse model: {check}")
    config = dict(config or {"kind": "caption", "model": model.config.to_dict()})
    config["pruned"] = _pruned_record(model, config, compaction, caption_prune_report(model), check)
    kwargs["checkpoint"] = False
    return export_caption(pruned, out, config=config, tolerance=tolerance, **kwargs)
