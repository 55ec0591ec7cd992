"""bench/gpu_check.py without a GPU: the one-line "no CUDA" exit, the parsing of the gate
benchmark, the choice of the JSB file, and the ONNX Runtime step (plain against IOBinding)
on real exported graphs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_service import tiny_exports

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA (")
    assert not (tmp_path / "o").exists()


GATES_OUTPUT = """
CPU  batch 64, 100 steps, 88 in, hidden 256, 2 threads, torch 2.14.1
family              train ms   ratio  infer ms   ratio
nn.LSTM                 57.0    1.00      10.7    1.00
bbeta5                 374.6    6.58      39.2    3.67
bbeta5/implicit        732.1   12.85      37.6    3.52

CUDA  batch 64, 100 steps, 88 in, hidden 256, 2 threads, torch 2.14.1
family              train ms   ratio  infer ms   ratio
nn.LSTM                  5.0    1.00       1.0    1.00
bbeta5                  15.0    3.00       2.5    2.50
"""


def test_gate_tables_are_parsed_per_device():
    tables = gpu_check.parse_gate_table(GATES_OUTPUT)
    assert set(tables) == {"cpu", "cuda"}
    assert tables["cpu"]["bbeta5/implicit"]["train_ratio"] == 12.85
    assert tables["cuda"]["bbeta5"] == {
        "train_ms": 15.0,
        "train_ratio": 3.0,
        "infer_ms": 2.5,
        "infer_ratio": 2.5,
    }


def test_jsb_json_is_used_when_scipy_is_missing(tmp_path, monkeypatch):
    mat = tmp_path / "JSB_Chorales.mat"
    mat.write_bytes(b"")
    (tmp_path / "JSB_Chorales.json").write_text("{}")
    real = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(
        gpu_check.importlib.util, "find_spec", lambda n: None if n == "scipy" else real(n)
    )
    assert gpu_check.music_data(mat) == tmp_path / "JSB_Chorales.json"
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", real)
    assert gpu_check.music_data(mat) == mat


def test_onnxruntime_step_on_real_exports_binding_equals_plain(tmp_path):
    exports = tiny_exports()
    (tmp_path / "music").symlink_to(exports["music"])
    (tmp_path / "caption").symlink_to(exports["caption"])
    result = gpu_check.ort_only(tmp_path)
    runs = {(r["model"], r["device"]) for r in result["runs"]}
    assert {("music", "cpu"), ("caption", "cpu")} <= runs
    assert result["all_equal"]
    for run in result["runs"]:
        assert run["binding_equals_plain"] and run["binding_speedup"] > 0
        assert run["info"]["providers"]
