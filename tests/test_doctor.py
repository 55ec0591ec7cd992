"""``bbservice doctor`` on this (CPU) machine: report, exit statuses, a torch-free install."""

from __future__ import annotations

import json
import subprocess
import sys

import onnxruntime
import pytest

from bbservice import doctor
from bbservice.cli import main

HAS_CUDA = "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def test_json_report_and_exit_status(capsys):
    assert main(["doctor", "--json"]) == doctor.EXIT_OK
    report = json.loads(capsys.readouterr().out)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["cell:cpu"]["passed"]
    cpu = checks["onnxruntime:CPUExecutionProvider"]
    assert cpu["passed"] and cpu["providers"] == ["CPUExecutionProvider"]
    assert cpu["io_binding_device"] == "cpu"
    assert report["versions"]["onnxruntime"] == onnxruntime.__version__
    assert report["torch"]["version"]
    assert report["gpu_path_works"] is (_cuda() or HAS_CUDA)


def test_require_gpu_fails_without_one(capsys):
    status = main(["doctor", "--require-gpu"])
    text = capsys.readouterr().out
    assert "GPU path works" in text and "ok   cell:cpu" in text
    if not (_cuda() or HAS_CUDA):
        assert status == doctor.EXIT_NO_GPU


def test_a_failing_check_is_reported_and_the_rest_run(monkeypatch, capsys):
    def broken(ort, provider):
        raise RuntimeError("provider exploded")

    monkeypatch.setattr(doctor, "_ort_smoke", broken)
    assert main(["doctor"]) == doctor.EXIT_FAILED
    text = capsys.readouterr().out
    assert "FAIL onnxruntime:CPUExecutionProvider" in text and "provider exploded" in text
    assert "ok   cell:cpu" in text


def test_works_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from bbservice.cli import main\n"
        "status = main(['doctor'])\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
        "sys.exit(status)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "torch: absent" in out.stdout
    assert "ok   onnxruntime:CPUExecutionProvider" in out.stdout


@pytest.mark.parametrize(
    ("checks", "require", "status"),
    [
        ([{"name": "cell:cpu", "passed": True}], False, 0),
        ([{"name": "cell:cpu", "passed": True}], True, 3),
        ([{"name": "cell:cuda:0", "passed": True}], True, 0),
        ([{"name": "cell:cuda:0", "passed": False}], False, 1),
        ([{"name": "cell:cuda:0", "passed": False}], True, 3),
    ],
)
def test_exit_status_rules(checks, require, status):
    report = {"checks": checks, **doctor.summarize(checks)}
    assert doctor.exit_status(report, require) == status


def test_skipped_checks_count_neither_way():
    checks = [{"name": "onnxruntime:CUDAExecutionProvider", "skipped": "x"}]
    assert doctor.summarize(checks) == {"gpu_path_works": False, "all_passed": True}
