"""The BentoML service: captions and music over HTTP. Thin: validate, call the runtime, shape.

Endpoints (all ``POST``; BentoML adds ``GET /livez``, ``/readyz``, ``/metrics`` and the
OpenAPI page at ``/``)::

    /caption        multipart: image file + decoding parameters      -> JSON captions
    /generate       JSON or multipart (optional primer MIDI file)    -> audio/midi file
    /generate_json  same parameters as /generate                     -> JSON notes + PNG rolls
    /models         (no body)                                        -> what is loaded

``mode="mean"`` (default) runs the exported mean-gate graphs on ONNX Runtime
(:mod:`bbservice.runtime`); ``mode="stochastic"`` runs the PyTorch model with sampled gates
(torch is imported only then) and needs the training checkpoint next to the export.

Models come from BentoML's model store (``bbservice-music:latest``,
``bbservice-caption:latest``, written by ``bbservice export``) unless an environment variable
points at an export folder. Environment variables (all optional):

    BBSERVICE_MUSIC_EXPORT, BBSERVICE_CAPTION_EXPORT     export folders instead of the store
    BBSERVICE_MUSIC_CHECKPOINT, BBSERVICE_CAPTION_CHECKPOINT
                                 PyTorch checkpoint folders for mode=stochastic (default: the
                                 export's ``checkpoint/`` folder, else the manifest's source)
    BBSERVICE_STOCHASTIC         auto (default) | off
    BBSERVICE_DEVICE             auto (default) | cpu | cuda     ONNX Runtime providers
    BBSERVICE_PRECISION          fp32 (default) | fp16 | int8
    BBSERVICE_ORT_THREADS        intra-op threads per session (default: ONNX Runtime's)
    BBSERVICE_MAX_UPLOAD_BYTES   request body limit (default 10 MiB) -> 413
    BBSERVICE_MAX_PIXELS         image pixel limit (default 25 M) -> 413
    BBSERVICE_MAX_BATCH          caption adaptive-batch size (default 16; 1 = no batching)

Readiness: ``/readyz`` answers 503 until a warm-up inference of every model has passed (run in
a background thread, so ``/livez`` answers at once); a model that fails to load or to warm up
keeps the service unready and ``/models`` says why. Every response echoes the model's content
hash, the decoding parameters and the seed; the same request gives the same answer.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import anyio.to_thread
import bentoml
import numpy as np
from pydantic import BaseModel, Field
from starlette.datastructures import Headers, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import bbservice
from bbservice import runtime
from bbservice.decoding import Hypothesis, beam_search, sample_gate_passes
from bbservice.errors import BBServiceError, ConfigError, DataError
from bbservice.hashing import content_hash
from bbservice.images import ImageTooLargeError, load_image, preprocess
from bbservice.music_generation import GenerationParams, generate_rolls
from bbservice.pianoroll import LOWEST_PITCH, N_KEYS, midi_to_roll, roll_to_midi, roll_to_png

log = logging.getLogger("bbservice.service")
# The optional `primer` file field has default None, which BentoML's file serializer cannot
# show in the JSON schema; pydantic warns about that on every schema build.
warnings.filterwarnings("ignore", message="Unable to serialize value None with the plain serial")

# -- request limits (out of range: 400 naming the parameter) -----------------------------------
MAX_BEAM = 10
MAX_CAPTION_WORDS = 50
MAX_SAMPLES = 32
MAX_FRAMES = 2048
MAX_OUTPUTS = 8
MAX_TOTAL_FRAMES = 8192  # frames x num_outputs of one request
MAX_PRIMER_FRAMES = 2048
MAX_PRIMER_BYTES = 1 << 20
MAX_SEED = 2**63 - 1
REQUEST_TIMEOUT_S = 60.0
MAX_CONCURRENCY = 128  # per worker; more concurrent requests get 429
WARMUP_WAIT_S = 30.0  # how long a request waits for a model that is still warming up
FILE_FIELDS = {"/caption": {"image"}, "/generate": {"primer"}, "/generate_json": {"primer"}}


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


def _env_int(env, name: str, default: int, low: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value}")
    return value


def _env_choice(env, name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.get(name) or default
    if value not in choices:
        raise ConfigError(f"{name}={value!r}; choose one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class Settings:
    """The service's configuration, read from the environment (see the module docstring)."""

    music_export: str | None = None
    caption_export: str | None = None
    music_checkpoint: str | None = None
    caption_checkpoint: str | None = None
    stochastic: str = "auto"
    device: str = "auto"
    precision: str = "fp32"
    ort_threads: int | None = None
    max_upload_bytes: int = 10 << 20
    max_pixels: int = 25_000_000
    max_batch: int = 16

    @classmethod
    def from_env(cls, env=None) -> Settings:
        env = os.environ if env is None else env
        threads = _env_int(env, "BBSERVICE_ORT_THREADS", 0, 0)
        return cls(
            music_export=env.get("BBSERVICE_MUSIC_EXPORT") or None,
            caption_export=env.get("BBSERVICE_CAPTION_EXPORT") or None,
            music_checkpoint=env.get("BBSERVICE_MUSIC_CHECKPOINT") or None,
            caption_checkpoint=env.get("BBSERVICE_CAPTION_CHECKPOINT") or None,
            stochastic=_env_choice(env, "BBSERVICE_STOCHASTIC", "auto", ("auto", "off")),
            device=_env_choice(env, "BBSERVICE_DEVICE", "auto", runtime.DEVICES),
            precision=_env_choice(env, "BBSERVICE_PRECISION", "fp32", runtime.PRECISIONS),
            ort_threads=threads or None,
            max_upload_bytes=_env_int(env, "BBSERVICE_MAX_UPLOAD_BYTES", 10 << 20, 1024),
            max_pixels=_env_int(env, "BBSERVICE_MAX_PIXELS", 25_000_000, 1),
            max_batch=_env_int(env, "BBSERVICE_MAX_BATCH", 16, 1),
        )

    def export_folder(self, kind: str) -> str | None:
        return self.music_export if kind == "music" else self.caption_export

    def checkpoint_folder(self, kind: str) -> str | None:
        return self.music_checkpoint if kind == "music" else self.caption_checkpoint

    def limits(self) -> dict[str, Any]:
        return {
            "max_upload_bytes": self.max_upload_bytes,
            "max_pixels": self.max_pixels,
            "max_primer_bytes": MAX_PRIMER_BYTES,
            "max_primer_frames": MAX_PRIMER_FRAMES,
            "max_beam_size": MAX_BEAM,
            "max_caption_words": MAX_CAPTION_WORDS,
            "max_samples": MAX_SAMPLES,
            "max_frames": MAX_FRAMES,
            "max_outputs": MAX_OUTPUTS,
            "max_total_frames": MAX_TOTAL_FRAMES,
            "request_timeout_s": REQUEST_TIMEOUT_S,
            "max_concurrency": MAX_CONCURRENCY,
        }


