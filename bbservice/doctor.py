"""``bbservice doctor``: versions, devices and a few-second smoke test of every path this
installation can run — the text to paste into a bug report.

Checks (each is timed and recorded as passed / failed with its error; a failure never stops
the others):

* ``cell:<device>`` — a ``bbeta5`` :class:`~bbservice.cells.GatedLSTM` (8 → 16, batch 4, 5
  steps) forward with sampled gates and backward on every torch device (CPU, each CUDA GPU);
  on a GPU its mean-gate output is compared with the CPU's.
* ``onnxruntime:<provider>`` — a session per available ONNX Runtime provider on a one-node
  graph built in-process (no torch, no onnx package), with the providers the session really
  got (``get_providers()``), run once plainly and once with IOBinding on that provider's
  device (the serving path's device-resident state).

Torch is optional: in a serving-only install the report says torch is absent and runs the
ONNX Runtime checks. Exit status: 0 when every check that could run passed; 1 when one
failed; 3 with ``--require-gpu`` when no CUDA check (torch or ONNX Runtime) passed or one
failed.

    bbservice doctor [--json] [--require-gpu]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_NO_GPU = 0, 1, 3

__all__ = ["EXIT_FAILED", "EXIT_NO_GPU", "EXIT_OK", "add_arguments", "diagnose", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--require-gpu",
        action="store_true",
        help=f"exit {EXIT_NO_GPU} unless a CUDA path (torch or ONNX Runtime) works",
    )


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _check(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        detail = fn() or {}
        result = {"name": name, "passed": True, **detail}
    except Exception as err:  # a smoke test reports every failure, it never raises
        last = traceback.extract_tb(err.__traceback__)[-1:]
        where = f" ({last[0].filename.rsplit('/', 1)[-1]}:{last[0].lineno})" if last else ""
        result = {"name": name, "passed": False, "error": f"{type(err).__name__}: {err}{where}"}
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


# -- torch -------------------------------------------------------------------------------------


def _torch_info(torch) -> dict[str, Any]:
    info: dict[str, Any] = {
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "threads": torch.get_num_threads(),
        "devices": [],
    }
    if info["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["devices"].append(
                {
                    "index": i,
                    "name": p.name,
                    "capability": f"{p.major}.{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 1),
                    "bf16": bool(torch.cuda.is_bf16_supported()),
                }
            )
    return info


def _cell_smoke(torch, device: str) -> dict[str, Any]:
    """bbeta5 layer forward (sampled gates) + backward on ``device``; on CUDA the mean-gate
    output must match the CPU's within 1e-3 (TF32 matmuls allowed)."""
    from bbservice.cells import GatedLSTM

    torch.manual_seed(0)
    cpu_rnn = GatedLSTM(8, 16, gate="bbeta5", batch_first=True)
    rnn = GatedLSTM(8, 16, gate="bbeta5", batch_first=True).to(device)
    rnn.load_state_dict(cpu_rnn.state_dict())
    x = torch.randn(4, 5, 8)
    out, _ = rnn(x.to(device))
    out.square().mean().backward()
    grads = [p.grad for p in rnn.parameters()]
    if any(g is None or not bool(torch.isfinite(g).all()) for g in grads):
        raise RuntimeError("missing or non-finite gradients")
    rnn.eval()
    cpu_rnn.eval()
    with torch.no_grad():
        mean_out = rnn(x.to(device))[0].cpu()
        ref = cpu_rnn(x)[0]
    diff = float((mean_out - ref).abs().max())
    if diff > 1e-3:
        raise RuntimeError(f"mean-gate output differs from the CPU's by {diff:.2e}")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"max_abs_diff_vs_cpu": diff}


# -- onnxruntime -------------------------------------------------------------------------------


def _ort_smoke(ort, provider: str) -> dict[str, Any]:
    """A session on ``provider`` alone over a Gather graph: plain run, then IOBinding with the
    output kept on the provider's device and fed back in."""
    import numpy as np

    from bbservice.runtime import DeviceOps, gather_rows_model

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(gather_rows_model(1), sess_options=options, providers=[provider])
    got = session.get_providers()
    if got[0] != provider:
        raise RuntimeError(f"asked for {provider}, the session runs on {got}")
    data = np.arange(12, dtype=np.float32).reshape(4, 3)
    index = np.array([3, 1], dtype=np.int64)
    (rows,) = session.run(None, {"data": data, "indices": index})
    if not np.array_equal(rows, data[index]):
        raise RuntimeError("wrong result")
    device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
    ops = DeviceOps(device, got)
    on_device = np.take(np.take(ops.to_device(data), index, axis=0), [1, 0], axis=0)
    if not np.array_equal(np.asarray(on_device), data[index][[1, 0]]):
        raise RuntimeError("IOBinding gave a wrong result")
    return {"providers": got, "io_binding_device": on_device.device}


