"""ONNX Runtime backend of the deterministic (mean-gate) models: numpy and onnxruntime only.

An export folder (written by ``bbservice export music|caption``, see ``export/onnx_export.py``)
holds one self-contained ``.onnx`` file per graph and precision and a ``manifest.json`` that
lists every file with its sha256. :func:`load_export` checks the hashes, opens one
:class:`onnxruntime.InferenceSession` per graph and returns a :class:`LoadedExport`, whose
steppers plug into the same numpy decoders as the PyTorch model:

    music:    OnnxMusicStepper   -> bbservice.music_generation.generate_rolls
    caption:  OnnxCaptionStepper -> bbservice.decoding.beam_search / greedy / sample

Graphs (batch axis dynamic everywhere; state as explicit inputs and outputs)::

    music_step        frame (B, 88), h (L, B, H), c (L, B, H) -> probs (B, 88), h_out, c_out
    caption_encoder   images (B, 3, S, S)                      -> features (B, P, C)
    caption_init      features (B, P, C)                       -> projected (B, P, A), h, c (B, H)
    caption_step      tokens (B,), h, c (B, H), features, projected
                                                 -> log_probs (B, V), h_out, c_out, attention (B, P)

``caption_init`` holds the per-image work of the decoder (the attention projection of the
features and the initial state) so that each decoding step does not redo it.

Providers: ``device="auto"`` asks for CUDA when this onnxruntime build offers it and falls back
to the CPU; the providers a session really got (``session.get_providers()``) are logged, and a
fallback from an asked-for CUDA is logged as a warning (``device="cuda"`` makes it an error).

IOBinding: on CUDA the steppers keep encoder features, the attention projection and the
recurrent state on the device across decoding steps (:class:`DeviceArray`, an ``OrtValue``
that the next step is fed directly); only tokens or frames go up and log-probabilities,
probabilities and attention come down. Beam search's row reordering runs on the device too
(:class:`DeviceOps`, a one-node ``Gather`` graph). ``io_binding=True`` runs the same code path on
the CPU provider (tests, ``bench/bench_onnx.py --io-binding``); the results equal the plain path.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bbservice.errors import ConfigError, DataError, first_line

log = logging.getLogger(__name__)

__all__ = [
    "EXPORT_FORMAT",
    "MANIFEST",
    "PRECISIONS",
    "STORE_NAMES",
    "LoadedExport",
    "OnnxCaptionStepper",
    "OnnxMusicStepper",
    "file_sha256",
    "load_export",
    "load_from_store",
    "load_model",
    "make_session",
    "read_manifest",
    "requested_providers",
    "DeviceArray",
    "DeviceOps",
    "gather_rows_model",
]

EXPORT_FORMAT = "bbservice-onnx-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")
STORE_NAMES = {"music": "bbservice-music", "caption": "bbservice-caption"}
GRAPHS = {"music": ("music_step",), "caption": ("caption_encoder", "caption_init", "caption_step")}
DEVICES = ("auto", "cpu", "cuda")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


# --------------------------------------------------------------------------------------------
# Sessions and providers
# --------------------------------------------------------------------------------------------


def requested_providers(device: str = "auto") -> list[str]:
    """The execution providers to ask for: CUDA first when wanted and offered, then the CPU."""
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if CUDA in available:
        return [CUDA, CPU]
    if device == "cuda":
        raise ConfigError(
            f"device 'cuda' was asked for but this onnxruntime build offers only {available} "
            "(install the gpu extra: onnxruntime-gpu)"
        )
    return [CPU]


_CUDA_PRELOADED = False


def _preload_cuda_libraries() -> None:
    """Load the CUDA/cuDNN libraries of the pip wheels (``onnxruntime-gpu[cuda,cudnn]``) once,
    so the CUDA provider finds them without LD_LIBRARY_PATH."""
    global _CUDA_PRELOADED
    if _CUDA_PRELOADED or not hasattr(ort, "preload_dlls"):
        return
    try:
        ort.preload_dlls()
    except Exception as err:  # missing wheels: the session falls back and says so
        log.warning("onnxruntime.preload_dlls() failed: %s", err)
    _CUDA_PRELOADED = True


def make_session(
    path: str | Path,
    device: str = "auto",
    *,
    threads: int | None = None,
) -> ort.InferenceSession:
    """An ONNX Runtime session on ``path``, on CUDA when asked for (``"auto"``: when offered).

    ``threads`` sets the intra-op thread count (``None``: onnxruntime's default, one per
    physical core). The providers the session really got are logged and are
    ``session.get_providers()``; when CUDA was asked for but the session fell back to the CPU
    (e.g. the CUDA or cuDNN libraries did not load) a warning says so, and with
    ``device="cuda"`` it is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"ONNX graph '{path}' does not exist")
    wanted = requested_providers(device)
    if CUDA in wanted:
        _preload_cuda_libraries()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: no per-node placement chatter
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=wanted)
    except Exception as err:  # onnxruntime raises its own exception types
        raise DataError(f"ONNX graph '{path}' does not load: {first_line(err)}") from err
    got = session.get_providers()
    if CUDA in wanted and CUDA not in got:
        message = f"{path.name}: CUDA was asked for but ONNX Runtime runs it on {got}"
        if device == "cuda":
            raise ConfigError(message)
        log.warning("%s (CPU fallback)", message)
    log.info("%s: ONNX Runtime providers %s", path.name, got)
    return session


