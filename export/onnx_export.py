"""ONNX export of the deterministic (mean-gate) graphs, verified against PyTorch, with a manifest.

One export folder per model::

    music:    music_step.onnx                                  (+ .fp16.onnx, .int8.onnx)
    caption:  caption_encoder.onnx, caption_init.onnx, caption_step.onnx, vocab.json
    both:     manifest.json, checkpoint/ (the PyTorch checkpoint: what a service needs for
              stochastic gates; left out with ``checkpoint=False`` / ``--no-checkpoint``)

Graphs are exported one *step* at a time with the state as explicit inputs and outputs (the
exporter would unroll a Python time loop to the example length) and a dynamic batch axis named
``batch``; the loops over time live in numpy (:mod:`bbservice.music_generation`,
:mod:`bbservice.decoding`) and drive either backend. Every ``.onnx`` file is self-contained
(no external ``.data`` file) and carries ONNX ``metadata_props``:

    bbservice.kind, bbservice.graph, bbservice.precision, bbservice.gate_family,
    bbservice.gate_mode ("mean"), bbservice.config (JSON), bbservice.content_hash,
    bbservice.keys (music: key range JSON) or bbservice.vocabulary (caption: JSON list of words)

``content_hash`` is the sha256 of the model's config and weights: the same in every graph of
one export, so the runtime refuses to pair graphs of different models.

The export is written to a temporary sibling folder, verified (:mod:`export.verify`: a mismatch
beyond the tolerance fails the export and leaves nothing behind) and then renamed into place;
unless told not to, it is then copied into BentoML's model store as ``bbservice-music`` or
``bbservice-caption`` (a service loads ``name:latest``).

Reduced-precision variants (optional, never verified against the tolerance, but measured
against fp32 PyTorch and the numbers written into the manifest):

* ``fp16``: weights and arithmetic in float16, inputs and outputs kept float32
  (``onnxruntime.transformers.float16``); meant for GPUs.
* ``int8``: ONNX Runtime dynamic quantization (int8 weights, activations quantized per call) of
  the matrix products (MatMul/Gemm). Convolutions are left in float32: dynamic quantization of
  a CNN costs accuracy for little speed (static, calibrated quantization is the tool there), so
  the caption encoder's int8 entry is its fp32 graph.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import platform
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from bbservice import checkpoints, runtime
from bbservice.errors import BBServiceError, ConfigError, first_line
from bbservice.hashing import content_hash
from bbservice.models.caption import CaptionModel
from bbservice.models.music import PianoRollModel
from bbservice.pianoroll import LOWEST_PITCH, N_KEYS, Grid
from bbservice.vocab import SPECIAL_IDS, placeholder_words
from export import verify

log = logging.getLogger(__name__)

OPSET = 20
EXAMPLE_BATCH = 3  # not 0 or 1, which torch.export would specialise
MAX_BATCH = 1 << 16
INT8_OPS = ["MatMul", "Gemm"]


# --------------------------------------------------------------------------------------------
# The graphs: thin modules whose forward is one exported step
# --------------------------------------------------------------------------------------------


class ExportError(BBServiceError):
    """A graph could not be exported to ONNX."""


class MusicStepGraph(nn.Module):
    """``frame (B, 88), h, c (L, B, H) -> probs (B, 88), h_out, c_out`` with mean gates."""

    def __init__(self, model: PianoRollModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, frame: Tensor, h: Tensor, c: Tensor):
        return self.model.step(frame, h, c, gate_mode="mean")


class CaptionEncoderGraph(nn.Module):
    """``images (B, 3, S, S) -> features (B, P, C)``."""

    def __init__(self, model: CaptionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor):
        return self.model.encoder(images)


class CaptionInitGraph(nn.Module):
    """``features (B, P, C) -> projected (B, P, A), h, c (B, H)``: the per-image decoder work."""

    def __init__(self, model: CaptionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: Tensor):
        return self.model.decoder.encode_features(features)


class CaptionStepGraph(nn.Module):
    """``tokens (B,), h, c (B, H), features, projected -> log_probs (B, V), h_out, c_out,
    attention (B, P)`` with mean gates."""

    def __init__(self, model: CaptionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, h: Tensor, c: Tensor, features: Tensor, projected: Tensor):
        return self.model.decoder.step(tokens, h, c, features, "mean", projected)


@dataclass
class GraphSpec:
    """What :func:`export_graph` needs: the module, example inputs (in ``forward`` order, named
    as the ONNX inputs), the ONNX output names and the batch axis of every input and output."""

    name: str
    module: nn.Module
    inputs: dict[str, Tensor]
    outputs: list[str]
    batch_axes: dict[str, int] = field(default_factory=dict)  # default 0


def music_specs(model: PianoRollModel) -> list[GraphSpec]:
    cfg = model.config
    B, L, H = EXAMPLE_BATCH, cfg.num_layers, cfg.hidden_size
    g = torch.Generator().manual_seed(0)
    inputs = {
        "frame": (torch.rand(B, cfg.n_keys, generator=g) < 0.1).float(),
        "h": torch.rand(L, B, H, generator=g) * 2 - 1,
        "c": torch.randn(L, B, H, generator=g),
    }
    axes = {"frame": 0, "probs": 0, "h": 1, "c": 1, "h_out": 1, "c_out": 1}
    return [
        GraphSpec("music_step", MusicStepGraph(model), inputs, ["probs", "h_out", "c_out"], axes)
    ]


def caption_specs(model: CaptionModel) -> list[GraphSpec]:
    cfg = model.config
    B, S = EXAMPLE_BATCH, cfg.image_size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, S, S, generator=g)
    with torch.no_grad():
        features = model.encoder(images)
        projected, h, c = model.decoder.encode_features(features)
    tokens = torch.randint(0, cfg.vocab_size, (B,), generator=g)
    return [
        GraphSpec("caption_encoder", CaptionEncoderGraph(model), {"images": images}, ["features"]),
        GraphSpec(
            "caption_init", CaptionInitGraph(model), {"features": features}, ["projected", "h", "c"]
        ),
        GraphSpec(
            "caption_step",
            CaptionStepGraph(model),
            {"tokens": tokens, "h": h, "c": c, "features": features, "projected": projected},
            ["log_probs", "h_out", "c_out", "attention"],
        ),
    ]


# --------------------------------------------------------------------------------------------
# Exporting one graph
# --------------------------------------------------------------------------------------------


def export_graph(spec: GraphSpec, path: Path, metadata: dict[str, str]) -> onnx.ModelProto:
    """Export ``spec`` (dynamo exporter, opset :data:`OPSET`) to one self-contained file."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    dynamic = {name: {spec.batch_axes.get(name, 0): batch} for name in spec.inputs}
    module = spec.module.eval()
    try:
        with _quiet(logging.INFO), torch.no_grad():  # the exporter's pass-by-pass chatter
            program = torch.onnx.export(
                module,
                tuple(spec.inputs.values()),
                dynamo=True,
                opset_version=OPSET,
                input_names=list(spec.inputs),
                output_names=spec.outputs,
                dynamic_shapes=dynamic,
                external_data=False,
                optimize=True,
                verbose=False,
            )
    except Exception as err:  # the exporter raises many types; name the graph in one line
        raise ExportError(f"ONNX export of {spec.name} failed: {first_line(err)}") from err
    proto = program.model_proto
    _name_batch_axes(proto, spec)
    _set_metadata(proto, metadata)
    proto.producer_name = "bbservice"
    proto.doc_string = (
        f"bbservice {spec.name} (mean gates), exported with torch {torch.__version__}"
    )
    onnx.save_model(proto, str(path), save_as_external_data=False)
    onnx.checker.check_model(str(path))
    return proto


