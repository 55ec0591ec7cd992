"""ONNX export end to end with tiny models: files, manifest, metadata, verification and its
failures, fp16/int8 variants, the same MIDI and the same beam captions on both backends, the
BentoML model store and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import bentoml
import numpy as np
import onnx
import pytest
import torch

from bbservice import checkpoints, cli, runtime
from bbservice.decoding import beam_search
from bbservice.errors import ConfigError
from bbservice.models.caption import CaptionConfig, CaptionModel, TorchCaptionStepper
from bbservice.models.music import MusicConfig, PianoRollModel, TorchMusicStepper
from bbservice.music_generation import GenerationParams, generate_rolls
from bbservice.pianoroll import midi_bytes
from bbservice.vocab import END_ID, START_ID
from export import onnx_export, verify

GRID = {"frames_per_beat": 1}


@pytest.fixture(scope="module")
def music_model() -> PianoRollModel:
    torch.manual_seed(0)
    return PianoRollModel(MusicConfig.preset("bbeta5", hidden_size=12)).eval()


@pytest.fixture(scope="module")
def music_export(music_model, tmp_path_factory) -> onnx_export.ExportResult:
    out = tmp_path_factory.mktemp("exports") / "music"
    return onnx_export.export_music(music_model, out, fp16=True, int8=True, store=True)


@pytest.fixture(scope="module")
def caption_model() -> CaptionModel:
    torch.manual_seed(0)
    config = CaptionConfig(
        vocab_size=15,
        encoder="resnet18",
        encoder_stages=2,
        image_size=64,
        grid_size=3,
        embed_dim=8,
        attention_dim=8,
        hidden_size=16,
        dropout=0.0,
        max_length=6,
    )
    return CaptionModel.build(config).eval()


@pytest.fixture(scope="module")
def caption_export(caption_model, tmp_path_factory) -> onnx_export.ExportResult:
    out = tmp_path_factory.mktemp("exports") / "caption"
    return onnx_export.export_caption(caption_model, out, store=True)


# -- music -------------------------------------------------------------------------------------


def test_music_export_files_and_manifest(music_export):
    folder, manifest = music_export.path, music_export.manifest
    names = {p.name for p in folder.iterdir()}
    expected = {"music_step.onnx", "music_step.fp16.onnx", "music_step.int8.onnx"}
    # One self-contained file per graph (no .data files), and the PyTorch checkpoint.
    assert names == expected | {"manifest.json", "checkpoint"}
    assert set(manifest["files"]) == expected
    for name, info in manifest["files"].items():
        assert info["sha256"] == runtime.file_sha256(folder / name)
        assert info["bytes"] == (folder / name).stat().st_size
    assert manifest["opset"] == 20 and manifest["kind"] == "music"
    assert manifest["gate_family"] == "bbeta5" and manifest["gate_mode"] == "mean"
    assert manifest["precisions"] == ["fp32", "fp16", "int8"]
    assert manifest["config"]["model"]["hidden_size"] == 12
    assert manifest["keys"] == {"n_keys": 88, "lowest_pitch": 21, "highest_pitch": 108}
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest["versions"])
    io = manifest["graphs"]["music_step"]
    assert [i["name"] for i in io["inputs"]] == ["frame", "h", "c"]
    assert [o["name"] for o in io["outputs"]] == ["probs", "h_out", "c_out"]
    assert io["inputs"][0]["shape"] == ["batch", 88]
    assert io["inputs"][1]["shape"] == [2, "batch", 12]
    assert json.loads((folder / "manifest.json").read_text()) == manifest


def test_music_export_holds_the_pytorch_checkpoint(music_model, music_export):
    manifest = music_export.manifest
    assert set(manifest["checkpoint"]["files"]) == {"config.json", "model.safetensors"}
    model, config = checkpoints.load_music(music_export.path / "checkpoint")
    assert config == manifest["config"]
    assert onnx_export.content_hash(model, config) == manifest["content_hash"]


def test_music_graph_metadata_and_ops(music_export):
    model = onnx.load(str(music_export.path / "music_step.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["bbservice.gate_family"] == "bbeta5"
    assert props["bbservice.gate_mode"] == "mean"
    assert props["bbservice.content_hash"] == music_export.manifest["content_hash"]
    assert json.loads(props["bbservice.config"]) == music_export.manifest["config"]
    assert json.loads(props["bbservice.keys"])["lowest_pitch"] == 21
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [20]
    ops = {n.op_type for n in model.graph.node}
    # The CPU fast paths (softplus via log-sigmoid, tanh via sigmoid, oneDNN packed weights)
    # stay out of the exported graph: plain ONNX ops of the default domain only.
    assert {"Softplus", "Tanh", "Sigmoid", "Gemm"} <= ops
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)


def test_music_verification_passes_within_tolerance(music_export):
    v = music_export.manifest["verification"]
    assert v["passed"] and v["tolerance"] == 1e-4 and v["batch_sizes"] == [1, 5]
    assert {c["inputs"].split(" ")[0] for c in v["checks"]} == {"random", "rollout"}
    assert max(v["max_abs_diff"]["music_step"].values()) < 1e-5
    assert v["generation"]["midi_identical"]


def test_music_variants_report_their_accuracy(music_export):
    acc = music_export.manifest["accuracy"]
    for precision in ("fp16", "int8"):
        diffs = acc[precision]["max_abs_diff"]["music_step"]
        assert 0 < diffs["probs"] < 0.1, (precision, diffs)
        assert "midi_identical" in acc[precision]["generation"]
    export = runtime.load_export(music_export.path, device="cpu", precision="int8")
    rolls = generate_rolls(export.music_stepper(), GenerationParams(frames=8, num_outputs=2))
    assert rolls.shape == (2, 8, 88)


def test_same_midi_on_both_backends(music_model, music_export):
    params = GenerationParams(frames=32, temperature=0.9, seed=11, num_outputs=3)
    with torch.inference_mode():
        ref = generate_rolls(TorchMusicStepper(music_model, device="cpu"), params)
    export = runtime.load_export(music_export.path, device="cpu")
    got = generate_rolls(export.music_stepper(), params)
    assert [midi_bytes(r, **GRID) for r in got] == [midi_bytes(r, **GRID) for r in ref]


def test_model_store_entry(music_export):
    assert music_export.store_tag and music_export.store_tag.startswith("bbservice-music:")
    stored = bentoml.models.get("bbservice-music:latest")
    assert str(stored.tag) == music_export.store_tag
    assert stored.info.metadata["gate_family"] == "bbeta5"
    assert stored.info.metadata["content_hash"] == music_export.manifest["content_hash"]
    assert (Path(stored.path) / "manifest.json").is_file()
    export = runtime.load_from_store("bbservice-music:latest", device="cpu")
    assert export.manifest["content_hash"] == music_export.manifest["content_hash"]


def test_broken_graph_fails_naming_the_output(music_model, music_export, tmp_path):
    verifier = verify.MusicVerifier(music_model, GRID, batch_sizes=(1, 5))
    model = onnx.load(str(music_export.path / "music_step.onnx"))
    bias = next(t for t in model.graph.initializer if t.name.endswith("readout.bias"))
    values = onnx.numpy_helper.to_array(bias) + np.float32(0.01)
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    broken = tmp_path / "broken.onnx"
    onnx.save_model(model, str(broken))
    with pytest.raises(verify.VerificationError, match=r"music_step output 'probs' max abs diff"):
        verifier.verify(broken)
    with pytest.raises(verify.VerificationError, match=r"output '\w+' max abs diff .* > tolerance"):
        verifier.verify(music_export.path / "music_step.onnx", tolerance=1e-12)


def test_failed_verification_fails_the_export_and_leaves_nothing(
    music_model, tmp_path, monkeypatch
):
    real = onnx_export.export_graph

    def export_then_break(spec, path, metadata):
        proto = real(spec, path, metadata)
        for node in proto.graph.node:  # the read-out's sigmoid becomes a tanh
            if node.output[0] == "probs":
                node.op_type = "Tanh"
        onnx.save_model(proto, str(path))
        return proto

    monkeypatch.setattr(onnx_export, "export_graph", export_then_break)
    out = tmp_path / "music"
    with pytest.raises(verify.VerificationError, match="'probs'"):
        onnx_export.export_music(music_model, out, store=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_export_refuses_a_foreign_folder(music_model, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an earlier export"):
        onnx_export.export_music(music_model, tmp_path, store=False)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_cli_export_music(music_model, tmp_path, capsys):
    checkpoint = tmp_path / "run" / "best"
    config = {
        "kind": "music",
        "model": music_model.config.to_dict(),
        "data": {"frames_per_beat": 2},
    }
    checkpoints.save_checkpoint(checkpoint, music_model, config)
    out = tmp_path / "export"
    assert (
        cli.main(["export", "music", str(tmp_path / "run"), "--out", str(out), "--no-store"]) == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["verification"]["passed"] and summary["store_tag"] is None
    export = runtime.load_export(out, device="cpu")
    assert export.grid == {"frames_per_beat": 2}
    assert export.config == config
    assert cli.main(["export", "music", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- captions ----------------------------------------------------------------------------------


def test_caption_export_files_metadata_and_verification(caption_export):
    folder, manifest = caption_export.path, caption_export.manifest
    graphs = ("caption_encoder", "caption_init", "caption_step")
    assert {p.name for p in folder.iterdir()} == {f"{g}.onnx" for g in graphs} | {
        "vocab.json",
        "manifest.json",
        "checkpoint",
    }
    restored = checkpoints.load_caption_model(folder / "checkpoint")[0]
    assert onnx_export.content_hash(restored, manifest["config"]) == manifest["content_hash"]
    step = manifest["graphs"]["caption_step"]
    assert [i["name"] for i in step["inputs"]] == ["tokens", "h", "c", "features", "projected"]
    assert [o["name"] for o in step["outputs"]] == ["log_probs", "h_out", "c_out", "attention"]
    assert manifest["graphs"]["caption_encoder"]["inputs"][0]["shape"] == ["batch", 3, 64, 64]
    assert manifest["graphs"]["caption_encoder"]["outputs"][0]["shape"] == ["batch", 9, 128]
    for graph in graphs:  # plain ONNX ops only (no oneDNN or other CPU fast-path ops)
        nodes = onnx.load(str(folder / f"{graph}.onnx")).graph.node
        assert all(n.domain in ("", "ai.onnx") for n in nodes), graph
    props = {p.key: p.value for p in onnx.load(str(folder / "caption_step.onnx")).metadata_props}
    vocabulary = json.loads(props["bbservice.vocabulary"])
    assert vocabulary[:4] == ["<pad>", "<start>", "<end>", "<unk>"] and len(vocabulary) == 15
    v = manifest["verification"]
    assert v["passed"] and v["beam_search"]["all_same"]
    for graph in graphs:
        assert max(v["max_abs_diff"][graph].values()) < 1e-4


def test_same_beam_captions_on_both_backends(caption_model, caption_export):
    images = verify.scene_images(4, 64, seed=5)
    kw = {"start_id": START_ID, "end_id": END_ID, "beam_size": 3, "max_length": 6, "n_best": 2}
    ref = beam_search(TorchCaptionStepper(caption_model, device="cpu"), images, **kw)
    export = runtime.load_export(caption_export.path, device="cpu")
    got = beam_search(export.caption_stepper(), images, **kw)
    assert [[h.tokens for h in hs] for hs in got] == [[h.tokens for h in hs] for hs in ref]
    for hs_ref, hs_got in zip(ref, got, strict=True):
        for a, b in zip(hs_ref, hs_got, strict=True):
            assert abs(a.log_prob - b.log_prob) < 1e-4
            np.testing.assert_allclose(a.attention, b.attention, atol=1e-5)
    words = export.words(got[0][0].tokens + [END_ID, 5])
    assert words == [export.vocabulary[t] for t in got[0][0].tokens]
    assert str(bentoml.models.get("bbservice-caption:latest").tag) == caption_export.store_tag


def test_same_diverse_beam_captions_on_both_backends(caption_model, caption_export):
    images = verify.scene_images(3, 64, seed=6)
    kw = {"start_id": START_ID, "end_id": END_ID, "beam_size": 4, "max_length": 6, "n_best": 4}
    kw |= {"groups": 2, "diversity": 0.8}
    ref = beam_search(TorchCaptionStepper(caption_model, device="cpu"), images, **kw)
    export = runtime.load_export(caption_export.path, device="cpu")
    got = beam_search(export.caption_stepper(), images, **kw)
    assert [[h.tokens for h in hs] for hs in got] == [[h.tokens for h in hs] for hs in ref]
    for hs_ref, hs_got in zip(ref, got, strict=True):
        assert len(hs_got) == 4
        np.testing.assert_allclose(
            [h.log_prob for h in hs_got], [h.log_prob for h in hs_ref], atol=1e-4
        )