def _io_shapes(items) -> list[dict[str, Any]]:
    return [{"name": i.name, "shape": list(i.shape), "dtype": i.type} for i in items]


# --------------------------------------------------------------------------------------------
# Device-resident state (IOBinding)
# --------------------------------------------------------------------------------------------

# ONNX TensorProto element types of the dtypes a state can hold.
_ONNX_TYPES = {"tensor(float)": 1, "tensor(float16)": 10, "tensor(int64)": 7, "tensor(double)": 11}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes | int) -> bytes:
    """One protobuf field: a varint (``int``) or a length-delimited value (``bytes``)."""
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def gather_rows_model(elem_type: int) -> bytes:
    """A serialized ONNX model ``Gather(data, indices, axis=0)`` for tensors of any rank whose
    element type is ``elem_type`` (TensorProto numbering), written without the ``onnx`` package
    (the serving install has only onnxruntime and numpy).

    ``data`` (N, ...) , ``indices`` (M,) int64 -> ``rows`` (M, ...).
    """

    def value_info(name: str, elem: int) -> bytes:
        tensor_type = _field(1, elem)  # no shape: any rank
        return _field(1, name.encode()) + _field(2, _field(1, tensor_type))

    attribute = _field(1, b"axis") + _field(3, 0) + _field(20, 2)  # INT attribute
    node = (
        _field(1, b"data")
        + _field(1, b"indices")
        + _field(2, b"rows")
        + _field(4, b"Gather")
        + _field(5, attribute)
    )
    graph = (
        _field(1, node)
        + _field(2, b"gather_rows")
        + _field(11, value_info("data", elem_type))
        + _field(11, value_info("indices", 7))
        + _field(12, value_info("rows", elem_type))
    )
    opset = _field(1, b"") + _field(2, 13)
    return _field(1, 8) + _field(7, graph) + _field(8, opset)