def _name_batch_axes(proto: onnx.ModelProto, spec: GraphSpec) -> None:
    """Every input's and output's batch axis is the symbol ``batch``."""
    for value in [*proto.graph.input, *proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        axis = spec.batch_axes.get(value.name, 0)
        if axis < len(dims):
            dims[axis].ClearField("dim_value")
            dims[axis].dim_param = "batch"


def _set_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    keep = {p.key: p.value for p in proto.metadata_props if p.key not in metadata}
    del proto.metadata_props[:]
    for key, value in {**keep, **metadata}.items():
        proto.metadata_props.add(key=key, value=str(value))


def graph_io(path: Path) -> dict[str, list[dict]]:
    """Names, shapes (``"batch"`` for the dynamic axis) and element types of a graph's IO."""
    model = onnx.load(str(path), load_external_data=False)

    def describe(values) -> list[dict]:
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append(
                {
                    "name": v.name,
                    "shape": shape,
                    "dtype": onnx.TensorProto.DataType.Name(t.elem_type).lower(),
                }
            )
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet(level: int = logging.WARNING) -> Iterator[None]:
    """Silence warnings and log records up to ``level`` for the duration (converter advice,
    exporter pass logs)."""
    previous = logging.root.manager.disable
    logging.disable(level)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def make_fp16(src: Path, dst: Path, metadata: dict[str, str]) -> None:
    """Float16 weights and arithmetic, float32 inputs and outputs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    _set_metadata(model, {**metadata, "bbservice.precision": "fp16"})
    onnx.save_model(model, str(dst), save_as_external_data=False)


def make_int8(src: Path, dst: Path, metadata: dict[str, str]) -> bool:
    """Dynamic int8 quantization of the matrix products; False when the graph has none."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    if not any(n.op_type in INT8_OPS for n in model.graph.node):
        return False
    # The exporter's value_info trips the quantizer's strict shape inference: let it re-infer.
    del model.graph.value_info[:]
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "plain.onnx"
        onnx.save_model(model, str(plain))
        with _quiet():
            quantize_dynamic(plain, dst, weight_type=QuantType.QInt8, op_types_to_quantize=INT8_OPS)
    quantized = onnx.load(str(dst))
    _set_metadata(quantized, {**metadata, "bbservice.precision": "int8"})
    onnx.save_model(quantized, str(dst), save_as_external_data=False)
    return True


# --------------------------------------------------------------------------------------------
# Hashes, manifest, staging, store
# --------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    import onnxruntime
    import onnxscript

    import bbservice

    return {
        "bbservice": getattr(bbservice, "__version__", "unknown"),
        "torch": str(torch.__version__),
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A temporary sibling folder that replaces ``out`` on success and vanishes on failure.

    ``out`` may be missing, empty, or an earlier export (it is replaced); any other existing
    folder is refused rather than overwritten.
    """
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--out '{out}' exists and is not a folder")
        if any(out.iterdir()) and not (out / runtime.MANIFEST).is_file():
            raise ConfigError(
                f"--out '{out}' is a non-empty folder that is not an earlier export; "
                "choose another folder"
            )
    with checkpoints.atomic_dir(out) as tmp:
        yield tmp


def file_entry(path: Path) -> dict:
    return {"sha256": runtime.file_sha256(path), "bytes": path.stat().st_size}


def save_to_store(kind: str, folder: Path, manifest: dict) -> str:
    """Copy an export folder into BentoML's model store; returns the new tag (``name:version``).

    The store entry's files are the export folder (``model.path`` = a copy of it, manifest
    included); its ``metadata`` is a summary of the manifest (kind, gate family, content hash,
    precisions, max differences of the verification).
    """
    import bentoml

    name = runtime.STORE_NAMES[kind]
    verification = manifest["verification"]
    metadata = {
        "kind": kind,
        "gate_family": manifest["gate_family"],
        "gate_mode": "mean",
        "content_hash": manifest["content_hash"],
        "opset": manifest["opset"],
        "precisions": ",".join(manifest["precisions"]),
        "tolerance": verification["tolerance"],
        "verified": bool(verification["passed"]),
        "max_abs_diff": json.dumps(verification["max_abs_diff"], sort_keys=True),
        "source": str(manifest.get("source", {}).get("checkpoint", "")),
    }
    labels = {"kind": kind, "gate_family": manifest["gate_family"], "format": runtime.EXPORT_FORMAT}
    with bentoml.models.create(
        name,
        module="bbservice.runtime",
        labels=labels,
        metadata=metadata,
        context=bentoml.models.ModelContext(
            framework_name="onnxruntime",
            framework_versions={"onnx": str(onnx.__version__), "torch": str(torch.__version__)},
        ),
    ) as model:
        shutil.copytree(folder, model.path, dirs_exist_ok=True)
    tag = str(model.tag)
    log.info("saved to the BentoML model store as %s (%s)", tag, model.path)
    return tag


def write_checkpoint(
    folder: Path, model: nn.Module, config: dict, extra_files: dict[str, str] | None = None
) -> dict:
    """The PyTorch checkpoint next to the graphs (``checkpoint/``: safetensors weights,
    ``config.json``, vocabulary), for the stochastic-gate path of a service.

    Returns the manifest's ``checkpoint`` section. Its files are listed there with their
    hashes but not under ``files`` (what the ONNX runtime reads and :func:`load_export`
    checks); a service loading them checks the model's content hash instead.
    """
    checkpoints.save_checkpoint(folder / "checkpoint", model, config, None, extra_files)
    files = sorted(p for p in (folder / "checkpoint").iterdir() if p.is_file())
    return {"folder": "checkpoint", "files": {p.name: file_entry(p) for p in files}}


@dataclass
class ExportResult:
    path: Path
    manifest: dict
    store_tag: str | None = None


def _cpu_eval_copy(model: nn.Module) -> nn.Module:
    """The model on the CPU in eval mode; a copy when it lives elsewhere or is training."""
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if on_cpu and not model.training:
        return model
    return copy.deepcopy(model).cpu().eval()


def _finish(
    kind: str,
    tmp: Path,
    *,
    config: dict,
    chash: str,
    gate_family: str,
    graphs: dict[str, dict],
    extra: dict,
    verification: dict,
    accuracy: dict,
    source: dict,
) -> dict:
    files = sorted(
        {f for g in graphs.values() for f in g["files"].values()} | set(extra.get("_files", []))
    )
    precisions = [p for p in runtime.PRECISIONS if all(p in g["files"] for g in graphs.values())]
    manifest = {
        "format": runtime.EXPORT_FORMAT,
        "format_version": runtime.FORMAT_VERSION,
        "kind": kind,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "gate_family": gate_family,
        "gate_mode": "mean",
        "opset": OPSET,
        "batch_axis": "batch",
        "content_hash": chash,
        "precisions": precisions,
        "graphs": graphs,
        "files": {f: file_entry(tmp / f) for f in files},
        "config": config,
        **{k: v for k, v in extra.items() if not k.startswith("_")},
        "verification": verification,
        "accuracy": accuracy,
        "versions": versions(),
        "source": source,
        "store_name": runtime.STORE_NAMES[kind],
    }
    (tmp / runtime.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


# --------------------------------------------------------------------------------------------
# Music
# --------------------------------------------------------------------------------------------


def export_music(
    model: PianoRollModel,
    out: str | Path,
    *,
    config: dict | None = None,
    fp16: bool = False,
    int8: bool = False,
    store: bool = True,
    checkpoint: bool = True,
    tolerance: float = verify.DEFAULT_TOLERANCE,
    batch_sizes=verify.DEFAULT_BATCH_SIZES,
    seed: int = 0,
    primer: np.ndarray | None = None,
    verify_device: str = "cpu",
    source: dict | None = None,
) -> ExportResult:
    """Export, verify and (optionally) store a piano-roll model; see the module docstring.

    ``config`` is the checkpoint's config (``{"kind": "music", "model": ..., "data": ...}``);
    without one a config of the model alone is recorded. Raises
    :class:`export.verify.VerificationError` when ONNX Runtime and PyTorch disagree.
    """
    out = Path(out)
    model = _cpu_eval_copy(model)
    config = config or {"kind": "music", "model": model.config.to_dict()}
    family = model.config.gate.family
    chash = content_hash(model, config)
    grid = Grid.of_checkpoint(config).to_dict()
    keys = {
        "n_keys": N_KEYS,
        "lowest_pitch": LOWEST_PITCH,
        "highest_pitch": LOWEST_PITCH + N_KEYS - 1,
    }
    meta = {
        "bbservice.kind": "music",
        "bbservice.gate_family": family,
        "bbservice.gate_mode": "mean",
        "bbservice.config": json.dumps(config, sort_keys=True, default=str),
        "bbservice.keys": json.dumps(keys),
        "bbservice.content_hash": chash,
    }
    with staging(out) as tmp:
        graphs, paths = _export_all(music_specs(model), tmp, meta, fp16, int8)
        if checkpoint:
            extra_sections = {"checkpoint": write_checkpoint(tmp, model, config)}
        else:
            extra_sections = {}
        log.info("verifying music_step against PyTorch (tolerance %g)", tolerance)
        verifier = verify.MusicVerifier(
            model, grid, batch_sizes=batch_sizes, seed=seed, primer=primer
        )
        verification = verifier.verify(paths["fp32"]["music_step"], tolerance, verify_device)
        accuracy = {
            p: verifier.measure(files["music_step"], verify_device)
            for p, files in paths.items()
            if p != "fp32"
        }
        manifest = _finish(
            "music",
            tmp,
            config=config,
            chash=chash,
            gate_family=family,
            graphs=graphs,
            extra={"keys": keys, "grid": grid, **extra_sections},
            verification=verification,
            accuracy=accuracy,
            source=source or {},
        )
    return _stored(ExportResult(out, manifest), store)


def _export_all(
    specs: list[GraphSpec], tmp: Path, meta: dict[str, str], fp16: bool, int8: bool
) -> tuple[dict[str, dict], dict[str, dict[str, Path]]]:
    """Export every graph and its variants; (manifest ``graphs`` section, paths by precision)."""
    graphs: dict[str, dict] = {}
    paths: dict[str, dict[str, Path]] = {"fp32": {}}
    for spec in specs:
        graph_meta = {**meta, "bbservice.graph": spec.name, "bbservice.precision": "fp32"}
        path = tmp / f"{spec.name}.onnx"
        log.info("exporting %s", spec.name)
        export_graph(spec, path, graph_meta)
        files = {"fp32": path.name}
        paths["fp32"][spec.name] = path
        if fp16:
            dst = tmp / f"{spec.name}.fp16.onnx"
            make_fp16(path, dst, graph_meta)
            files["fp16"] = dst.name
            paths.setdefault("fp16", {})[spec.name] = dst
        if int8:
            dst = tmp / f"{spec.name}.int8.onnx"
            files["int8"] = dst.name if make_int8(path, dst, graph_meta) else path.name
            paths.setdefault("int8", {})[spec.name] = tmp / files["int8"]
        graphs[spec.name] = {**graph_io(path), "files": files}
    return graphs, paths


def _stored(result: ExportResult, store: bool) -> ExportResult:
    if store:
        result.store_tag = save_to_store(result.manifest["kind"], result.path, result.manifest)
    return result


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def export_caption(
    model: CaptionModel,
    out: str | Path,
    *,
    vocabulary: list[str] | None = None,
    config: dict | None = None,
    fp16: bool = False,
    int8: bool = False,
    store: bool = True,
    checkpoint: bool = True,
    tolerance: float = verify.DEFAULT_TOLERANCE,
    batch_sizes=verify.DEFAULT_BATCH_SIZES,
    seed: int = 0,
    images: np.ndarray | None = None,
    verify_device: str = "cpu",
    source: dict | None = None,
) -> ExportResult:
    """Export, verify and (optionally) store a caption model; see the module docstring.

    ``vocabulary``: the word of every id (``Vocabulary.itos``); ``images``: preprocessed real
    images ``(N, 3, S, S)`` for the verification (default: rendered shape scenes).
    """
    out = Path(out)
    model = _cpu_eval_copy(model)
    cfg = model.config
    vocabulary = list(vocabulary) if vocabulary is not None else placeholder_words(cfg.vocab_size)
    if len(vocabulary) != cfg.vocab_size:
        raise ConfigError(
            f"the vocabulary has {len(vocabulary)} words but the model {cfg.vocab_size}"
        )
    config = config or {"kind": "caption", "model": cfg.to_dict()}
    family = cfg.gate.family
    chash = content_hash(model, config)
    special = dict(SPECIAL_IDS)
    meta = {
        "bbservice.kind": "caption",
        "bbservice.gate_family": family,
        "bbservice.gate_mode": "mean",
        "bbservice.config": json.dumps(config, sort_keys=True, default=str),
        "bbservice.vocabulary": json.dumps(vocabulary, ensure_ascii=False),
        "bbservice.special_ids": json.dumps(special),
        "bbservice.content_hash": chash,
    }
    with staging(out) as tmp:
        (tmp / "vocab.json").write_text(json.dumps({"itos": vocabulary}, ensure_ascii=False))
        graphs, paths = _export_all(caption_specs(model), tmp, meta, fp16, int8)
        extra_sections = {}
        if checkpoint:
            vocab_text = (tmp / "vocab.json").read_text()
            extra_sections["checkpoint"] = write_checkpoint(
                tmp, model, config, {"vocab.json": vocab_text}
            )
        log.info("verifying the caption graphs against PyTorch (tolerance %g)", tolerance)
        verifier = verify.CaptionVerifier(model, images, batch_sizes=batch_sizes, seed=seed)
        verification = verifier.verify(paths["fp32"], tolerance, verify_device)
        accuracy = {
            p: verifier.measure(files, verify_device) for p, files in paths.items() if p != "fp32"
        }
        manifest = _finish(
            "caption",
            tmp,
            config=config,
            chash=chash,
            gate_family=family,
            graphs=graphs,
            extra={
                "vocabulary_file": "vocab.json",
                "vocabulary_size": len(vocabulary),
                "special_ids": special,
                "image_size": cfg.image_size,
                "_files": ["vocab.json"],
                **extra_sections,
            },
            verification=verification,
            accuracy=accuracy,
            source=source or {},
        )
    return _stored(ExportResult(out, manifest), store)