# --------------------------------------------------------------------------------------------
# Errors -> HTTP answers
# --------------------------------------------------------------------------------------------


class HTTPError(Exception):
    """An answer other than 200, with a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> JSONResponse:
    headers = {"X-BBService-Error": "1"}
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _as_http_error(err: Exception) -> HTTPError:
    if isinstance(err, HTTPError):
        return err
    if isinstance(err, ImageTooLargeError):
        return HTTPError(413, _first_line(err))
    if isinstance(err, BBServiceError):
        return HTTPError(400, _first_line(err))
    log.exception("unexpected error while answering a request")
    return HTTPError(500, "internal error; the server log has the details")


# --------------------------------------------------------------------------------------------
# Request guard: body size limit and sane form fields, before BentoML parses anything
# --------------------------------------------------------------------------------------------


class RequestGuard:
    """ASGI middleware: body limit (413) and file fields that really are files (400).

    The body of a ``POST`` is read here (at most ``max_bytes``; a larger ``Content-Length`` is
    refused before reading) and replayed to the application. For the endpoints that take files,
    a form whose file field holds text is refused: BentoML would otherwise treat the text as a
    URL to download.
    """

    def __init__(self, app, max_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes or Settings.from_env().max_upload_bytes

    async def _reply(self, scope, receive, send, status: int, message: str) -> None:
        await error_response(status, message)(scope, receive, send)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        too_big = (
            f"request body is larger than the limit of {self.max_bytes} bytes "
            "(BBSERVICE_MAX_UPLOAD_BYTES)"
        )
        length = headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await self._reply(scope, receive, send, 400, "invalid Content-Length")
            if declared > self.max_bytes:
                return await self._reply(scope, receive, send, 413, too_big)
        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                return await self._reply(scope, receive, send, 413, too_big)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        fields = FILE_FIELDS.get(scope["path"].rstrip("/") or "/")
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if fields and ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
            problem = await self._check_form(scope, body, fields)
            if problem:
                return await self._reply(scope, receive, send, 400, problem)

        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, _ClientErrorRewriter(send))

    @staticmethod
    async def _check_form(scope, body: bytes, fields: set[str]) -> str | None:
        done = False

        async def once():
            nonlocal done
            if done:
                return {"type": "http.disconnect"}
            done = True
            return {"type": "http.request", "body": body, "more_body": False}

        request = Request(scope, once)
        try:
            form = await request.form(max_files=8, max_fields=64)
        except Exception as err:  # malformed multipart: starlette raises several types
            detail = getattr(err, "detail", None) or _first_line(err)
            return f"malformed form data: {detail}"
        try:
            for name in sorted(fields):
                for value in form.getlist(name):
                    if not isinstance(value, UploadFile):
                        return (
                            f"'{name}' must be an uploaded file (multipart/form-data, e.g. "
                            f"curl -F {name}=@FILE), not a text value"
                        )
        finally:
            await form.close()
        return None


def _client_error_body(status: int, body: bytes) -> bytes:
    """BentoML's 4xx bodies in this service's shape: ``{"error": one line, "status": ...}``.

    Validation errors (``{"error": "1 validation error for Input", "detail": [...]}``) become
    ``"beam_size: Input should be less than or equal to 10"``; ``[{"error": ...}]`` is unwrapped.
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        text = body.decode("utf-8", "replace").strip()
        return json.dumps({"error": text or f"HTTP {status}", "status": status}).encode()
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
        data = data[0]
    if not isinstance(data, dict) or "status" in data:
        return body
    out = {"error": str(data.get("error") or f"HTTP {status}"), "status": status}
    detail = data.get("detail")
    if isinstance(detail, list) and detail and all(isinstance(d, dict) for d in detail):
        parts = []
        for d in detail:
            where = ".".join(str(p) for p in d.get("loc", ()) if p not in ("body",)) or "body"
            parts.append(f"{where}: {d.get('msg', 'invalid')}")
        out["error"] = "; ".join(parts)
        out["detail"] = detail
    elif detail:
        out["error"] = str(detail)
    return json.dumps(out).encode()


