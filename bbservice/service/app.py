"""The BentoML service class: the endpoints only — validate, call a slot, shape the answer.

The settings (:mod:`.settings`), the HTTP guard and error shape (:mod:`.http`), the model
slots and what runs the models (:mod:`.slots`), the caption batcher (:mod:`.batching`), the
answer bodies (:mod:`.answers`) and the OpenAPI shapes (:mod:`.schemas`) live beside it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import warnings
from pathlib import Path
from typing import Annotated, Any

import anyio
import anyio.to_thread
import bentoml
import numpy as np
from pydantic import Field
from starlette.responses import JSONResponse, Response

import bbservice
from bbservice import runtime
from bbservice.deployment import configure_logging, service_resources
from bbservice.errors import ConfigError, DataError, first_line
from bbservice.images import load_image, preprocess
from bbservice.pianoroll import parse_primer, rolls_to_midi_bytes
from bbservice.service import answers, slots
from bbservice.service.batching import CaptionBatcher
from bbservice.service.http import GetModels, HTTPError, RequestGuard, answers_errors
from bbservice.service.schemas import CaptionResponse, Mode, MusicRequest, MusicResponse, Seed
from bbservice.service.settings import (
    KINDS,
    MAX_BEAM,
    MAX_CAPTION_WORDS,
    MAX_CONCURRENCY,
    MAX_DIVERSITY,
    MAX_PRIMER_BYTES,
    MAX_PRIMER_FRAMES,
    MAX_SAMPLES,
    MAX_TOTAL_FRAMES,
    REQUEST_TIMEOUT_S,
    WARMUP_WAIT_S,
    Settings,
    device_from_env,
    export_folder_from_env,
)
from bbservice.service.slots import ModelSlot
from bbservice.service_metrics import service_metrics

log = logging.getLogger("bbservice.service")
configure_logging()  # the project's INFO lines (real providers) pass BentoML's WARNING root
# The optional `primer` file field has default None, which BentoML's file serializer cannot
# show in the JSON schema; pydantic warns about that on every schema build.
warnings.filterwarnings("ignore", message="Unable to serialize value None with the plain serial")


@bentoml.service(
    name="bbservice",
    resources=service_resources(device_from_env()),
    workers=1,
    traffic={"timeout": REQUEST_TIMEOUT_S, "max_concurrency": MAX_CONCURRENCY},
    labels={"project": "bbservice"},
)
class BBService:
    """Captions (attention LSTM with Beta gates) and polyphonic music (piano-roll LSTM)."""

    # Model-store references: `bentoml build` packs them and `bentoml serve` fetches them at
    # start. Left out where an export folder replaces the store entry (set before import).
    if not export_folder_from_env("music"):
        music_model = bentoml.models.BentoModel(f"{runtime.STORE_NAMES['music']}:latest")
    if not export_folder_from_env("caption"):
        caption_model = bentoml.models.BentoModel(f"{runtime.STORE_NAMES['caption']}:latest")

    def __init__(self) -> None:
        self.settings = Settings.from_env()
        self.slots = {kind: ModelSlot(kind) for kind in KINDS}
        self.metrics = service_metrics()  # here, after BentoML's multiprocess setup
        self.batcher = CaptionBatcher(
            self._caption_batch,
            self.settings.max_batch,
            lambda n: self.metrics.set_queue_depth("caption", n),
        )
        self.waiting = {(kind, stochastic): 0 for kind in KINDS for stochastic in (False, True)}
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
        """Load and warm every slot (readiness), then the optional PyTorch models. (CUDA
        libraries of the pip wheels are preloaded by :func:`runtime.make_session`.)"""
        for slot in self.slots.values():
            start = time.perf_counter()
            try:
                slot.open(self._export_path(slot), self.settings)
                (self._warm_music if slot.kind == "music" else self._warm_caption)(slot)
                slot.warmup_ms = round((time.perf_counter() - start) * 1000, 1)
                slot.state = "warm"
                log.info("%s model warm (%.0f ms)", slot.kind, slot.warmup_ms)
            except Exception as err:
                slot.state, slot.error = "failed", first_line(err)
                self.metrics.load_failed(slot.kind)
                log.error("%s model failed to load or warm up: %s", slot.kind, slot.error)
            finally:
                slot.event.set()
        for slot in self.slots.values():
            if slot.state == "warm" and slot.stochastic.enabled:
                try:
                    slot.stochastic.get(slot.export.manifest)
                except HTTPError:
                    pass

    def _export_path(self, slot: ModelSlot) -> Path:
        """The export folder of a slot: from the environment, else the model store."""
        folder = self.settings.export_folder(slot.kind)
        if folder:
            slot.source = "export folder"
            return Path(folder)
        name = runtime.STORE_NAMES[slot.kind]
        ref = type(self).__dict__.get(f"{slot.kind}_model") or bentoml.models.BentoModel(
            f"{name}:latest"
        )
        stored = ref.stored
        if stored is None:
            raise DataError(
                f"model '{ref.tag}' is not in the BentoML model store; run "
                f"`bbservice export {slot.kind} CHECKPOINT` or set "
                f"BBSERVICE_{slot.kind.upper()}_EXPORT to an export folder"
            )
        slot.source, slot.tag = "model store", str(stored.tag)
        slot.created = stored.info.creation_time.isoformat(timespec="seconds")
        return Path(stored.path)

    def _warm_music(self, slot: ModelSlot) -> None:
        slots.warm_music(slot)

    def _warm_caption(self, slot: ModelSlot) -> None:
        slots.warm_caption(slot)

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

    async def _in_thread(self, limiter: anyio.CapacityLimiter, fn, *args):
        return await anyio.to_thread.run_sync(fn, *args, limiter=limiter)

    async def _queued(self, kind: str, stochastic: bool, limiter: anyio.CapacityLimiter, fn, *args):
        """``fn(*args)`` in a thread once ``limiter`` has room; while waiting the request counts
        in the queue-depth gauge of its kind (``stochastic``: the PyTorch path's gauge)."""
        key = (kind, stochastic)
        set_depth = (
            self.metrics.set_stochastic_queue_depth if stochastic else self.metrics.set_queue_depth
        )
        self.waiting[key] += 1
        set_depth(kind, self.waiting[key])
        try:
            await limiter.acquire()
        finally:
            self.waiting[key] -= 1
            set_depth(kind, self.waiting[key])
        try:
            return await anyio.to_thread.run_sync(fn, *args)
        finally:
            limiter.release()

    def _steps_hook(self, kind: str):
        return lambda steps: self.metrics.observe_decode_steps(kind, steps)

    # -- captions ---------------------------------------------------------------------------

    def _prepare_image(self, path: Path, size: int) -> tuple[np.ndarray, dict[str, int]]:
        image = load_image(path, max_pixels=self.settings.max_pixels, name="image")
        width, height = image.size
        return preprocess(image, size), {"width": width, "height": height}

    def _caption_batch(self, key: tuple, arrays: list[np.ndarray]) -> list:
        self.metrics.observe_batch("caption", len(arrays))
        return slots.caption_beams(self.slots["caption"], key, arrays, self._steps_hook("caption"))

    @bentoml.api(route="/caption")
    @answers_errors
    async def caption(
        self,
        image: Annotated[Path, Field(description="the image: any format Pillow reads")],
        beam_size: Annotated[int, Field(ge=1, le=MAX_BEAM)] = 3,
        max_length: Annotated[
            int | None, Field(ge=1, le=MAX_CAPTION_WORDS, description="default: the model's")
        ] = None,
        n_best: Annotated[int, Field(ge=1, le=MAX_BEAM, description="<= beam_size")] = 1,
        length_penalty: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0,
        beam_groups: Annotated[
            int,
            Field(ge=1, le=MAX_BEAM, description="diverse beam search: groups (divides beam_size)"),
        ] = 1,
        diversity: Annotated[
            float, Field(ge=0.0, le=MAX_DIVERSITY, description="diverse beam search: strength")
        ] = 0.0,
        mode: Mode = "mean",
        samples: Annotated[
            int, Field(ge=1, le=MAX_SAMPLES, description="stochastic: gate-sampling passes")
        ] = 10,
        seed: Seed = 0,
        attention: bool = False,
    ) -> CaptionResponse:
        """Caption an image: beam search over the mean-gate graphs (``mode=mean``), or
        ``samples`` passes with sampled gates (``mode=stochastic``: distinct captions with their
        frequencies, and the disagreement between passes as an uncertainty score). Diverse beam
        search: ``beam_groups`` G groups of ``beam_size / G`` beams, each penalised by
        ``diversity`` for every word the earlier groups chose at the same step."""
        slot = await self._ready("caption")
        if n_best > beam_size:
            raise ConfigError(f"n_best ({n_best}) cannot exceed beam_size ({beam_size})")
        if beam_size % beam_groups:
            raise ConfigError(
                f"beam_groups ({beam_groups}) must divide beam_size ({beam_size}): every group "
                "gets beam_size / beam_groups beams"
            )
        if mode == "stochastic" and (beam_groups > 1 or diversity > 0):
            raise ConfigError("beam_groups and diversity apply to mode=mean only")
        params = {
            "beam_size": beam_size,
            "max_length": max_length or slot.export.max_length,
            "n_best": n_best,
            "length_penalty": length_penalty,
            "beam_groups": beam_groups,
            "diversity": diversity,
            "attention": attention,
            "seed": seed,
        }
        if mode == "stochastic":
            params["samples"] = samples
        array, info = await self._in_thread(
            self.prep_limiter, self._prepare_image, image, slot.export.image_size
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
            key = (beam_size, params["max_length"], n_best, length_penalty, beam_groups, diversity)
            hyps, batch = await self.batcher.submit(key, array)
            headers["X-BBService-Batch-Size"] = str(batch)
            body["captions"] = [answers.caption_item(slot, h, attention) for h in hyps]
        else:
            result = await self._queued(
                "caption",
                True,
                self.stochastic_limiter,
                slots.caption_passes,
                slot,
                array,
                params,
                self._steps_hook("caption"),
            )
            body["captions"] = answers.stochastic_items(slot, result, attention)
            body["uncertainty"] = answers.uncertainty(result)
        return JSONResponse(body, headers=headers)

    # -- music ------------------------------------------------------------------------------

    @staticmethod
    def _music_params(*, frames, temperature, seed, tempo, num_outputs, mode) -> dict:
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
        """(slot, rolls (num_outputs, T, 88), primer frames) of a music request."""
        slot = await self._ready("music")
        roll_primer = None
        if primer is not None:
            roll_primer = await self._in_thread(self.prep_limiter, self._parse_primer, primer, slot)
        stochastic = params["mode"] == "stochastic"
        limiter = self.stochastic_limiter if stochastic else self.music_limiter
        rolls = await self._queued(
            "music",
            stochastic,
            limiter,
            slots.music_rolls,
            slot,
            params,
            roll_primer,
            self._steps_hook("music"),
        )
        return slot, rolls, 0 if roll_primer is None else len(roll_primer)

    @staticmethod
    def _parse_primer(path: Path, slot: ModelSlot) -> np.ndarray:
        return parse_primer(
            path, slot.grid, max_bytes=MAX_PRIMER_BYTES, max_frames=MAX_PRIMER_FRAMES
        )

    @staticmethod
    def _midi(slot: ModelSlot, rolls: np.ndarray, params: dict) -> bytes:
        stamp = (
            f"bbservice model={slot.content_hash[:16]} seed={params['seed']} "
            f"mode={params['mode']} temperature={params['temperature']} frames={params['frames']}"
        )
        return rolls_to_midi_bytes(rolls, slot.grid, tempo=params["tempo"], stamp=stamp)

    @staticmethod
    def _music_headers(slot: ModelSlot, params: dict, primer_frames: int) -> dict:
        return {
            "X-BBService-Model-Hash": slot.content_hash,
            "X-BBService-Seed": str(params["seed"]),
            "X-BBService-Params": json.dumps({**params, "primer_frames": primer_frames}),
        }

    async def _music_answer(self, request: dict) -> tuple[ModelSlot, np.ndarray, dict, int]:
        """(slot, rolls, params, primer frames) of a music request."""
        primer = request.pop("primer")
        params = self._music_params(**request)
        slot, rolls, primer_frames = await self._music(params, primer)
        return slot, rolls, params, primer_frames

    @bentoml.api(route="/generate", input_spec=MusicRequest)
    @answers_errors
    async def generate(
        self, **request: Any
    ) -> Annotated[Path, bentoml.validators.ContentType("audio/midi")]:
        """Generate music as a MIDI file (``audio/midi``). With ``num_outputs > 1`` the pieces
        follow one another, a bar of silence apart, each starting at a text event "output k".
        The model hash, parameters and seed are in ``X-BBService-*`` headers and in a text event
        at time 0."""
        slot, rolls, params, primer_frames = await self._music_answer(request)
        data = await self._in_thread(self.prep_limiter, self._midi, slot, rolls, params)
        headers = self._music_headers(slot, params, primer_frames)
        name = f"bbservice-seed{params['seed']}.mid"
        headers["Content-Disposition"] = f'attachment; filename="{name}"'
        return Response(data, media_type="audio/midi", headers=headers)

    @bentoml.api(route="/generate_json", input_spec=MusicRequest)
    @answers_errors
    async def generate_json(self, **request: Any) -> MusicResponse:
        """Generate music as JSON: per output its notes (MIDI pitch, start/end in frames and
        seconds; the primer's frames come first) and a base64 PNG piano roll."""
        slot, rolls, params, primer_frames = await self._music_answer(request)
        outputs = await self._in_thread(
            self.prep_limiter, answers.music_outputs, slot, rolls, params, primer_frames
        )
        body = {
            "outputs": outputs,
            "mode": params["mode"],
            "model": slot.identity(self.settings.precision),
            "params": {**params, "primer_frames": primer_frames},
            "seed": params["seed"],
            "grid": slot.export.grid,
        }
        return JSONResponse(body, headers=self._music_headers(slot, params, primer_frames))

    # -- what is loaded ---------------------------------------------------------------------

    @bentoml.api(route="/models")
    async def models(self) -> dict[str, Any]:
        """What is loaded: names, store tags, content hashes, gate families, training metrics,
        the device and ONNX Runtime providers really in use per graph, the PyTorch device of
        mode=stochastic, warm-up state and the request limits. ``GET /models`` answers the
        same (:class:`.http.GetModels`)."""
        import onnxruntime

        out = {kind: answers.slot_report(slot) for kind, slot in self.slots.items()}
        if self.slots["caption"].export is not None:
            out["caption"]["batching"] = self.batcher.stats()
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


BBService.add_asgi_middleware(GetModels)  # first: the guard and BentoML see a POST
BBService.add_asgi_middleware(RequestGuard)
