"""The ONNX Runtime backend: torch-free import, provider choice and fallback reporting, export
folders with hash checks, and the music stepper under the numpy generator.

Graphs here are built by hand with ``onnx.helper`` (no torch); ``test_onnx_export.py`` covers
real exported models.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from bbservice import runtime
from bbservice.errors import ConfigError, DataError
from bbservice.music_generation import GenerationParams, generate_rolls

L, H = 2, 4


def music_step_graph(path: Path, content_hash: str = "h0") -> Path:
    """A stand-in ``music_step``: probs = σ(frame − 1), h_out = tanh(h), c_out = c + 1."""
    batch = "batch"
    inputs = [
        helper.make_tensor_value_info("frame", TensorProto.FLOAT, [batch, 88]),
        helper.make_tensor_value_info("h", TensorProto.FLOAT, [L, batch, H]),
        helper.make_tensor_value_info("c", TensorProto.FLOAT, [L, batch, H]),
    ]
    outputs = [
        helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, 88]),
        helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [L, batch, H]),
        helper.make_tensor_value_info("c_out", TensorProto.FLOAT, [L, batch, H]),
    ]
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    nodes = [
        helper.make_node("Sub", ["frame", "one"], ["shifted"]),
        helper.make_node("Sigmoid", ["shifted"], ["probs"]),
        helper.make_node("Tanh", ["h"], ["h_out"]),
        helper.make_node("Add", ["c", "one"], ["c_out"]),
    ]
    graph = helper.make_graph(nodes, "music_step", inputs, outputs, initializer=[one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    helper.set_model_props(model, {"bbservice.content_hash": content_hash})
    onnx.save_model(model, str(path))
    return path


def fake_music_export(folder: Path, content_hash: str = "h0") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    graph = music_step_graph(folder / "music_step.onnx", content_hash)
    manifest = {
        "format": runtime.EXPORT_FORMAT,
        "format_version": runtime.FORMAT_VERSION,
        "kind": "music",
        "content_hash": "h0",
        "graphs": {"music_step": {"files": {"fp32": graph.name}}},
        "files": {
            graph.name: {"sha256": runtime.file_sha256(graph), "bytes": graph.stat().st_size}
        },
        "config": {"kind": "music", "model": {"num_layers": L, "hidden_size": H}},
        "grid": {"frames_per_beat": 2},
    }
    (folder / runtime.MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_runtime_imports_without_torch():
    code = (
        "import sys, bbservice.runtime, bbservice.decoding, bbservice.music_generation; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_cpu_session_reports_the_providers_it_got(tmp_path, caplog):
    path = music_step_graph(tmp_path / "g.onnx")
    with caplog.at_level(logging.INFO, logger="bbservice.runtime"):
        session = runtime.make_session(path, "cpu")
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert "['CPUExecutionProvider']" in caplog.text


class FakeSession:
    """Stands in for an InferenceSession that silently fell back to the CPU."""

    asked: list[str] = []

    def __init__(self, path, sess_options=None, providers=None):
        FakeSession.asked = list(providers)

    def get_providers(self):
        return ["CPUExecutionProvider"]


def test_cuda_fallback_is_reported(tmp_path, monkeypatch, caplog):
    path = music_step_graph(tmp_path / "g.onnx")
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    with caplog.at_level(logging.INFO, logger="bbservice.runtime"):
        session = runtime.make_session(path, "auto")
    assert FakeSession.asked == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert session.get_providers() == ["CPUExecutionProvider"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "CUDA was asked for" in warnings[0].getMessage()
    with pytest.raises(ConfigError, match="CUDA was asked for"):
        runtime.make_session(path, "cuda")
    runtime.make_session(path, "cpu")
    assert FakeSession.asked == ["CPUExecutionProvider"]


def test_provider_choice_without_cuda(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert runtime.requested_providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(ConfigError, match="onnxruntime-gpu"):
        runtime.requested_providers("cuda")
    with pytest.raises(ConfigError, match="unknown device"):
        runtime.requested_providers("tpu")


def test_load_export_and_generate(tmp_path):
    export = runtime.load_export(fake_music_export(tmp_path / "e"), device="cpu")
    assert export.kind == "music" and export.grid == {"frames_per_beat": 2}
    assert export.providers == {"music_step": ["CPUExecutionProvider"]}
    stepper = export.music_stepper()
    state = stepper.start(3)
    assert state["h"].shape == (L, 3, H)
    probs, state = stepper.step(np.ones((3, 88), np.float32), state)
    np.testing.assert_allclose(probs, 0.5)
    np.testing.assert_allclose(state["c"], 1.0)
    rolls = generate_rolls(stepper, GenerationParams(frames=8, seed=1, num_outputs=2))
    assert rolls.shape == (2, 8, 88)
    with pytest.raises(ConfigError, match="not caption"):
        export.caption_stepper()
    with pytest.raises(ConfigError, match="no fp16 variant"):
        runtime.load_export(tmp_path / "e", precision="fp16")


def test_manifest_hash_mismatch_is_a_clear_error(tmp_path):
    folder = fake_music_export(tmp_path / "e")
    graph = folder / "music_step.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    graph.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"music_step\.onnx: sha256 .* does not match"):
        runtime.load_export(folder)
    graph.write_bytes(bytes(data[:-1]))
    with pytest.raises(DataError, match="bytes, the manifest says"):
        runtime.load_export(folder)
    graph.unlink()
    with pytest.raises(DataError, match="missing"):
        runtime.load_export(folder)


def test_graph_of_another_model_is_refused(tmp_path):
    folder = fake_music_export(tmp_path / "e", content_hash="another")
    with pytest.raises(DataError, match="content hash"):
        runtime.load_export(folder)


def test_bad_export_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        runtime.load_export(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no manifest.json"):
        runtime.load_export(tmp_path / "empty")
    folder = fake_music_export(tmp_path / "e")
    (folder / runtime.MANIFEST).write_text("{not json")
    with pytest.raises(DataError, match="corrupt manifest"):
        runtime.load_export(folder)
    (folder / runtime.MANIFEST).write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError, match="not a bbservice-onnx-export manifest"):
        runtime.load_export(folder)
    with pytest.raises(ConfigError, match="unknown precision"):
        runtime.load_export(folder, precision="int4")


def test_missing_store_entry_is_a_clear_error():
    with pytest.raises(DataError, match="not in the BentoML model store"):
        runtime.load_from_store("bbservice-nothing:latest")