class _ClientErrorRewriter:
    """An ASGI ``send`` that rewrites 4xx bodies not made here with :func:`_client_error_body`."""

    def __init__(self, send) -> None:
        self.send = send
        self.start: dict | None = None
        self.chunks: list[bytes] = []

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            ours = any(k.lower() == b"x-bbservice-error" for k, _ in message.get("headers", []))
            if 400 <= message["status"] < 500 and not ours:
                self.start = message
                return
        elif message["type"] == "http.response.body" and self.start is not None:
            self.chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = _client_error_body(self.start["status"], b"".join(self.chunks))
            drop = (b"content-length", b"content-type")
            headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() not in drop]
            headers += [(b"content-length", str(len(body)).encode())]
            headers += [(b"content-type", b"application/json")]
            await self.send({**self.start, "headers": headers})
            self.start = None
            return await self.send({"type": "http.response.body", "body": body})
        await self.send(message)


# --------------------------------------------------------------------------------------------
# Model slots: one per kind, loaded and warmed up in the background
# --------------------------------------------------------------------------------------------


class _TorchMusicSampler:
    """The PyTorch music model as a music stepper with sampled gates drawn from ``seed``
    (as ``bbservice generate music --mode sample``)."""

    def __init__(self, model, seed: int) -> None:
        import torch

        self.torch, self.model = torch, model
        self.generator = torch.Generator().manual_seed(seed)
        self.matmuls = None

    def start(self, batch: int) -> dict:
        with self.torch.no_grad():
            self.matmuls = [cell.recurrent_matmuls(batch) for cell in self.model.rnn.cells]
        h, c = self.model.zero_state(batch)
        return {"h": h, "c": c}

    def step(self, frame: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        with self.torch.no_grad():
            x = self.torch.as_tensor(np.ascontiguousarray(frame, dtype=np.float32))
            probs, h, c = self.model.step(
                x, state["h"], state["c"], "sample", self.matmuls, self.generator
            )
        return probs.float().numpy(), {"h": h, "c": c}


@dataclass
class Stochastic:
    """The PyTorch model of a slot, for sampled gates; loaded on first use (or at warm-up)."""

    kind: str
    enabled: bool
    candidates: list[Path]
    model: Any = None
    checkpoint: Path | None = None
    reason: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def status(self) -> dict[str, Any]:
        return {
            "available": self.model is not None,
            "loaded": self.model is not None or self.reason is not None,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "reason": self.reason,
        }

    def get(self, manifest: dict):
        with self.lock:
            if self.model is None and self.reason is None:
                try:
                    self.model = self._load(manifest)
                except Exception as err:  # every failure disables the mode, with the reason
                    self.reason = _first_line(err)
                    log.warning("%s: stochastic mode unavailable: %s", self.kind, self.reason)
        if self.model is None:
            raise HTTPError(
                409,
                f"mode=stochastic is not available for the {self.kind} model in this "
                f"deployment: {self.reason}; use mode=mean",
            )
        return self.model

    def _load(self, manifest: dict):
        if not self.enabled:
            raise ConfigError("disabled by BBSERVICE_STOCHASTIC=off")
        try:
            import torch  # noqa: F401
        except ImportError:
            raise ConfigError(
                "PyTorch is not installed here (install bbservice[train] or torch)"
            ) from None
        folders = [f for c in self.candidates for f in (c, c / "best")]  # or run folders
        folder = next((f for f in folders if (f / "model.safetensors").is_file()), None)
        if folder is None:
            where = ", ".join(str(c) for c in self.candidates) or "none given"
            raise DataError(f"no PyTorch checkpoint (model.safetensors) found; looked in {where}")
        config = json.loads((folder / "config.json").read_text())
        if self.kind == "music":
            from safetensors.torch import load_file

            from bbservice.models.music import MusicConfig, PianoRollModel

            model = PianoRollModel(MusicConfig.from_dict(config["model"]))
            model.load_state_dict(load_file(str(folder / "model.safetensors")))
            model.eval()
        else:
            from bbservice.models.caption import CaptionModel

            model = CaptionModel.from_checkpoint(folder, "cpu")
        expected = manifest.get("content_hash")
        exported_model = manifest.get("config", {}).get("model")
        pruned = manifest.get("config", {}).get("pruned")
        if pruned:  # a pruned export: its sparse source checkpoint samples the gates
            expected, exported_model = pruned.get("source_content_hash"), pruned.get("source_model")
        same_model = config.get("model") == exported_model
        hashes = {content_hash(model, config), content_hash(model, manifest["config"])}
        if expected not in hashes or not same_model:
            raise DataError(
                f"checkpoint '{folder}' is not the exported model (content hash differs from "
                f"{str(expected)[:12]})"
            )
        self.checkpoint = folder
        log.info("%s: stochastic mode ready (checkpoint %s)", self.kind, folder)
        return model


@dataclass
class ModelSlot:
    kind: str
    state: str = "loading"  # loading | warm | failed
    error: str | None = None
    export: runtime.LoadedExport | None = None
    tag: str | None = None
    source: str | None = None
    created: str | None = None
    warmup_ms: float | None = None
    stochastic: Stochastic | None = None
    stepper: Any = None
    event: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def content_hash(self) -> str:
        return self.export.manifest["content_hash"]

    def identity(self, precision: str) -> dict[str, Any]:
        m = self.export.manifest
        return {
            "name": runtime.STORE_NAMES[self.kind],
            "tag": self.tag,
            "content_hash": m["content_hash"],
            "gate_family": m.get("gate_family"),
            "precision": precision,
        }


# --------------------------------------------------------------------------------------------
# Adaptive batching of caption requests
# --------------------------------------------------------------------------------------------


class CaptionBatcher:
    """Requests that arrive while a batch is running wait and form the next batch together.

    No added latency when idle: the first request runs at once (batch of one); while it runs,
    later requests with the same decoding parameters queue and then run as one batched encoder
    call and one batched beam search (up to ``max_batch`` images).
    """

    def __init__(self, run: Callable[[tuple, list[np.ndarray]], list], max_batch: int) -> None:
        self.run, self.max_batch = run, max_batch
        self.pending: list[tuple[tuple, np.ndarray, asyncio.Future]] = []
        self.running = False
        self.limiter = anyio.CapacityLimiter(1)
        self.batches = 0
        self.images = 0

    async def submit(self, key: tuple, array: np.ndarray) -> tuple[Any, int]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending.append((key, array, future))
        if not self.running:
            self.running = True
            loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self.pending:
                key = self.pending[0][0]
                batch = [p for p in self.pending if p[0] == key][: self.max_batch]
                taken = {id(p) for p in batch}
                self.pending = [p for p in self.pending if id(p) not in taken]
                batch = [p for p in batch if not p[2].done()]  # timed-out requests drop out
                if not batch:
                    continue
                try:
                    results = await anyio.to_thread.run_sync(
                        self.run, key, [p[1] for p in batch], limiter=self.limiter
                    )
                except Exception as err:
                    for p in batch:
                        if not p[2].done():
                            p[2].set_exception(err)
                    continue
                self.batches += 1
                self.images += len(batch)
                for p, result in zip(batch, results, strict=True):
                    if not p[2].done():
                        p[2].set_result((result, len(batch)))
        finally:
            self.running = False

    def stats(self) -> dict[str, Any]:
        return {
            "max_batch": self.max_batch,
            "batches": self.batches,
            "images": self.images,
            "mean_batch_size": round(self.images / self.batches, 3) if self.batches else None,
        }


# --------------------------------------------------------------------------------------------
# Response documentation (OpenAPI); the endpoints answer with JSON of these shapes
# --------------------------------------------------------------------------------------------


class ModelIdentity(BaseModel):
    name: str
    tag: str | None = Field(None, description="model store tag; null for an export folder")
    content_hash: str
    gate_family: str | None = None
    precision: str


class CaptionItem(BaseModel):
    text: str
    words: list[str]
    log_prob: float | None = None
    score: float | None = None
    finished: bool | None = None
    count: int | None = Field(None, description="stochastic: passes that gave this caption")
    frequency: float | None = None
    attention: list[list[list[float]]] | None = Field(
        None, description="per word a G x G attention map (attention=true)"
    )


class CaptionResponse(BaseModel):
    captions: list[CaptionItem]
    mode: str
    model: ModelIdentity
    params: dict[str, Any]
    seed: int
    image: dict[str, int]
    uncertainty: dict[str, float] | None = None


class MusicOutput(BaseModel):
    index: int
    frames: int
    primer_frames: int
    notes: list[dict[str, float]]
    piano_roll_png: str = Field(description="base64 PNG: time on x, pitch on y")


class MusicResponse(BaseModel):
    outputs: list[MusicOutput]
    mode: str
    model: ModelIdentity
    params: dict[str, Any]
    seed: int
    grid: dict[str, float]


# --------------------------------------------------------------------------------------------
# The service
# --------------------------------------------------------------------------------------------

Mode = Literal["mean", "stochastic"]


@bentoml.service(
    name="bbservice",
    workers=1,
    traffic={"timeout": REQUEST_TIMEOUT_S, "max_concurrency": MAX_CONCURRENCY},
    labels={"project": "bbservice"},
)
class BBService:
    """Captions (attention LSTM with Beta gates) and polyphonic music (piano-roll LSTM)."""

    # Model-store references: `bentoml build` packs them and `bentoml serve` fetches them at
    # start. Left out where an export folder replaces the store entry (set before import).
    if not os.environ.get("BBSERVICE_MUSIC_EXPORT"):
        music_model = bentoml.models.BentoModel(f"{runtime.STORE_NAMES['music']}:latest")
    if not os.environ.get("BBSERVICE_CAPTION_EXPORT"):
        caption_model = bentoml.models.BentoModel(f"{runtime.STORE_NAMES['caption']}:latest")

    def __init__(self) -> None:
        self.settings = Settings.from_env()
        self.slots = {kind: ModelSlot(kind) for kind in ("music", "caption")}
        self.batcher = CaptionBatcher(self._caption_batch, self.settings.max_batch)
        self.prep_limiter = anyio.CapacityLimiter(2)
        self.music_limiter = anyio.CapacityLimiter(1)
        self.stochastic_limiter = anyio.CapacityLimiter(1)
        self.warmup = threading.Thread(target=self._warm_up, name="bbservice-warmup", daemon=True)
        self.warmup.start()

    @bentoml.on_shutdown
    def _stop(self) -> None:
        """Let a warm-up still running (e.g. loading the PyTorch models) finish first."""
        self.warmup.join(timeout=60)

    # -- readiness --------------------------------------------------------------------------

    def __is_ready__(self) -> bool:
        return all(slot.state == "warm" for slot in self.slots.values())

    def _warm_up(self) -> None:
        self._preload_cuda()
        for slot in self.slots.values():
            start = time.perf_counter()
            try:
                self._load(slot)
                (self._warm_music if slot.kind == "music" else self._warm_caption)(slot)
                slot.warmup_ms = round((time.perf_counter() - start) * 1000, 1)
                slot.state = "warm"
                log.info("%s model warm (%.0f ms)", slot.kind, slot.warmup_ms)
            except Exception as err:
                slot.state, slot.error = "failed", _first_line(err)
                log.error("%s model failed to load or warm up: %s", slot.kind, slot.error)
            finally:
                slot.event.set()
        for slot in self.slots.values():  # after readiness: the optional PyTorch models
            if slot.state == "warm" and slot.stochastic.enabled:
                try:
                    slot.stochastic.get(slot.export.manifest)
                except HTTPError:
                    pass

    def _preload_cuda(self) -> None:
        """Load the CUDA and cuDNN libraries of the pip wheels (onnxruntime-gpu[cuda,cudnn])
        before the first CUDA session, so that ONNX Runtime finds them without LD_LIBRARY_PATH."""
        import onnxruntime as ort

        if self.settings.device == "cpu" or runtime.CUDA not in ort.get_available_providers():
            return
        try:
            ort.preload_dlls()
        except Exception as err:  # the session then reports (and logs) the CPU fallback
            log.warning("could not preload the CUDA libraries: %s", _first_line(err))

    def _load(self, slot: ModelSlot) -> None:
        s = self.settings
        folder = s.export_folder(slot.kind)
        if folder:
            slot.source, path = "export folder", Path(folder)
        else:
            ref = type(self).__dict__.get(f"{slot.kind}_model") or bentoml.models.BentoModel(
                f"{runtime.STORE_NAMES[slot.kind]}:latest"
            )
            stored = ref.stored
            if stored is None:
                raise DataError(
                    f"model '{ref.tag}' is not in the BentoML model store; run "
                    f"`bbservice export {slot.kind} CHECKPOINT` or set "
                    f"BBSERVICE_{slot.kind.upper()}_EXPORT to an export folder"
                )
            slot.source, path = "model store", Path(stored.path)
            slot.tag = str(stored.tag)
            slot.created = stored.info.creation_time.isoformat(timespec="seconds")
        slot.export = runtime.load_export(
            path, device=s.device, precision=s.precision, threads=s.ort_threads
        )
        if slot.export.kind != slot.kind:
            raise DataError(f"'{path}' holds a {slot.export.kind} model, not {slot.kind}")
        slot.created = slot.created or slot.export.manifest.get("created")
        candidates = []
        if s.checkpoint_folder(slot.kind):
            candidates.append(Path(s.checkpoint_folder(slot.kind)))
        candidates.append(path / "checkpoint")
        source_ckpt = slot.export.manifest.get("source", {}).get("checkpoint")
        if source_ckpt:
            candidates.append(Path(source_ckpt))
        slot.stochastic = Stochastic(slot.kind, s.stochastic != "off", candidates)
        if slot.kind == "music":
            slot.stepper = slot.export.music_stepper()
        else:
            slot.stepper = slot.export.caption_stepper()

    def _warm_music(self, slot: ModelSlot) -> None:
        rolls = generate_rolls(slot.stepper, GenerationParams(frames=4, num_outputs=2))
        if rolls.shape != (2, 4, N_KEYS):
            raise DataError(f"music warm-up gave rolls of shape {rolls.shape}")

    def _warm_caption(self, slot: ModelSlot) -> None:
        size = slot.export.image_size
        ramp = np.linspace(0, 255, size, dtype=np.float32)
        picture = np.stack(
            [np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.full((size, size), 128.0)],
            axis=-1,
        ).astype(np.uint8)
        from PIL import Image

        array = preprocess(Image.fromarray(picture), size)
        beams = self._caption_batch((2, 3, 1, 0.0), [array, array])
        if len(beams) != 2:
            raise DataError("caption warm-up gave no captions")

    async def _ready(self, kind: str) -> ModelSlot:
        slot = self.slots[kind]
        deadline = time.monotonic() + WARMUP_WAIT_S
        while not slot.event.is_set():
            if time.monotonic() > deadline:
                raise HTTPError(503, f"the {kind} model is still warming up; retry shortly")
            await asyncio.sleep(0.05)
        if slot.state != "warm":
            raise HTTPError(503, f"the {kind} model is not available: {slot.error}")
        return slot

    # -- captions ---------------------------------------------------------------------------

    def _prepare_image(self, path: Path, size: int) -> tuple[np.ndarray, dict[str, int]]:
        image = load_image(path, max_pixels=self.settings.max_pixels, name="image")
        width, height = image.size
        return preprocess(image, size), {"width": width, "height": height}

    def _caption_batch(self, key: tuple, arrays: list[np.ndarray]) -> list[list[Hypothesis]]:
        beam_size, max_length, n_best, length_penalty = key
        slot = self.slots["caption"]
        ids = slot.export.special_ids
        return beam_search(
            slot.stepper,
            np.stack(arrays),
            start_id=ids["start"],
            end_id=ids["end"],
            beam_size=beam_size,
            max_length=max_length,
            length_penalty=length_penalty,
            n_best=n_best,
        )

    def _caption_stochastic(self, slot: ModelSlot, array: np.ndarray, params: dict):
        from bbservice.models.caption import TorchCaptionStepper

        model = slot.stochastic.get(slot.export.manifest)
        ids = slot.export.special_ids
        stepper = TorchCaptionStepper(model, gate_mode="sample", seed=params["seed"])
        return sample_gate_passes(
            stepper,
            array[None],
            passes=params["samples"],
            start_id=ids["start"],
            end_id=ids["end"],
            beam_size=params["beam_size"],
            max_length=params["max_length"],
            length_penalty=params["length_penalty"],
        )[0]

    @staticmethod
    def _attention_maps(hyp: Hypothesis) -> list[list[list[float]]]:
        att = np.asarray(hyp.attention, dtype=np.float64)
        grid = math.isqrt(att.shape[1]) if att.ndim == 2 else 0
        if grid * grid != att.shape[-1]:
            return [np.round(row, 4).tolist() for row in att[:, None, :]]
        return np.round(att.reshape(len(att), grid, grid), 4).tolist()

    def _words(self, slot: ModelSlot, tokens: list[int]) -> list[str]:
        itos, unk = slot.export.vocabulary, slot.export.special_ids["unk"]
        return [itos[t] if 0 <= t < len(itos) else itos[unk] for t in tokens]

    @bentoml.api(route="/caption")
    async def caption(
        self,
        image: Annotated[Path, Field(description="the image: any format Pillow reads")],
        beam_size: Annotated[int, Field(ge=1, le=MAX_BEAM)] = 3,
        max_length: Annotated[
            int | None, Field(ge=1, le=MAX_CAPTION_WORDS, description="default: the model's")
        ] = None,
        n_best: Annotated[int, Field(ge=1, le=MAX_BEAM, description="<= beam_size")] = 1,
        length_penalty: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0,
        mode: Mode = "mean",
        samples: Annotated[
            int, Field(ge=1, le=MAX_SAMPLES, description="stochastic: gate-sampling passes")
        ] = 10,
        seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = 0,
        attention: bool = False,
    ) -> CaptionResponse:
        """Caption an image: beam search over the mean-gate graphs (``mode=mean``), or
        ``samples`` passes with sampled gates (``mode=stochastic``: distinct captions with their
        frequencies, and the disagreement between passes as an uncertainty score)."""
        try:
            slot = await self._ready("caption")
            if n_best > beam_size:
                raise ConfigError(f"n_best ({n_best}) cannot exceed beam_size ({beam_size})")
            params = {
                "beam_size": beam_size,
                "max_length": max_length or slot.export.max_length,
                "n_best": n_best,
                "length_penalty": length_penalty,
                "attention": attention,
                "seed": seed,
            }
            if mode == "stochastic":
                params["samples"] = samples
            array, info = await anyio.to_thread.run_sync(
                self._prepare_image, image, slot.export.image_size, limiter=self.prep_limiter
            )
            headers = {"X-BBService-Model-Hash": slot.content_hash}
            body: dict[str, Any] = {
                "mode": mode,
                "model": slot.identity(self.settings.precision),
                "params": params,
                "seed": seed,
                "image": info,
            }
            if mode == "mean":
                key = (beam_size, params["max_length"], n_best, length_penalty)
                hyps, batch = await self.batcher.submit(key, array)
                headers["X-BBService-Batch-Size"] = str(batch)
                body["captions"] = [self._caption_item(slot, h, attention) for h in hyps]
            else:
                result = await anyio.to_thread.run_sync(
                    self._caption_stochastic, slot, array, params, limiter=self.stochastic_limiter
                )
                body["captions"] = self._stochastic_items(slot, result, attention)
                body["uncertainty"] = {
                    "disagreement": round(result.disagreement, 6),
                    "mean_entropy": round(result.mean_entropy, 6),
                    "distinct_captions": len(result.captions),
                    "passes": result.passes,
                }
            return JSONResponse(body, headers=headers)
        except Exception as err:
            http = _as_http_error(err)
            return error_response(http.status, http.message)

    def _caption_item(self, slot: ModelSlot, hyp: Hypothesis, attention: bool) -> dict:
        words = self._words(slot, hyp.tokens)
        item = {
            "text": " ".join(words),
            "words": words,
            "log_prob": round(hyp.log_prob, 4),
            "score": round(hyp.score, 4),
            "finished": hyp.finished,
        }
        if attention:
            item["attention"] = self._attention_maps(hyp)
        return item

    def _stochastic_items(self, slot: ModelSlot, result, attention: bool) -> list[dict]:
        items = []
        for tokens, count in result.captions:
            mine = [h for h in result.hypotheses if tuple(h.tokens) == tokens]
            words = self._words(slot, list(tokens))
            item = {
                "text": " ".join(words),
                "words": words,
                "log_prob": round(float(np.mean([h.log_prob for h in mine])), 4),
                "count": count,
                "frequency": round(count / result.passes, 6),
            }
            if attention:
                item["attention"] = self._attention_maps(mine[0])
            items.append(item)
        return items

    # -- music ------------------------------------------------------------------------------

    def _load_primer(self, path: Path, grid: dict) -> np.ndarray:
        import pretty_midi

        size = path.stat().st_size
        if size == 0:
            raise DataError("primer: file is empty (0 bytes)")
        if size > MAX_PRIMER_BYTES:
            raise HTTPError(
                413, f"primer: {size} bytes, more than the limit of {MAX_PRIMER_BYTES} bytes"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pm = pretty_midi.PrettyMIDI(str(path))
                end = pm.get_end_time()
                if "fps" in grid:
                    frames = end * grid["fps"]
                else:
                    frames = pm.time_to_tick(end) / pm.resolution * grid["frames_per_beat"]
        except Exception as err:  # mido / pretty_midi raise many types on bad bytes
            raise DataError(
                f"primer: not a MIDI file or corrupt ({_first_line(err)[:160]})"
            ) from err
        if not math.isfinite(frames) or frames > MAX_PRIMER_FRAMES + 1:
            raise DataError(
                f"primer: about {frames:.0f} frames long, more than the limit of "
                f"{MAX_PRIMER_FRAMES} frames"
            )
        roll = midi_to_roll(pm, **grid)
        if not roll.any():
            raise DataError("primer: no notes on the 88 piano keys (drums are left out)")
        return roll[:MAX_PRIMER_FRAMES]

    def _music_params(self, frames, temperature, seed, tempo, num_outputs, mode) -> dict:
        if frames * num_outputs > MAX_TOTAL_FRAMES:
            raise ConfigError(
                f"frames x num_outputs = {frames * num_outputs} is more than the limit of "
                f"{MAX_TOTAL_FRAMES} per request"
            )
        return {
            "frames": frames,
            "temperature": temperature,
            "seed": seed,
            "tempo": tempo,
            "num_outputs": num_outputs,
            "mode": mode,
        }

    async def _music(self, params: dict, primer: Path | None) -> tuple[ModelSlot, np.ndarray, int]:
        slot = await self._ready("music")
        grid = slot.export.grid
        roll_primer = None
        if primer is not None:
            roll_primer = await anyio.to_thread.run_sync(
                self._load_primer, primer, grid, limiter=self.prep_limiter
            )
        gen = GenerationParams(
            params["frames"], params["temperature"], params["seed"], params["num_outputs"]
        )

        def run() -> np.ndarray:
            if params["mode"] == "stochastic":
                stepper = _TorchMusicSampler(
                    slot.stochastic.get(slot.export.manifest), params["seed"]
                )
            else:
                stepper = slot.stepper
            return generate_rolls(stepper, gen, roll_primer)

        limiter = self.stochastic_limiter if params["mode"] == "stochastic" else self.music_limiter
        rolls = await anyio.to_thread.run_sync(run, limiter=limiter)
        return slot, rolls, 0 if roll_primer is None else len(roll_primer)

    @staticmethod
    def _seconds_per_frame(grid: dict, tempo: float) -> float:
        if "fps" in grid:
            return 1.0 / grid["fps"]
        stored_tempo = 6e7 / max(1, round(6e7 / tempo))  # what the MIDI file stores
        return 60.0 / (stored_tempo * grid["frames_per_beat"])

    def _midi(self, slot: ModelSlot, rolls: np.ndarray, params: dict, primer_frames: int) -> bytes:
        import io

        import pretty_midi

        grid = slot.export.grid
        # A bar (4 beats) of silence between outputs; 2 seconds on a time grid.
        gap = (
            round(4 * grid["frames_per_beat"])
            if "frames_per_beat" in grid
            else round(2 * grid["fps"])
        )
        pieces, starts, at = [], [], 0
        for k, roll in enumerate(rolls):
            if k:
                pieces.append(np.zeros((gap, N_KEYS), dtype=np.uint8))
                at += gap
            starts.append(at)
            pieces.append(roll)
            at += len(roll)
        pm = roll_to_midi(np.concatenate(pieces), tempo=params["tempo"], **grid)
        spf = self._seconds_per_frame(grid, params["tempo"])
        stamp = (
            f"bbservice model={slot.content_hash[:16]} seed={params['seed']} "
            f"mode={params['mode']} temperature={params['temperature']} frames={params['frames']}"
        )
        pm.text_events.append(pretty_midi.Text(stamp, 0.0))
        if len(rolls) > 1:
            pm.text_events.extend(
                pretty_midi.Text(f"output {k}", s * spf) for k, s in enumerate(starts)
            )
        buf = io.BytesIO()
        pm.write(buf)
        return buf.getvalue()

    def _music_headers(self, slot: ModelSlot, params: dict, primer_frames: int) -> dict:
        return {
            "X-BBService-Model-Hash": slot.content_hash,
            "X-BBService-Seed": str(params["seed"]),
            "X-BBService-Params": json.dumps({**params, "primer_frames": primer_frames}),
        }

    @bentoml.api(route="/generate")
    async def generate(
        self,
        frames: Annotated[int, Field(ge=1, le=MAX_FRAMES, description="new frames")] = 64,
        temperature: Annotated[float, Field(ge=0.05, le=10.0)] = 1.0,
        seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = 0,
        tempo: Annotated[float, Field(ge=20.0, le=400.0, description="quarter notes/min")] = 100.0,
        num_outputs: Annotated[int, Field(ge=1, le=MAX_OUTPUTS)] = 1,
        # Optional (None when not sent); BentoML 1.4 cannot take Optional[Path] file fields.
        primer: Annotated[Path, Field(description="MIDI file to continue")] = None,
        mode: Mode = "mean",
    ) -> Annotated[Path, bentoml.validators.ContentType("audio/midi")]:
        """Generate music as a MIDI file (``audio/midi``). With ``num_outputs > 1`` the pieces
        follow one another, a bar of silence apart, each starting at a text event "output k".
        The model hash, parameters and seed are in ``X-BBService-*`` headers and in a text event
        at time 0."""
        try:
            params = self._music_params(frames, temperature, seed, tempo, num_outputs, mode)
            slot, rolls, primer_frames = await self._music(params, primer)
            data = await anyio.to_thread.run_sync(
                self._midi, slot, rolls, params, primer_frames, limiter=self.prep_limiter
            )
            headers = self._music_headers(slot, params, primer_frames)
            headers["Content-Disposition"] = f'attachment; filename="bbservice-seed{seed}.mid"'
            return Response(data, media_type="audio/midi", headers=headers)
        except Exception as err:
            http = _as_http_error(err)
            return error_response(http.status, http.message)

    @bentoml.api(route="/generate_json")
    async def generate_json(
        self,
        frames: Annotated[int, Field(ge=1, le=MAX_FRAMES, description="new frames")] = 64,
        temperature: Annotated[float, Field(ge=0.05, le=10.0)] = 1.0,
        seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = 0,
        tempo: Annotated[float, Field(ge=20.0, le=400.0, description="quarter notes/min")] = 100.0,
        num_outputs: Annotated[int, Field(ge=1, le=MAX_OUTPUTS)] = 1,
        # Optional (None when not sent); BentoML 1.4 cannot take Optional[Path] file fields.
        primer: Annotated[Path, Field(description="MIDI file to continue")] = None,
        mode: Mode = "mean",
    ) -> MusicResponse:
        """Generate music as JSON: per output its notes (MIDI pitch, start/end in frames and
        seconds; the primer's frames come first) and a base64 PNG piano roll."""
        try:
            params = self._music_params(frames, temperature, seed, tempo, num_outputs, mode)
            slot, rolls, primer_frames = await self._music(params, primer)
            outputs = await anyio.to_thread.run_sync(
                self._music_outputs, slot, rolls, params, primer_frames, limiter=self.prep_limiter
            )
            body = {
                "outputs": outputs,
                "mode": mode,
                "model": slot.identity(self.settings.precision),
                "params": {**params, "primer_frames": primer_frames},
                "seed": seed,
                "grid": slot.export.grid,
            }
            return JSONResponse(body, headers=self._music_headers(slot, params, primer_frames))
        except Exception as err:
            http = _as_http_error(err)
            return error_response(http.status, http.message)

    def _music_outputs(self, slot, rolls: np.ndarray, params: dict, primer_frames: int) -> list:
        spf = self._seconds_per_frame(slot.export.grid, params["tempo"])
        outputs = []
        for k, roll in enumerate(rolls):
            padded = np.zeros((len(roll) + 2, N_KEYS), dtype=np.int8)
            padded[1:-1] = roll
            edges = np.diff(padded, axis=0).T  # (88, T + 1)
            keys, starts = np.nonzero(edges == 1)
            _, ends = np.nonzero(edges == -1)
            order = np.lexsort((keys, starts))
            notes = [
                {
                    "pitch": int(keys[i]) + LOWEST_PITCH,
                    "start_frame": int(starts[i]),
                    "end_frame": int(ends[i]),
                    "start": round(float(starts[i]) * spf, 6),
                    "end": round(float(ends[i]) * spf, 6),
                }
                for i in order
            ]
            png = roll_to_png(roll, scale=4 if len(roll) <= 1024 else 2)
            outputs.append(
                {
                    "index": k,
                    "frames": int(len(roll)),
                    "primer_frames": primer_frames,
                    "notes": notes,
                    "piano_roll_png": base64.b64encode(png).decode("ascii"),
                }
            )
        return outputs

    # -- what is loaded ---------------------------------------------------------------------

    @bentoml.api(route="/models")
    async def models(self) -> dict[str, Any]:
        """What is loaded: names, store tags, content hashes, gate families, training metrics,
        the ONNX Runtime providers really in use, warm-up state and the request limits."""
        import onnxruntime

        out: dict[str, Any] = {}
        for kind, slot in self.slots.items():
            info: dict[str, Any] = {
                "name": runtime.STORE_NAMES[kind],
                "state": slot.state,
                "error": slot.error,
                "source": slot.source,
                "tag": slot.tag,
            }
            if slot.export is not None:
                m = slot.export.manifest
                cfg = m.get("config", {})
                info.update(
                    content_hash=m["content_hash"],
                    gate_family=m.get("gate_family"),
                    precision=slot.export.precision,
                    precisions=m.get("precisions"),
                    created=slot.created,
                    providers=slot.export.providers,
                    metrics=cfg.get("metrics", {}),
                    model_config=cfg.get("model", {}),
                    verification={
                        k: m.get("verification", {}).get(k)
                        for k in ("passed", "tolerance", "max_abs_diff")
                    },
                    warmup_ms=slot.warmup_ms,
                    stochastic=slot.stochastic.status() if slot.stochastic else None,
                )
                if kind == "music":
                    info["grid"] = slot.export.grid
                else:
                    info.update(
                        vocabulary_size=len(slot.export.vocabulary),
                        image_size=slot.export.image_size,
                        max_length=slot.export.max_length,
                        batching=self.batcher.stats(),
                    )
            out[kind] = info
        return JSONResponse(
            {
                "ready": self.__is_ready__(),
                "models": out,
                "limits": self.settings.limits(),
                "available_providers": onnxruntime.get_available_providers(),
                "versions": {
                    "bbservice": bbservice.__version__,
                    "onnxruntime": onnxruntime.__version__,
                    "bentoml": bentoml.__version__,
                    "numpy": np.__version__,
                },
            }
        )


BBService.add_asgi_middleware(RequestGuard)