class DeviceOps:
    """Row gathers on the device where a session's state lives, so beam search can reorder
    and repeat device-resident state without a host round trip (one tiny ``Gather`` session
    per element type, on the same providers as the model)."""

    def __init__(self, device_type: str, providers: list[str], device_id: int = 0) -> None:
        self.device_type, self.device_id, self.providers = device_type, device_id, providers
        self._sessions: dict[int, ort.InferenceSession] = {}

    def to_device(self, array: np.ndarray) -> DeviceArray:
        value = ort.OrtValue.ortvalue_from_numpy(
            np.ascontiguousarray(array), self.device_type, self.device_id
        )
        return DeviceArray(value, self)

    def gather(self, array: DeviceArray, index: np.ndarray) -> DeviceArray:
        """``array[index]`` along axis 0, computed on the device."""
        elem = _ONNX_TYPES.get(array.value.data_type())
        if elem is None:
            raise ConfigError(f"no device gather for {array.value.data_type()}")
        session = self._sessions.get(elem)
        if session is None:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            session = ort.InferenceSession(
                gather_rows_model(elem), sess_options=options, providers=self.providers
            )
            self._sessions[elem] = session
        binding = session.io_binding()
        binding.bind_ortvalue_input("data", array.value)
        binding.bind_cpu_input("indices", np.ascontiguousarray(index, dtype=np.int64).ravel())
        binding.bind_output("rows", self.device_type, self.device_id)
        session.run_with_iobinding(binding)
        return DeviceArray(binding.get_outputs()[0], self)


class DeviceArray:
    """A tensor that stays where ONNX Runtime put it (an :class:`onnxruntime.OrtValue`, on the
    GPU under the CUDA provider), standing in for a numpy array in a decoder's state.

    The decoders (:mod:`bbservice.decoding`) touch state only through ``.shape``,
    ``np.take(v, index, axis=0)`` and ``np.repeat(v, n, axis=0)``; those two run on the device
    (:class:`DeviceOps`). Any other numpy function gets a host copy (``np.asarray(v)``), so
    nothing breaks, it only costs a transfer.
    """

    __slots__ = ("ops", "value")

    def __init__(self, value: ort.OrtValue, ops: DeviceOps) -> None:
        self.value, self.ops = value, ops

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape())

    @property
    def ndim(self) -> int:
        return len(self.value.shape())

    @property
    def device(self) -> str:
        return self.value.device_name()

    def numpy(self) -> np.ndarray:
        """A host copy."""
        return self.value.numpy()

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.numpy()
        return out if dtype is None else out.astype(dtype, copy=False)

    def __array_function__(self, func, types, args, kwargs):
        if func is np.take and _axis(args, kwargs, 2) == 0 and args[0] is self:
            return self.ops.gather(self, np.asarray(args[1]))
        if func is np.repeat and _axis(args, kwargs, 2) == 0 and args[0] is self:
            rows = np.repeat(
                np.arange(self.shape[0]), args[1] if len(args) > 1 else kwargs["repeats"]
            )
            return self.ops.gather(self, rows)
        return func(*_host(args), **_host(kwargs))

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, device={self.device!r})"


