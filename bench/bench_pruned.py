"""Exported step graphs side by side: file size, weights, and ONNX Runtime time per step.

Give a dense export first (the baseline) and pruned exports of the same kind after it
(``bbservice export music|caption`` of a ``--sparsify`` checkpoint). For each export the
script prints the size of its fp32 ONNX files, the initializer values of the step graph
(``music_step`` or ``caption_step``: the graph run once per frame or word), and the best of
``--repeats`` timings of ``--steps`` chained steps (the state fed back) after a warm-up, at each
``--batch`` size, with ratios against the first export measured in the same process.

Inputs are random but well-formed: binary frames for music; random word ids, encoder
features and projected features for captions (the step's cost does not depend on the
values).

    python bench/bench_pruned.py EXPORT_DENSE EXPORT_PRUNED [...] [--batch 1 16]
        [--steps 200] [--repeats 5] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from bbservice.runtime import make_session, read_manifest

STEP_GRAPH = {"music": "music_step", "caption": "caption_step"}
STATE = {"h": "h_out", "c": "c_out"}


def step_feeds(session, kind: str, batch: int, manifest: dict, rng) -> dict[str, np.ndarray]:
    """Random inputs of one step at ``batch`` (the graph's own dimensions otherwise)."""
    feeds = {}
    for inp in session.get_inputs():
        shape = [batch if not isinstance(d, int) else d for d in inp.shape]
        if inp.name == "tokens":
            vocab = manifest.get("vocabulary_size", 5)
            feeds[inp.name] = rng.integers(4, vocab, shape).astype(np.int64)
        elif inp.name == "frame":
            feeds[inp.name] = (rng.random(shape) < 0.1).astype(np.float32)
        elif inp.name in STATE:
            feeds[inp.name] = np.zeros(shape, np.float32)
        else:
            feeds[inp.name] = rng.uniform(-1, 1, shape).astype(np.float32)
    return feeds


def time_steps(session, feeds: dict, steps: int, repeats: int, warmup: int = 20) -> float:
    """Best of ``repeats`` mean seconds per step over ``steps`` chained steps."""
    outputs = [o.name for o in session.get_outputs()]
    index = {name: outputs.index(out) for name, out in STATE.items()}
    feeds = dict(feeds)

    def run(n: int) -> None:
        for _ in range(n):
            result = session.run(None, feeds)
            for name, k in index.items():
                feeds[name] = result[k]

    run(warmup)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run(steps)
        best = min(best, (time.perf_counter() - started) / steps)
    return best


def describe(folder: Path) -> dict:
    manifest = read_manifest(folder)
    kind = manifest["kind"]
    graph = STEP_GRAPH[kind]
    step_file = folder / manifest["graphs"][graph]["files"]["fp32"]
    fp32_files = {folder / g["files"]["fp32"] for g in manifest["graphs"].values()}
    proto = onnx.load(str(step_file))
    values = sum(numpy_helper.to_array(t).size for t in proto.graph.initializer)
    pruned = manifest["config"].get("pruned")
    return {
        "kind": kind,
        "manifest": manifest,
        "step_file": step_file,
        "step_kib": step_file.stat().st_size / 1024,
        "all_kib": sum(f.stat().st_size for f in fp32_files) / 1024,
        "step_values": values,
        "pruned": pruned is not None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "exports", nargs="+", type=Path, help="export folders; the first is the baseline"
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = parser.parse_args(argv)

    infos = [describe(folder) for folder in args.exports]
    kinds = {info["kind"] for info in infos}
    if len(kinds) != 1:
        parser.error(f"the exports mix kinds {sorted(kinds)}: compare one kind at a time")
    rng = np.random.default_rng(0)
    base: dict[str, float] = {}
    print(
        f"{'export':<40} {'pruned':>6} {'step KiB':>9} {'all KiB':>9} {'step weights':>13}  "
        + "  ".join(f"{'b' + str(b) + ' µs/step':>14} {'×base':>6}" for b in args.batch)
    )
    for k, (folder, info) in enumerate(zip(args.exports, infos, strict=True)):
        session = make_session(info["step_file"], args.device, threads=args.threads)
        cells = []
        for batch in args.batch:
            feeds = step_feeds(session, info["kind"], batch, info["manifest"], rng)
            seconds = time_steps(session, feeds, args.steps, args.repeats)
            key = f"b{batch}"
            if k == 0:
                base[key] = seconds
            cells.append(f"{seconds * 1e6:>14.0f} {seconds / base[key]:>6.2f}")
        print(
            f"{str(folder)[-40:]:<40} {'yes' if info['pruned'] else 'no':>6} "
            f"{info['step_kib']:>9.0f} {info['all_kib']:>9.0f} {info['step_values']:>13,}  "
            + "  ".join(cells)
        )
    print(f"providers: {session.get_providers()}, {args.threads} intra-op thread(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
