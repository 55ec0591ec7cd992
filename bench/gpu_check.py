"""The GPU path, end to end, in one command; writes one JSON summary.

For a machine with a CUDA torch and nothing else of this project (e.g. a lent GPU machine with
no network). Steps, each timed and recorded (a failing step is recorded and the rest go on;
each has a timeout and all share ``--budget-s``, default 450 s):

 1. install   — a venv over the machine's packages (``--system-site-packages``: its torch is
                used, never touched), the prepared wheels (``bench/prepare_gpu_wheels.sh``)
                whose distributions the machine lacks, then ``pip install --no-deps -e .``
                (falls back to ``PYTHONPATH`` when the editable install cannot build);
 2. doctor    — ``bbservice doctor --json --require-gpu``;
 3. bench_gates — ``bench/bench_gates.py`` (ratios against ``nn.LSTM`` on CPU and CUDA; the
                flags it offers are read from its ``--help``: ``--json``, ``--device``);
 4. music     — ``train music`` on JSB (``--jsb``: the .mat, or the pitch-list .json next to it
                when scipy is absent) for ``--epochs`` epochs on CUDA (the trainers' autocast:
                bf16 where supported, else fp16), ``eval music`` (mean and Monte-Carlo NLL),
                ``generate music``;
 5. caption   — ``generate scenes``, ``train caption`` (ResNet-18, 64 px), ``eval caption``
                (beam 3), ``caption --sample-gates 8`` (the stochastic PyTorch path on CUDA);
 6. export    — ``export music|caption --no-store --fp16`` (each verified against PyTorch);
 7. onnxruntime — the exports on every ONNX Runtime provider there is: music frames/s and
                caption images/s (batch 8, beam 3), plain against IOBinding (results must be
                identical), and CUDA against CPU where the CUDA provider exists.

Without CUDA it prints one line and exits 0 (``--allow-cpu`` runs everything on the CPU, to
try the script itself). Exit status otherwise: 0 when every step passed, 1 when one failed.

    python bench/gpu_check.py [--jsb gpu_check_data/JSB_Chorales.mat] [--wheels wheels]
        [--out $OUT/gpu_check] [--epochs 3] [--budget-s 450] [--skip-install] [--allow-cpu]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TAIL = 3000  # characters of a failing step's output kept in the summary


def cuda_status() -> tuple[bool, str]:
    """(CUDA usable by torch, one line saying what was found)."""
    try:
        import torch
    except ImportError as err:
        return False, f"torch is not importable ({err})"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA device"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return True, f"torch {torch.__version__}, CUDA {torch.version.cuda}: {', '.join(names)}"


class Check:
    """Runs the steps under one time budget and collects the summary."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.deadline = time.monotonic() + args.budget_s
        self.steps: list[dict[str, Any]] = []
        self.python = sys.executable
        self.env = dict(os.environ, BENTOML_DO_NOT_TRACK="True", PYTHONUNBUFFERED="1")
        self.env.setdefault("MPLBACKEND", "Agg")
        self.work = Path(args.work)
        self.logs = Path(args.out) / "logs"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, name: str, passed: bool, seconds: float, **detail: Any) -> dict[str, Any]:
        step = {"step": name, "passed": passed, "seconds": round(seconds, 2), **detail}
        self.steps.append(step)
        mark = "ok  " if passed else "FAIL"
        print(f"gpu_check: {mark} {name} ({seconds:.1f} s) {detail.get('error', '')}", flush=True)
        return step

    def run(self, name: str, cmd: list[str], timeout: float, **detail: Any) -> dict[str, Any]:
        """A subprocess step; its output goes to logs/<name>.log (the tail, on failure, into
        the summary)."""
        timeout = min(timeout, self.left())
        if timeout < 5:
            return self.record(name, False, 0.0, error="skipped: time budget spent", **detail)
        self.logs.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        try:
            proc = subprocess.run(
                cmd,
                cwd=REPO,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            output, code = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as err:
            output = (
                _text(err.stdout) + _text(err.stderr)
            ) + f"\n[timed out after {timeout:.0f} s]"
            code = None
        seconds = time.monotonic() - start
        (self.logs / f"{name}.log").write_text(" ".join(cmd) + "\n\n" + output)
        detail = {"command": " ".join(map(str, cmd)), "returncode": code, **detail}
        if code == 0:
            return self.record(name, True, seconds, output=output, **detail)
        error = "timed out" if code is None else f"exit status {code}"
        return self.record(name, False, seconds, error=error, tail=output[-TAIL:], **detail)

    def cli(self, name: str, argv: list[str], timeout: float, **detail: Any) -> dict[str, Any]:
        return self.run(name, [self.python, "-m", "bbservice.cli", *argv], timeout, **detail)


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


# -- 1. install --------------------------------------------------------------------------------


def _wheel_dist(path: Path) -> str:
    return path.name.split("-")[0].replace("_", "-").lower()


def _installed(dist: str, python: str) -> bool:
    code = f"import importlib.metadata as m; m.version({dist!r})"
    return subprocess.run([python, "-c", code], capture_output=True).returncode == 0


def install(check: Check) -> None:
    """A venv over the machine's site-packages (its torch is used, never touched); when no
    venv can be made, the wheels go into a ``--target`` folder on ``PYTHONPATH`` instead."""
    start = time.monotonic()
    wheels = sorted(Path(check.args.wheels).glob("*.whl")) if check.args.wheels else []
    notes: list[str] = []
    pip = ["-m", "pip", "install", "--quiet", "--no-index", "--no-deps"]
    try:
        venv = check.work / "venv"
        made = venv / "bin" / "python"
        if not made.exists():
            proc = subprocess.run(
                [sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            if proc.returncode != 0:
                notes.append(f"no venv ({proc.stderr.strip()[-300:]}); using --target")
        if made.exists():
            python = str(made)
            # setuptools goes into the venv whatever the machine has: the editable build
            # needs >= 77 (PEP 639 license); the machine's own stays as it is.
            missing = [
                w for w in wheels
                if _wheel_dist(w) == "setuptools" or not _installed(_wheel_dist(w), python)
            ]  # fmt: skip
            if missing:
                subprocess.run(
                    [python, *pip, *map(str, missing)],
                    check=True, capture_output=True, text=True, timeout=240,
                )  # fmt: skip
            editable = subprocess.run(
                [python, *pip, "--no-build-isolation", "--ignore-requires-python", "-e",
                 str(REPO)],
                capture_output=True, text=True, timeout=180,
            )  # fmt: skip
            if editable.returncode != 0:
                notes.append("editable install failed, using PYTHONPATH: " + editable.stderr[-400:])
                check.env["PYTHONPATH"] = str(REPO)
            else:
                notes.append("pip install --no-deps -e . into the venv")
        else:
            python = sys.executable
            site = check.work / "site"
            missing = [w for w in wheels if not _installed(_wheel_dist(w), python)]
            if missing:
                subprocess.run(
                    [python, *pip, "--target", str(site), *map(str, missing)],
                    check=True, capture_output=True, text=True, timeout=240,
                )  # fmt: skip
            check.env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(site)])
        notes.append(
            f"installed {len(missing)} of {len(wheels)} prepared wheels: "
            + ", ".join(_wheel_dist(w) for w in missing)
        )
        check.python = python
        check.record("install", True, time.monotonic() - start, notes=notes)
    except Exception as err:
        detail = _text(getattr(err, "stderr", ""))
        check.env["PYTHONPATH"] = str(REPO)
        check.record(
            "install", False, time.monotonic() - start, error=f"{err} {detail[-TAIL:]}", notes=notes
        )


# -- 3. bench_gates ----------------------------------------------------------------------------


def parse_gate_table(text: str) -> dict[str, dict[str, dict[str, float]]]:
    """The tables bench_gates.py prints: {device: {family: {train_ms, train_ratio, infer_ms,
    infer_ratio}}}; a device section starts with a line ``CPU ...`` or ``CUDA ...``."""
    tables: dict[str, dict[str, dict[str, float]]] = {}
    device = None
    row = re.compile(r"^(\S+(?: \S+)*?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")
    for line in text.splitlines():
        head = re.match(r"^(CPU|CUDA)\b", line.strip())
        if head:
            device = head.group(1).lower()
            tables[device] = {}
            continue
        m = row.match(line.strip())
        if device and m:
            name, *values = m.groups()
            keys = ("train_ms", "train_ratio", "infer_ms", "infer_ratio")
            tables[device][name] = dict(zip(keys, map(float, values), strict=True))
    return tables


def bench_gates(check: Check) -> None:
    script = REPO / "bench" / "bench_gates.py"
    if not script.exists():
        check.record("bench_gates", False, 0.0, error="bench/bench_gates.py is missing")
        return
    helper = subprocess.run(
        [check.python, str(script), "--help"], cwd=REPO, env=check.env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    flags = set(re.findall(r"--[a-z][a-z0-9-]*", helper.stdout))
    cmd = [check.python, str(script), "--repeats", str(check.args.gate_repeats)]
    json_path = check.work / "bench_gates.json"
    if "--json" in flags:
        cmd += ["--json", str(json_path)]
    if "--device" in flags:
        cmd += ["--device", "cuda" if check.args.cuda else "cpu"]
    step = check.run("bench_gates", cmd, check.args.gates_timeout_s, flags=sorted(flags))
    step.pop("output", None)
    log = check.logs / "bench_gates.log"  # the whole output, also of a run cut by its timeout
    step["tables"] = parse_gate_table(log.read_text() if log.exists() else "")
    if json_path.exists():
        step["json"] = json.loads(json_path.read_text())


# -- 4. music ----------------------------------------------------------------------------------


def music_data(path: Path) -> Path:
    """The JSB file to train on: the .mat when scipy can read it, else the pitch-list .json
    that bench/prepare_gpu_wheels.sh wrote next to it."""
    if path.suffix == ".mat" and importlib.util.find_spec("scipy") is None:
        json_path = path.with_suffix(".json")
        if json_path.exists():
            return json_path
    return path


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def music(check: Check, device: str) -> None:
    args = check.args
    data = music_data(Path(args.jsb))
    run = check.work / "runs" / "music"
    shutil.rmtree(run, ignore_errors=True)
    step = check.cli(
        "music_train",
        ["train", "music", "--data", str(data), "--gate", "bbeta5", "--epochs", str(args.epochs),
         "--device", device, "--out", str(run)]
        + (["--max-train-sequences", "8"] if args.quick else []),
        args.music_timeout_s, data=str(data),
    )  # fmt: skip
    records = _jsonl(run / "metrics.jsonl")
    step.pop("output", None)
    step["epochs"] = [
        {k: r.get(k) for k in ("epoch", "train_nll", "valid_nll", "epoch_seconds")} for r in records
    ]
    if not step["passed"]:
        return
    out = check.work / "music_eval.json"
    step = check.cli(
        "music_eval",
        ["eval", "music", "--checkpoint", str(run), "--split", "test",
         "--samples", "0" if args.quick else "4", "--device", device, "--json", str(out)],
        150,
    )  # fmt: skip
    step.pop("output", None)
    if out.exists():
        step["result"] = json.loads(out.read_text())
    step = check.cli(
        "music_generate",
        ["generate", "music", "--checkpoint", str(run), "--frames", "64", "--num-outputs", "2",
         "--seed", "7", "--device", device, "--out", str(check.work / "generated")],
        120,
    )  # fmt: skip
    step.pop("output", None)
    step["files"] = sorted(p.name for p in (check.work / "generated").glob("*"))
    step = check.cli(
        "music_export",
        ["export", "music", str(run), "--out", str(check.work / "exports" / "music"),
         "--no-store", "--fp16"],
        150,
    )  # fmt: skip
    step.pop("output", None)


# -- 5. caption --------------------------------------------------------------------------------


def caption(check: Check, device: str) -> None:
    args = check.args
    scenes = check.work / "scenes"
    shutil.rmtree(scenes, ignore_errors=True)
    step = check.cli(
        "scenes",
        ["generate", "scenes", "--out", str(scenes), "--n-train", str(args.scenes),
         "--n-val", "100", "--n-test", "100", "--image-size", "64", "--seed", "0"],
        120,
    )  # fmt: skip
    step.pop("output", None)
    data = scenes / "dataset_scenes.json"
    if not step["passed"]:
        return
    run = check.work / "runs" / "caption"
    shutil.rmtree(run, ignore_errors=True)
    step = check.cli(
        "caption_train",
        ["train", "caption", "--data", str(data), "--gate", "bbeta5", "--encoder", "resnet18",
         "--encoder-stages", "3", "--fine-tune", "--image-size", "64", "--grid", "4",
         "--hidden", "183", "--epochs", str(args.epochs), "--device", device, "--no-progress",
         "--out", str(run)]
        + (["--max-train-images", "32", "--max-val-images", "8"] if args.quick else []),
        args.caption_timeout_s,
    )  # fmt: skip
    step.pop("output", None)
    step["epochs"] = [
        {k: r.get(k) for k in ("epoch", "train_ce", "val_ce", "val_CIDEr-D", "epoch_seconds")}
        for r in _jsonl(run / "metrics.jsonl")
    ]
    if not step["passed"]:
        return
    out = check.work / "caption_eval.json"
    step = check.cli(
        "caption_eval",
        ["eval", "caption", "--checkpoint", str(run), "--data", str(data), "--split", "test",
         "--beam", "3", "--device", device, "--no-progress", "--out", str(out)]
        + (["--max-images", "8"] if args.quick else []),
        150,
    )  # fmt: skip
    step.pop("output", None)
    if out.exists():
        result = json.loads(out.read_text())
        captions = result.pop("captions", {})
        step["result"] = dict(result, captions={k: captions[k] for k in sorted(captions)[:3]})
    images = sorted((scenes / "images").glob("*.png"))[:2] or sorted(scenes.rglob("*.png"))[:2]
    step = check.cli(
        "caption_stochastic",
        ["caption", *map(str, images), "--checkpoint", str(run), "--sample-gates", "8",
         "--seed", "1", "--device", device],
        120,
    )  # fmt: skip
    step["printed"] = step.pop("output", "")[-1500:]
    step = check.cli(
        "caption_export",
        ["export", "caption", str(run), "--out", str(check.work / "exports" / "caption"),
         "--no-store", "--fp16"],
        200,
    )  # fmt: skip
    step.pop("output", None)


# -- 7. onnxruntime ----------------------------------------------------------------------------


def onnxruntime_check(check: Check) -> None:
    exports = check.work / "exports"
    cmd = [check.python, str(Path(__file__).resolve()), "--ort-only", str(exports)]
    step = check.run("onnxruntime", cmd, 150)
    output = step.pop("output", "")
    lines = [ln for ln in output.splitlines() if ln.startswith("{")]
    if lines:
        step["result"] = json.loads(lines[-1])


def _median_seconds(fn, repeats: int = 3):
    """(median seconds over ``repeats`` after one warm-up, the last result)."""
    fn()
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], out


def _ort_music(ex, device: str) -> dict[str, Any]:
    import numpy as np

    from bbservice.music_generation import GenerationParams, generate_rolls

    params = GenerationParams(frames=256, num_outputs=1, seed=3)
    run: dict[str, Any] = {"model": "music", "device": device, "info": ex.info()}
    rolls = []
    for binding in (False, True):
        call = partial(generate_rolls, ex.music_stepper(io_binding=binding), params)
        seconds, out = _median_seconds(call)
        run["io_binding" if binding else "plain"] = {"frames_per_s": 256 / seconds}
        rolls.append(out)
    run["binding_equals_plain"] = bool(np.array_equal(*rolls))
    run["binding_speedup"] = run["io_binding"]["frames_per_s"] / run["plain"]["frames_per_s"]
    return run


def _ort_caption(ex, device: str) -> dict[str, Any]:
    import numpy as np

    from bbservice.decoding import beam_search

    size, ids = ex.image_size, ex.special_ids
    images = np.random.default_rng(0).normal(size=(8, 3, size, size)).astype(np.float32)
    run: dict[str, Any] = {"model": "caption", "device": device, "info": ex.info()}
    tokens = []
    for binding in (False, True):
        call = partial(
            beam_search,
            ex.caption_stepper(io_binding=binding),
            images,
            start_id=ids["start"],
            end_id=ids["end"],
            beam_size=3,
            max_length=ex.max_length,
        )
        seconds, hyps = _median_seconds(call)
        run["io_binding" if binding else "plain"] = {"images_per_s": 8 / seconds}
        tokens.append([[h.tokens for h in item] for item in hyps])
    run["binding_equals_plain"] = tokens[0] == tokens[1]
    run["binding_speedup"] = run["io_binding"]["images_per_s"] / run["plain"]["images_per_s"]
    return run


def ort_only(exports: Path) -> dict[str, Any]:
    """Runs in the installed environment: every export on every usable provider (batch 8 and
    beam 3 for captions, 256 frames for music), plain and with IOBinding."""
    import onnxruntime as ort

    from bbservice.runtime import load_export

    available = ort.get_available_providers()
    devices = ["cpu"] + (["cuda"] if "CUDAExecutionProvider" in available else [])
    result: dict[str, Any] = {"available_providers": available, "runs": []}
    for device in devices:
        for model, bench in (("music", _ort_music), ("caption", _ort_caption)):
            if (exports / model / "manifest.json").exists():
                result["runs"].append(bench(load_export(exports / model, device=device), device))
    by = {(r["model"], r["device"]): r for r in result["runs"]}
    for model, key in (("music", "frames_per_s"), ("caption", "images_per_s")):
        if (model, "cuda") in by and (model, "cpu") in by:
            cuda = max(by[(model, "cuda")][v][key] for v in ("plain", "io_binding"))
            result[f"{model}_cuda_over_cpu"] = cuda / by[(model, "cpu")]["plain"][key]
    result["all_equal"] = all(r["binding_equals_plain"] for r in result["runs"])
    if not result["runs"]:
        raise SystemExit("no exports to check")
    if not result["all_equal"]:
        print(json.dumps(result))
        raise SystemExit("IOBinding and plain decoding differ")
    return result


# -- main --------------------------------------------------------------------------------------


def versions(python: str) -> dict[str, Any]:
    code = (
        "import json, sys, importlib.metadata as m\n"
        "out = {'python': sys.version.split()[0]}\n"
        "for d in ('torch', 'torchvision', 'triton', 'onnxruntime', 'onnxruntime-gpu', 'onnx',"
        " 'numpy', 'bbservice'):\n"
        "    try: out[d] = m.version(d)\n"
        "    except m.PackageNotFoundError: out[d] = None\n"
        "print(json.dumps(out))"
    )
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    return json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr[-500:]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = (
        Path(os.environ["OUT"]) / "gpu_check" if os.environ.get("OUT") else "gpu_check_out"
    )
    parser.add_argument("--jsb", default=str(REPO / "gpu_check_data" / "JSB_Chorales.mat"))
    parser.add_argument("--wheels", default=str(REPO / "wheels"))
    parser.add_argument("--out", default=str(default_out), help="summary and logs")
    parser.add_argument("--work", default="/tmp/bbservice-gpu-check", help="runs, exports, venv")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--scenes", type=int, default=1000, help="training scenes")
    parser.add_argument("--gate-repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=450.0)
    parser.add_argument("--gates-timeout-s", type=float, default=150.0)
    parser.add_argument("--music-timeout-s", type=float, default=150.0)
    parser.add_argument("--caption-timeout-s", type=float, default=180.0)
    parser.add_argument("--skip-install", action="store_true", help="use this Python as it is")
    parser.add_argument("--skip-gates", action="store_true")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU without CUDA")
    parser.add_argument(
        "--quick", action="store_true", help="a few sequences and images only (to try the script)"
    )
    parser.add_argument("--ort-only", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ort_only:
        print(json.dumps(ort_only(Path(args.ort_only))))
        return 0
    cuda, what = cuda_status()
    if not cuda and not args.allow_cpu:
        print(f"gpu_check: no CUDA ({what}); nothing to check, exiting 0")
        return 0
    args.cuda = cuda
    device = "cuda" if cuda else "cpu"
    check = Check(args)
    started = time.monotonic()
    print(f"gpu_check: {what}; budget {args.budget_s:.0f} s", flush=True)
    if args.skip_install:
        check.env["PYTHONPATH"] = str(REPO)
    else:
        install(check)
    step = check.cli("doctor", ["doctor", "--json"] + (["--require-gpu"] if cuda else []), 120)
    output = step.pop("output", None) or step.get("tail", "")
    try:
        step["report"] = json.loads(output[output.index("{") :])
    except ValueError:
        pass
    if not args.skip_gates:
        bench_gates(check)
    music(check, device)
    caption(check, device)
    onnxruntime_check(check)
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "cuda": what,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": versions(check.python),
        "seconds": round(time.monotonic() - started, 1),
        "passed": all(s["passed"] for s in check.steps),
        "steps": check.steps,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    failed = [s["step"] for s in check.steps if not s["passed"]]
    print(
        f"gpu_check: {'all steps passed' if not failed else 'FAILED: ' + ', '.join(failed)} "
        f"in {summary['seconds']} s; summary {out / 'gpu_check.json'}"
    )
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
