"""The dense-vs-sparsified tables of docs/results_sparse.md, from the folders that
``bench/results_sparse.sh`` writes (runs, evaluations and exports; nothing is re-measured).

    python bench/results_sparse_table.py OUT

Per run: the test metric (music: frame NLL with mean gates, from ``summary.json``; captions:
greedy BLEU-4 and CIDEr-D on ``test``, from ``eval/NAME_test_b1.json``), what the pruning report
says remains (``prune_report.json``), and the exported step graph (``exports/NAME``: its
initializer values, with the ratio against the dense run of the same gate, and file size of
``music_step`` / ``caption_step``). Timings come from
``bench/bench_pruned.py``, which the script runs separately.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
from onnx import numpy_helper

STEP = {"music": "music_step", "caption": "caption_step"}


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def step_graph(export: Path) -> tuple[float, int] | None:
    manifest = _json(export / "manifest.json")
    if manifest is None:
        return None
    path = export / manifest["graphs"][STEP[manifest["kind"]]]["files"]["fp32"]
    values = sum(numpy_helper.to_array(t).size for t in onnx.load(str(path)).graph.initializer)
    return path.stat().st_size / 1024, values


def _graph_cells(out: Path, name: str, base: str) -> list[str]:
    graph, dense = step_graph(out / "exports" / name), step_graph(out / "exports" / base)
    if graph is None:
        return ["–", "–"]
    ratio = f" (×{dense[1] / graph[1]:.1f})" if dense and name != base else ""
    return [f"{graph[1]:,}{ratio}", f"{graph[0]:,.0f} KiB"]


def music_row(out: Path, name: str) -> str | None:
    summary = _json(out / name / "summary.json")
    if summary is None:
        return None
    report = _json(out / name / "prune_report.json")
    manifest = _json(out / "exports" / name / "manifest.json") or {}
    pruned = manifest.get("config", {}).get("pruned")
    cells = [name, f"{summary['test_nll']:.3f}", f"{summary['valid_nll']:.3f}"]
    cells.append(str(summary["best_epoch"]))
    if report:
        t = report["totals"]
        cells.append(f"{t['recurrent_weights_remaining']:,} (×{t['weight_compression']:.0f})")
        cells.append(" / ".join(str(w) for w in pruned["widths"]) if pruned else "–")
        cells.append(_constant_gates(report))
    else:
        cells += ["all", "–", "–"]
    base = name.rsplit("_", 1)[0] + "_dense"
    return "| " + " | ".join(cells + _graph_cells(out, name, base)) + " |"


def _constant_gates(report: dict) -> str:
    return " / ".join(
        f"{len(lay['constant_gates']['i']['constant_units'])}+"
        f"{len(lay['constant_gates']['f']['constant_units'])}"
        for lay in report["layers"]
    )


def caption_row(out: Path, name: str, base: str) -> str | None:
    evaluation = _json(out / "eval" / f"{name}_test_b1.json")
    summary = _json(out / name / "summary.json")
    if evaluation is None or summary is None:
        return None
    report = _json(out / name / "prune_report.json")
    m = evaluation["metrics"]
    cells = [name, f"{m['BLEU-4']:.3f}", f"{m['CIDEr-D']:.3f}", str(summary["best_epoch"])]
    if report:
        t = report["totals"]
        layer = report["layers"][0]
        cells += [
            f"{t['recurrent_weights_remaining']:,} (×{t['weight_compression']:.0f})",
            f"{layer['preactivations']['constant_rows']}",
            _constant_gates(report),
        ]
    else:
        cells += ["all", "–", "–"]
    return "| " + " | ".join(cells + _graph_cells(out, name, base)) + " |"


def main(out: Path) -> int:
    print("### JSB Chorales\n")
    print(
        "| run | test NLL | valid NLL | best epoch | recurrent weights left | layer widths | "
        "constant i+f gates per layer | music_step weights | music_step.onnx |"
    )
    print("|---|---:|---:|---:|---:|---|---|---:|---:|")
    names = sorted(p.parent.name for p in out.glob("jsb_*/summary.json"))
    for name in names:
        row = music_row(out, name)
        if row:
            print(row)
    print("\n### Generated caption scenes (test split, greedy)\n")
    print(
        "| run | BLEU-4 | CIDEr-D | best epoch | cell weights left | constant rows | "
        "constant i+f gates | caption_step weights | caption_step.onnx |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for name in sorted(p.parent.name for p in out.glob("cap_*/summary.json")):
        row = caption_row(out, name, name.rsplit("_", 1)[0] + "_dense")
        if row:
            print(row)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    raise SystemExit(main(Path(sys.argv[1])))
