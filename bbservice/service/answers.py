"""The JSON bodies of the answers: caption items, music outputs and the ``/models`` report."""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np

from bbservice import runtime
from bbservice.decoding import Hypothesis
from bbservice.pianoroll import roll_notes, roll_to_png
from bbservice.service.slots import ModelSlot


def attention_maps(hyp: Hypothesis) -> list[list[list[float]]]:
    """Per word a G x G map (rounded to 4 places); a 1 x P row where P is no square."""
    att = np.asarray(hyp.attention, dtype=np.float64)
    grid = math.isqrt(att.shape[1]) if att.ndim == 2 else 0
    if grid * grid != att.shape[-1]:
        return [np.round(row, 4).tolist() for row in att[:, None, :]]
    return np.round(att.reshape(len(att), grid, grid), 4).tolist()


def caption_item(slot: ModelSlot, hyp: Hypothesis, attention: bool) -> dict:
    """One beam-search caption."""
    words = slot.vocabulary.words(hyp.tokens)
    item = {
        "text": " ".join(words),
        "words": words,
        "log_prob": round(hyp.log_prob, 4),
        "score": round(hyp.score, 4),
        "finished": hyp.finished,
    }
    if attention:
        item["attention"] = attention_maps(hyp)
    return item


def stochastic_items(slot: ModelSlot, result, attention: bool) -> list[dict]:
    """The distinct captions of sampled-gate passes, with their counts and frequencies."""
    items = []
    for tokens, count in result.captions:
        mine = [h for h in result.hypotheses if tuple(h.tokens) == tokens]
        words = slot.vocabulary.words(tokens)
        item = {
            "text": " ".join(words),
            "words": words,
            "log_prob": round(float(np.mean([h.log_prob for h in mine])), 4),
            "count": count,
            "frequency": round(count / result.passes, 6),
        }
        if attention:
            item["attention"] = attention_maps(mine[0])
        items.append(item)
    return items


def uncertainty(result) -> dict[str, float]:
    """How much the sampled-gate passes disagree."""
    return {
        "disagreement": round(result.disagreement, 6),
        "mean_entropy": round(result.mean_entropy, 6),
        "distinct_captions": len(result.captions),
        "passes": result.passes,
    }


def music_outputs(slot: ModelSlot, rolls: np.ndarray, params: dict, primer_frames: int) -> list:
    """Per roll: its notes (frames and seconds) and a base64 PNG piano roll."""
    spf = slot.grid.seconds_per_frame(params["tempo"])
    outputs = []
    for k, roll in enumerate(rolls):
        png = roll_to_png(roll, scale=4 if len(roll) <= 1024 else 2)
        outputs.append(
            {
                "index": k,
                "frames": int(len(roll)),
                "primer_frames": primer_frames,
                "notes": roll_notes(roll, spf),
                "piano_roll_png": base64.b64encode(png).decode("ascii"),
            }
        )
    return outputs


def slot_report(slot: ModelSlot) -> dict[str, Any]:
    """What ``/models`` says of one slot (the caption batching stats are added by the caller)."""
    info: dict[str, Any] = {
        "name": runtime.STORE_NAMES[slot.kind],
        "state": slot.state,
        "error": slot.error,
        "source": slot.source,
        "tag": slot.tag,
    }
    if slot.export is None:
        return info
    m = slot.export.manifest
    cfg = m.get("config", {})
    info.update(
        content_hash=m["content_hash"],
        gate_family=m.get("gate_family"),
        precisions=m.get("precisions"),
        created=slot.created,
        **slot.export.info(),  # device, providers per graph, io_binding, precision, onnxruntime
        metrics=cfg.get("metrics", {}),
        model_config=cfg.get("model", {}),
        verification={
            k: m.get("verification", {}).get(k) for k in ("passed", "tolerance", "max_abs_diff")
        },
        warmup_ms=slot.warmup_ms,
        stochastic=slot.stochastic.status() if slot.stochastic else None,
    )
    if slot.kind == "music":
        info["grid"] = slot.export.grid
    else:
        info.update(
            vocabulary_size=len(slot.export.vocabulary),
            image_size=slot.export.image_size,
            max_length=slot.export.max_length,
        )
    return info