# -- report ------------------------------------------------------------------------------------


def diagnose() -> dict[str, Any]:
    """Versions, devices and checks (see the module docstring) as a JSON-able dict."""
    report: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {
            name: _version(name)
            for name in ("bbservice", "numpy", "onnxruntime", "onnxruntime-gpu", "bentoml")
        },
        "checks": [],
    }
    checks = report["checks"]
    try:
        import torch
    except ImportError:
        report["torch"] = None
    else:
        report["torch"] = _torch_info(torch)
        devices = ["cpu"] + [f"cuda:{d['index']}" for d in report["torch"]["devices"]]
        for device in devices:
            checks.append(_check(f"cell:{device}", lambda d=device: _cell_smoke(torch, d)))
    try:
        import onnxruntime as ort
    except ImportError:
        report["onnxruntime"] = None
    else:
        available = ort.get_available_providers()
        report["onnxruntime"] = {
            "version": ort.__version__,
            "device": ort.get_device(),
            "available_providers": available,
        }
        if "CUDAExecutionProvider" in available:
            from bbservice.runtime import _preload_cuda_libraries

            _preload_cuda_libraries()
        for provider in available:
            if provider in ("CPUExecutionProvider", "CUDAExecutionProvider"):
                smoke = lambda p=provider: _ort_smoke(ort, p)  # noqa: E731
                checks.append(_check(f"onnxruntime:{provider}", smoke))
            else:
                checks.append({"name": f"onnxruntime:{provider}", "skipped": "not checked here"})
    report.update(summarize(checks))
    return report


def summarize(checks: list[dict[str, Any]]) -> dict[str, bool]:
    """``gpu_path_works``: some CUDA check ran and every CUDA check passed; ``all_passed``:
    no check that ran failed."""
    cuda = [c for c in checks if "cuda" in c["name"].lower() and "passed" in c]
    return {
        "gpu_path_works": bool(cuda) and all(c["passed"] for c in cuda),
        "all_passed": all(c.get("passed", True) for c in checks),
    }


def exit_status(report: dict[str, Any], require_gpu: bool) -> int:
    if require_gpu and not report["gpu_path_works"]:
        return EXIT_NO_GPU
    return EXIT_OK if report["all_passed"] else EXIT_FAILED


def format_report(report: dict[str, Any]) -> str:
    lines = [f"bbservice doctor — Python {report['python']} on {report['platform']}"]
    lines.append(
        "versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v is not None)
    )
    t = report["torch"]
    if t is None:
        lines.append("torch: absent (serving-only install: mean-gate ONNX path only)")
    else:
        lines.append(
            f"torch {t['version']} (CUDA build {t['cuda_build']}, cuDNN {t['cudnn']}, "
            f"CUDA available: {t['cuda_available']}, {t['threads']} threads)"
        )
        for d in t["devices"]:
            lines.append(
                f"  cuda:{d['index']} {d['name']} (sm {d['capability']}, "
                f"{d['memory_gib']} GiB, bf16 {d['bf16']})"
            )
    o = report["onnxruntime"]
    if o is None:
        lines.append("onnxruntime: absent")
    else:
        lines.append(
            f"onnxruntime {o['version']} ({o['device']}): providers {o['available_providers']}"
        )
    for c in report["checks"]:
        if "skipped" in c:
            lines.append(f"  SKIP {c['name']}: {c['skipped']}")
            continue
        status = "ok  " if c["passed"] else "FAIL"
        extra = c.get("error") or ", ".join(
            f"{k}={v}" for k, v in c.items() if k not in ("name", "passed", "seconds")
        )
        lines.append(f"  {status} {c['name']} ({c['seconds']:.2f} s) {extra}".rstrip())
    lines.append(
        f"GPU path works: {report['gpu_path_works']}; all checks passed: {report['all_passed']}"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = diagnose()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return exit_status(report, args.require_gpu)