def _host(obj):
    """``obj`` with every :class:`DeviceArray` in it (also inside lists, tuples and dicts)
    replaced by a host copy."""
    if isinstance(obj, DeviceArray):
        return obj.numpy()
    if isinstance(obj, list | tuple):
        return type(obj)(_host(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _host(v) for k, v in obj.items()}
    return obj


def _axis(args, kwargs, position: int):
    return (
        kwargs["axis"] if "axis" in kwargs else (args[position] if len(args) > position else None)
    )


def _device_of(session: ort.InferenceSession) -> str:
    """``"cuda"`` when the session runs on ONNX Runtime's CUDA provider, else ``"cpu"``."""
    return "cuda" if CUDA in session.get_providers() else "cpu"


def _use_binding(io_binding: bool | None, session: ort.InferenceSession) -> bool:
    """``None`` (auto): bind on CUDA, where it saves a host↔device copy of the state per step;
    ``True`` binds on the CPU provider too (the same code path, for tests and benchmarks)."""
    return _device_of(session) == "cuda" if io_binding is None else bool(io_binding)


# --------------------------------------------------------------------------------------------
# Steppers
# --------------------------------------------------------------------------------------------


class OnnxMusicStepper:
    """The ``music_step`` graph as a music stepper of :mod:`bbservice.music_generation`.

    ``start(batch)`` → ``{"h", "c": zeros (L, batch, H) float32}``; ``step(frame (N, 88),
    state)`` → ``(probs (N, 88) float32, new state)``.
    """

    def __init__(self, session: ort.InferenceSession, *, io_binding: bool | None = None) -> None:
        self.session = session
        self.io_binding = _use_binding(io_binding, session)
        self.device = _device_of(session)
        self._ops = DeviceOps(self.device, session.get_providers()) if self.io_binding else None
        inputs = {i.name: i for i in session.get_inputs()}
        missing = {"frame", "h", "c"} - set(inputs)
        if missing:
            raise DataError(f"not a music step graph: inputs {sorted(missing)} are missing")
        layers, _, hidden = inputs["h"].shape
        if not isinstance(layers, int) or not isinstance(hidden, int):
            raise DataError(f"music step graph: state shape {inputs['h'].shape} is not (L, B, H)")
        self.num_layers, self.hidden_size = layers, hidden
        self.n_keys = inputs["frame"].shape[1]
        self.outputs = ["probs", "h_out", "c_out"]

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def start(self, batch: int) -> dict[str, Any]:
        zeros = np.zeros((self.num_layers, batch, self.hidden_size), dtype=np.float32)
        if self._ops is not None:
            return {"h": self._ops.to_device(zeros), "c": self._ops.to_device(zeros)}
        return {"h": zeros, "c": zeros.copy()}

    def step(self, frame: np.ndarray, state: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        if self._ops is not None:
            return self._bound_step(frame, state)
        feeds = {
            "frame": np.ascontiguousarray(frame, dtype=np.float32),
            "h": state["h"],
            "c": state["c"],
        }
        probs, h, c = self.session.run(self.outputs, feeds)
        return probs, {"h": h, "c": c}

    def _bound_step(self, frame: np.ndarray, state: dict[str, Any]) -> tuple[np.ndarray, dict]:
        """The IOBinding step: h and c stay on the device, only frames and probs travel."""
        ops = self._ops
        binding = self.session.io_binding()
        binding.bind_cpu_input("frame", np.ascontiguousarray(frame, dtype=np.float32))
        for key in ("h", "c"):
            value = state[key]
            value = value if isinstance(value, DeviceArray) else ops.to_device(value)
            binding.bind_ortvalue_input(key, value.value)
        binding.bind_output("probs", "cpu")
        binding.bind_output("h_out", ops.device_type, ops.device_id)
        binding.bind_output("c_out", ops.device_type, ops.device_id)
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        probs, h, c = binding.get_outputs()
        return probs.numpy(), {"h": DeviceArray(h, ops), "c": DeviceArray(c, ops)}


class OnnxCaptionStepper:
    """The three caption graphs as a :class:`bbservice.decoding.Stepper`.

    ``start(images (B, 3, S, S) float32)`` runs the encoder once (encoder features ``(B, P, C)``
    are accepted too) and ``caption_init``, giving the state ``{"h", "c": (B, H), "features":
    (B, P, C), "projected": (B, P, A)}``; ``step(tokens (N,), state)`` runs ``caption_step``
    → ``(log_probs (N, V), new state, attention (N, P))``. ``features`` and ``projected``
    are per-image constants (:attr:`static_keys`), as in ``TorchCaptionStepper``.
    """

    static_keys = ("features", "projected")

    def __init__(
        self,
        encoder: ort.InferenceSession,
        init: ort.InferenceSession,
        step: ort.InferenceSession,
        *,
        io_binding: bool | None = None,
    ) -> None:
        self.encoder, self.init, self.step_session = encoder, init, step
        self._step_outputs = ["log_probs", "h_out", "c_out", "attention"]
        self.io_binding = _use_binding(io_binding, step)
        self.device = _device_of(step)
        self._ops = DeviceOps(self.device, step.get_providers()) if self.io_binding else None

    @property
    def providers(self) -> dict[str, list[str]]:
        return {
            "caption_encoder": self.encoder.get_providers(),
            "caption_init": self.init.get_providers(),
            "caption_step": self.step_session.get_providers(),
        }

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Encoder features ``(B, P, C)`` of preprocessed images ``(B, 3, S, S)``."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        self.encode_check(images)
        return self.encoder.run(["features"], {"images": images})[0]

    def encode_check(self, images: np.ndarray) -> None:
        """A :class:`ConfigError` unless ``images`` is ``(B, 3, S, S)`` at the graph's size."""
        expected = self.encoder.get_inputs()[0].shape
        if images.ndim != 4 or tuple(images.shape[1:]) != tuple(expected[1:]):
            raise ConfigError(
                f"images must be (B, {', '.join(map(str, expected[1:]))}), got {images.shape}"
            )

    def start(self, inputs: np.ndarray) -> dict[str, Any]:
        x = np.ascontiguousarray(inputs, dtype=np.float32)
        if self._ops is not None:
            return self._bound_start(x)
        features = self.encode(x) if x.ndim == 4 else x
        projected, h, c = self.init.run(["projected", "h", "c"], {"features": features})
        return {"h": h, "c": c, "features": features, "projected": projected}

    def step(
        self, tokens: np.ndarray, state: dict[str, Any]
    ) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
        if self._ops is not None:
            return self._bound_step(tokens, state)
        feeds = {
            "tokens": np.ascontiguousarray(tokens, dtype=np.int64),
            "h": state["h"],
            "c": state["c"],
            "features": state["features"],
            "projected": state["projected"],
        }
        log_probs, h, c, attention = self.step_session.run(self._step_outputs, feeds)
        return log_probs, dict(state, h=h, c=c), attention

    def _bound_start(self, x: np.ndarray) -> dict[str, Any]:
        """Encoder and init under IOBinding: features, projection and state stay on the device."""
        ops = self._ops
        dev = (ops.device_type, ops.device_id)
        if x.ndim == 4:
            self.encode_check(x)
            binding = self.encoder.io_binding()
            binding.bind_cpu_input("images", x)
            binding.bind_output("features", *dev)
            binding.synchronize_inputs()
            self.encoder.run_with_iobinding(binding)
            features = DeviceArray(binding.get_outputs()[0], ops)
        else:
            features = ops.to_device(x)
        binding = self.init.io_binding()
        binding.bind_ortvalue_input("features", features.value)
        for name in ("projected", "h", "c"):
            binding.bind_output(name, *dev)
        self.init.run_with_iobinding(binding)
        projected, h, c = (DeviceArray(v, ops) for v in binding.get_outputs())
        return {"h": h, "c": c, "features": features, "projected": projected}

    def _bound_step(
        self, tokens: np.ndarray, state: dict[str, Any]
    ) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
        """One decoding step under IOBinding: tokens go up, log-probabilities and attention
        come down, everything else stays on the device."""
        ops = self._ops
        binding = self.step_session.io_binding()
        binding.bind_cpu_input("tokens", np.ascontiguousarray(tokens, dtype=np.int64))
        for key in ("h", "c", "features", "projected"):
            value = state[key]
            value = value if isinstance(value, DeviceArray) else ops.to_device(value)
            binding.bind_ortvalue_input(key, value.value)
        binding.bind_output("log_probs", "cpu")
        binding.bind_output("h_out", ops.device_type, ops.device_id)
        binding.bind_output("c_out", ops.device_type, ops.device_id)
        binding.bind_output("attention", "cpu")
        binding.synchronize_inputs()
        self.step_session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        log_probs, h, c, attention = binding.get_outputs()
        new_state = dict(state, h=DeviceArray(h, ops), c=DeviceArray(c, ops))
        return log_probs.numpy(), new_state, attention.numpy()


# --------------------------------------------------------------------------------------------
# Export folders
# --------------------------------------------------------------------------------------------


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: str | Path, *, check_files: bool = True) -> dict:
    """``manifest.json`` of an export folder; with ``check_files`` every listed file must exist
    with the recorded size and sha256 (a :class:`DataError` names the first that does not)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise DataError(f"export folder '{folder}' does not exist")
    if not path.is_file():
        raise DataError(f"'{folder}' is not an ONNX export (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: corrupt manifest ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise DataError(f"{path}: not a {EXPORT_FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: format version {manifest.get('format_version')} is not supported "
            f"(this bbservice reads {FORMAT_VERSION})"
        )
    if manifest.get("kind") not in GRAPHS:
        raise DataError(f"{path}: unknown export kind {manifest.get('kind')!r}")
    if check_files:
        for name, info in manifest.get("files", {}).items():
            file = folder / name
            if not file.is_file():
                raise DataError(f"{file}: listed in the manifest but missing")
            size = file.stat().st_size
            if size != info.get("bytes"):
                raise DataError(
                    f"{file}: {size} bytes, the manifest says {info.get('bytes')} (corrupt or "
                    "replaced file)"
                )
            digest = file_sha256(file)
            if digest != info.get("sha256"):
                raise DataError(
                    f"{file}: sha256 {digest[:12]}… does not match the manifest's "
                    f"{str(info.get('sha256'))[:12]}… (corrupt or replaced file)"
                )
    return manifest


@dataclass
class LoadedExport:
    """An export folder with one ONNX Runtime session per graph (see :func:`load_export`)."""

    path: Path
    manifest: dict
    precision: str
    sessions: dict[str, ort.InferenceSession] = field(repr=False)
    _itos: list[str] | None = field(default=None, init=False, repr=False)

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def config(self) -> dict:
        """The configuration the model was trained (or built) with."""
        return self.manifest["config"]

    @property
    def model_config(self) -> dict:
        return self.manifest["config"]["model"]

    @property
    def providers(self) -> dict[str, list[str]]:
        """The execution providers each graph's session really runs on."""
        return {name: s.get_providers() for name, s in self.sessions.items()}

    # -- music ---------------------------------------------------------------------------------

    @property
    def device(self) -> str:
        """``"cuda"`` when every graph runs on ONNX Runtime's CUDA provider, ``"cpu"`` when
        none does, ``"mixed"`` otherwise."""
        devices = {_device_of(s) for s in self.sessions.values()}
        return devices.pop() if len(devices) == 1 else "mixed"

    def info(self) -> dict[str, Any]:
        """What ``GET /models`` shows of the runtime: device, real providers per graph,
        whether decoding keeps its state on the device (IOBinding), precision."""
        return {
            "device": self.device,
            "providers": self.providers,
            "io_binding": self.device == "cuda",
            "precision": self.precision,
            "onnxruntime": ort.__version__,
        }

    def music_stepper(self, *, io_binding: bool | None = None) -> OnnxMusicStepper:
        """The music stepper; ``io_binding`` None (auto) binds state to the device on CUDA."""
        self._need("music")
        return OnnxMusicStepper(self.sessions["music_step"], io_binding=io_binding)

    @property
    def grid(self) -> dict:
        """The piano-roll time grid (``{"frames_per_beat": n}`` or ``{"fps": r}``) for MIDI."""
        self._need("music")
        return dict(self.manifest["grid"])

    # -- caption -------------------------------------------------------------------------------

    def caption_stepper(self, *, io_binding: bool | None = None) -> OnnxCaptionStepper:
        """The caption stepper; ``io_binding`` None (auto) keeps features and state on the
        device across decoding steps on CUDA."""
        self._need("caption")
        s = self.sessions
        return OnnxCaptionStepper(
            s["caption_encoder"], s["caption_init"], s["caption_step"], io_binding=io_binding
        )

    @property
    def vocabulary(self) -> list[str]:
        """Word of every id (``<pad>``, ``<start>``, ``<end>``, ``<unk>``, then the words)."""
        self._need("caption")
        if self._itos is None:
            data = json.loads((self.path / self.manifest["vocabulary_file"]).read_text())
            self._itos = list(data["itos"])
        return self._itos

    @property
    def special_ids(self) -> dict[str, int]:
        """``{"pad", "start", "end", "unk"}`` ids."""
        self._need("caption")
        return dict(self.manifest["special_ids"])

    @property
    def image_size(self) -> int:
        self._need("caption")
        return int(self.model_config["image_size"])

    @property
    def max_length(self) -> int:
        self._need("caption")
        return int(self.model_config["max_length"])

    def words(self, tokens: Sequence[int]) -> list[str]:
        """Word ids (as in a decoded :class:`bbservice.decoding.Hypothesis`) → words."""
        itos = self.vocabulary
        ids = self.special_ids
        skip = {ids["pad"], ids["start"]}
        out = []
        for t in tokens:
            t = int(t)
            if t == ids["end"]:
                break
            if t not in skip:
                out.append(itos[t] if 0 <= t < len(itos) else itos[ids["unk"]])
        return out

    def _need(self, kind: str) -> None:
        if self.kind != kind:
            raise ConfigError(f"export '{self.path}' is a {self.kind} model, not {kind}")


def load_export(
    folder: str | Path,
    *,
    device: str = "auto",
    precision: str = "fp32",
    threads: int | None = None,
    check_files: bool = True,
) -> LoadedExport:
    """Open an export folder: check the manifest's hashes, then one session per graph.

    ``precision`` chooses the variant (``fp32``, or ``fp16`` / ``int8`` when the export made
    them); every graph must carry the export's content hash in its ONNX metadata, so graphs
    of different models cannot be mixed.
    """
    folder = Path(folder)
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    manifest = read_manifest(folder, check_files=check_files)
    kind = manifest["kind"]
    sessions: dict[str, ort.InferenceSession] = {}
    for graph in GRAPHS[kind]:
        entry = manifest.get("graphs", {}).get(graph)
        if entry is None:
            raise DataError(f"{folder / MANIFEST}: no '{graph}' graph")
        files = entry.get("files", {})
        if precision not in files:
            raise ConfigError(
                f"export '{folder}' has no {precision} variant (it has {sorted(files)}); "
                "re-export with --fp16 / --int8"
            )
        session = make_session(folder / files[precision], device, threads=threads)
        meta = session.get_modelmeta().custom_metadata_map
        if meta.get("bbservice.content_hash") != manifest.get("content_hash"):
            raise DataError(
                f"{folder / files[precision]}: its content hash "
                f"{meta.get('bbservice.content_hash')!r} is not the manifest's "
                f"{manifest.get('content_hash')!r} (graphs of another model)"
            )
        sessions[graph] = session
    log.info("loaded %s export '%s' (%s)", kind, folder, precision)
    return LoadedExport(path=folder, manifest=manifest, precision=precision, sessions=sessions)


def load_from_store(
    tag: str, *, device: str = "auto", precision: str = "fp32", threads: int | None = None
) -> LoadedExport:
    """:func:`load_export` of a BentoML model-store entry, e.g. ``"bbservice-music:latest"``."""
    import bentoml

    try:
        model = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound as err:
        raise DataError(
            f"model '{tag}' is not in the BentoML model store (run bbservice export first)"
        ) from err
    return load_export(model.path, device=device, precision=precision, threads=threads)


def load_model(bento_model, **kwargs) -> LoadedExport:
    """BentoML's framework-module hook: ``bentoml.models.get(tag).load_model()`` (the store
    entries name this module) gives :func:`load_export` of the entry's folder."""
    return load_export(bento_model.path, **kwargs)


def describe_graph(session: ort.InferenceSession) -> dict[str, Any]:
    """Input and output names, shapes and types of a session (for logs and manifests)."""
    return {
        "inputs": _io_shapes(session.get_inputs()),
        "outputs": _io_shapes(session.get_outputs()),
    }
