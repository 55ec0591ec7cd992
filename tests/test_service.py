"""The BentoML service in process (``BBService.to_asgi()`` under starlette's TestClient).

Tiny real models (a 1-layer music model and a ResNet-18 caption model on 32 px images, random
weights) are exported once with the export helper's API and cached on disk, keyed by the source
of the files that make them; each export folder also holds the PyTorch checkpoint
(``checkpoint/``) so that ``mode=stochastic`` works. ``tiny_exports()`` is shared with
``test_service_e2e.py`` and ``test_bento_build.py``.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pretty_midi
import pytest
from PIL import Image

pytestmark = [
    pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`"),
    pytest.mark.filterwarnings("ignore:Unable to serialize value None with the plain serial"),
]
ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    "export/onnx_export.py",
    "export/verify.py",
    "bbservice/models/music.py",
    "bbservice/models/caption.py",
    "bbservice/cells.py",
    "bbservice/gates.py",
    "bbservice/runtime.py",
]
MUSIC_HIDDEN = 16
CAPTION = dict(
    vocab_size=12,
    encoder="resnet18",
    image_size=32,
    grid_size=2,
    encoder_stages=2,
    embed_dim=8,
    attention_dim=8,
    hidden_size=16,
    max_length=8,
)


# --------------------------------------------------------------------------------------------
# Tiny exports, cached on disk
# --------------------------------------------------------------------------------------------


def _cache_key() -> str:
    import torch

    digest = hashlib.sha256(torch.__version__.encode())
    digest.update(json.dumps([MUSIC_HIDDEN, CAPTION], sort_keys=True).encode())
    for rel in SOURCES:
        digest.update((ROOT / rel).read_bytes())
    return digest.hexdigest()[:16]


def _save_checkpoint(folder: Path, model, config: dict) -> None:
    """The PyTorch checkpoint for mode=stochastic, where the export did not write it."""
    from bbservice import checkpoints

    if not (folder / checkpoints.WEIGHTS_FILE).is_file():
        checkpoints.save_checkpoint(folder, model, config)


def _build(out: Path) -> None:
    import torch

    from bbservice.gates import GateConfig
    from bbservice.models.caption import CaptionConfig, CaptionModel
    from bbservice.models.music import MusicConfig, PianoRollModel
    from export.onnx_export import export_caption, export_music

    torch.manual_seed(0)
    music = PianoRollModel(
        MusicConfig(gate=GateConfig(family="bbeta5"), hidden_size=MUSIC_HIDDEN, num_layers=1)
    ).eval()
    result = export_music(music, out / "music", store=False)
    _save_checkpoint(out / "music" / "checkpoint", music, result.manifest["config"])

    caption = CaptionModel.build(CaptionConfig(**CAPTION)).eval()
    result = export_caption(caption, out / "caption", store=False)
    _save_checkpoint(out / "caption" / "checkpoint", caption, result.manifest["config"])


def tiny_exports() -> dict[str, Path]:
    """``{"music": folder, "caption": folder}``: exported once per source version, then cached
    under the system temp folder (a lock file keeps parallel runs from building twice)."""
    base = Path(tempfile.gettempdir()) / "bbservice-test-exports"
    base.mkdir(parents=True, exist_ok=True)
    folder = base / _cache_key()
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "caption" / "checkpoint" / "model.safetensors").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=base))
            try:
                _build(tmp)
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(tmp, folder)
                for stale in base.iterdir():  # exports of older sources
                    if stale.is_dir() and stale != folder and not stale.name.startswith("."):
                        shutil.rmtree(stale, ignore_errors=True)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return {"music": folder / "music", "caption": folder / "caption"}


# --------------------------------------------------------------------------------------------
# Apps
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exports() -> dict[str, Path]:
    return tiny_exports()


def wait_ready(client, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"not ready after {timeout} s: {client.post('/models').text[:2000]}")


_APPS = 0
NO_METRICS = json.dumps({"services": {"bbservice": {"metrics": {"enabled": False}}}})


def wait_stochastic_loaded(client, timeout: float = 60.0) -> dict:
    """``/models`` once both PyTorch models are loaded (or failed): that happens after ready."""
    deadline = time.monotonic() + timeout
    while True:
        body = client.post("/models").json()
        if all(m["stochastic"]["loaded"] for m in body["models"].values()):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


@contextlib.contextmanager
def make_client(env: dict[str, str | None], ready: bool = True):
    """A TestClient on a fresh ASGI app of the service, built under ``env``."""
    from starlette.testclient import TestClient

    from bbservice.service import BBService

    saved = {k: os.environ.get(k) for k in env}
    try:
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        global _APPS
        overrides = os.environ.get("BENTOML_CONFIG_OVERRIDES")
        if _APPS:  # Prometheus metrics register once per process: only the first app has them
            os.environ["BENTOML_CONFIG_OVERRIDES"] = NO_METRICS
        try:
            app = BBService.to_asgi()
        finally:
            if overrides is None:
                os.environ.pop("BENTOML_CONFIG_OVERRIDES", None)
            else:
                os.environ["BENTOML_CONFIG_OVERRIDES"] = overrides
        _APPS += 1
        with TestClient(app, raise_server_exceptions=False) as client:
            if ready:
                wait_ready(client)
            yield client
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def export_env(exports: dict[str, Path], **extra: str | None) -> dict[str, str | None]:
    return {
        "BBSERVICE_MUSIC_EXPORT": str(exports["music"]),
        "BBSERVICE_CAPTION_EXPORT": str(exports["caption"]),
        "BBSERVICE_MAX_UPLOAD_BYTES": str(2 << 20),
        "BBSERVICE_MAX_PIXELS": "4000000",
        **extra,
    }


@pytest.fixture(scope="module")
def client(exports):
    with make_client(export_env(exports)) as c:
        yield c


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def image_bytes(mode: str = "RGB", size=(48, 32), fmt: str = "PNG", **save) -> bytes:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A small PNG whose IHDR claims ``width x height`` pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def exif_rotated_jpeg() -> bytes:
    """A 60 x 20 JPEG whose EXIF orientation (6: rotate 90°) makes it 20 x 60."""
    image = Image.new("RGB", (60, 20), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


def animated_gif() -> bytes:
    frames = [Image.new("P", (24, 24), i) for i in (10, 90, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    return buf.getvalue()


def primer_midi() -> bytes:
    pm = pretty_midi.PrettyMIDI(initial_tempo=100)
    inst = pretty_midi.Instrument(0)
    for k, pitch in enumerate((60, 64, 67, 72)):
        inst.notes.append(pretty_midi.Note(80, pitch, k * 0.6, k * 0.6 + 0.6))
    pm.instruments.append(inst)
    buf = io.BytesIO()
    pm.write(buf)
    return buf.getvalue()


def caption(client, data: bytes, name: str = "photo.png", ctype: str = "image/png", **fields):
    form = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()}
    return client.post("/caption", files={"image": (name, data, ctype)}, data=form)


# --------------------------------------------------------------------------------------------
# Endpoints
# --------------------------------------------------------------------------------------------


def test_service_imports_neither_torch_nor_training_code():
    code = (
        "import sys, bbservice.service; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'training', 'export')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BBSERVICE_")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_health_and_readiness(client):
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_caption_mean(client, exports):
    r = caption(client, image_bytes(), beam_size=3, n_best=2, attention=True)
    assert r.status_code == 200, r.text
    body = r.json()
    manifest = json.loads((exports["caption"] / "manifest.json").read_text())
    assert body["model"]["content_hash"] == manifest["content_hash"]
    assert r.headers["x-bbservice-model-hash"] == manifest["content_hash"]
    assert body["model"]["gate_family"] == "bbeta5" and body["model"]["tag"] is None
    assert body["mode"] == "mean" and body["seed"] == 0
    assert body["params"] == {
        "beam_size": 3,
        "max_length": CAPTION["max_length"],
        "n_best": 2,
        "length_penalty": 0.0,
        "beam_groups": 1,
        "diversity": 0.0,
        "attention": True,
        "seed": 0,
    }
    assert body["image"] == {"width": 48, "height": 32}
    assert len(body["captions"]) == 2
    best = body["captions"][0]
    assert best["text"] == " ".join(best["words"]) and 0 < len(best["words"]) <= 8
    assert best["score"] >= body["captions"][1]["score"]
    att = np.asarray(best["attention"])
    assert att.shape == (len(best["words"]), 2, 2)  # one G x G map per word
    np.testing.assert_allclose(att.sum(axis=(1, 2)), 1.0, atol=1e-3)
    again = caption(client, image_bytes(), beam_size=3, n_best=2, attention=True)
    assert again.json() == body  # the same request gives the same answer


def test_caption_diverse_beam_search(client, exports):
    """beam_groups and diversity reach the shared decoder: the answer is beam_search's with
    groups=2 on the same image, echoed in params; a strong diversity makes the groups differ."""
    from bbservice import runtime
    from bbservice.decoding import beam_search
    from bbservice.images import load_image, preprocess
    from bbservice.vocab import Vocabulary

    form = dict(beam_size=4, n_best=2, beam_groups=2, diversity=100.0)
    r = caption(client, image_bytes(), **form)
    assert r.status_code == 200, r.text
    body = r.json()
    assert {k: body["params"][k] for k in form} == form
    export = runtime.load_export(exports["caption"], device="cpu")
    image = load_image(io.BytesIO(image_bytes()), max_pixels=10**7, name="image")
    hyps = beam_search(
        export.caption_stepper(),
        preprocess(image, export.image_size)[None],
        start_id=export.special_ids["start"],
        end_id=export.special_ids["end"],
        beam_size=4,
        max_length=export.max_length,
        n_best=2,
        groups=2,
        diversity=100.0,
    )[0]
    vocab = Vocabulary.from_itos(export.vocabulary, "test")
    assert [c["words"] for c in body["captions"]] == [vocab.words(h.tokens) for h in hyps]
    assert body["captions"][0]["words"] != body["captions"][1]["words"]


def test_caption_stochastic(client):
    r = caption(client, image_bytes(), mode="stochastic", samples=6, seed=3, beam_size=2)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "stochastic" and body["seed"] == 3 and body["params"]["samples"] == 6
    assert sum(c["count"] for c in body["captions"]) == 6
    u = body["uncertainty"]
    assert u["passes"] == 6 and 0.0 <= u["disagreement"] < 1.0
    assert u["distinct_captions"] == len(body["captions"]) and u["mean_entropy"] > 0
    again = caption(client, image_bytes(), mode="stochastic", samples=6, seed=3, beam_size=2)
    assert again.json() == body


def test_concurrent_captions_are_batched_and_unchanged(client):
    images = [image_bytes(size=(40 + i, 30)) for i in range(12)]
    alone = [caption(client, data, beam_size=2).json()["captions"] for data in images]
    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda d: caption(client, d, beam_size=2), images))
    assert all(r.status_code == 200 for r in replies)
    assert [r.json()["captions"] for r in replies] == alone
    models = client.post("/models").json()
    assert models["models"]["caption"]["batching"]["batches"] >= 1


def test_generate_midi(client, exports):
    r = client.post("/generate", json={"frames": 24, "seed": 5, "tempo": 90, "num_outputs": 2})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/midi"
    manifest = json.loads((exports["music"] / "manifest.json").read_text())
    assert r.headers["x-bbservice-model-hash"] == manifest["content_hash"]
    assert r.headers["x-bbservice-seed"] == "5"
    params = json.loads(r.headers["x-bbservice-params"])
    assert params["frames"] == 24 and params["num_outputs"] == 2 and params["tempo"] == 90
    pm = pretty_midi.PrettyMIDI(io.BytesIO(r.content))
    texts = [t.text for t in pm.text_events]
    assert any(manifest["content_hash"][:16] in t and "seed=5" in t for t in texts)
    assert "output 1" in texts
    assert client.post("/generate", json={"frames": 24, "seed": 5, "tempo": 90, "num_outputs": 2})
    again = client.post("/generate", json={"frames": 24, "seed": 5, "tempo": 90, "num_outputs": 2})
    assert again.content == r.content


def test_generate_with_primer_and_json(client):
    form = {"frames": "16", "seed": "2", "num_outputs": "2"}
    files = {"primer": ("tune.mid", primer_midi(), "audio/midi")}
    r = client.post("/generate_json", data=form, files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["params"]["primer_frames"] == 4 and body["grid"] == {"frames_per_beat": 1}
    assert len(body["outputs"]) == 2
    for out in body["outputs"]:
        assert out["frames"] == 4 + 16 and out["primer_frames"] == 4
        starts = {(n["pitch"], n["start_frame"]) for n in out["notes"]}
        assert {(60, 0), (64, 1), (67, 2), (72, 3)} <= starts  # the primer comes first
        for n in out["notes"]:
            assert 21 <= n["pitch"] <= 108 and n["end_frame"] > n["start_frame"]
            assert n["start"] == pytest.approx(n["start_frame"] * 0.6, abs=1e-5)  # 100 bpm
        png = Image.open(io.BytesIO(base64.b64decode(out["piano_roll_png"])))
        assert png.size == (20 * 4, 88 * 4)
    midi = client.post("/generate", data=form, files=files)
    assert midi.status_code == 200 and midi.headers["content-type"] == "audio/midi"


def test_generate_stochastic(client):
    r = client.post("/generate_json", json={"frames": 8, "mode": "stochastic", "seed": 1})
    assert r.status_code == 200, r.text
    assert r.json()["mode"] == "stochastic"
    again = client.post("/generate_json", json={"frames": 8, "mode": "stochastic", "seed": 1})
    assert again.json() == r.json()


def test_models(client, exports):
    from bbservice.fused import build as fused_build

    body = wait_stochastic_loaded(client)
    assert body["ready"] is True
    for kind in ("music", "caption"):
        info = body["models"][kind]
        manifest = json.loads((exports[kind] / "manifest.json").read_text())
        assert info["state"] == "warm" and info["error"] is None
        assert info["content_hash"] == manifest["content_hash"]
        assert info["gate_family"] == "bbeta5" and info["source"] == "export folder"
        assert all(p == ["CPUExecutionProvider"] for p in info["providers"].values())
        assert info["device"] == "cpu" and info["io_binding"] is False
        assert info["precision"] == "fp32" and info["onnxruntime"]
        assert info["verification"]["passed"] is True and info["warmup_ms"] > 0
        assert info["stochastic"]["available"] is True
        assert info["stochastic"]["device"] == "cpu"  # torch sees no GPU here
        # built at load time, not in the first stochastic request
        assert info["stochastic"]["kernels"] == ("fused" if fused_build.load() else "eager")
    assert body["models"]["caption"]["vocabulary_size"] == CAPTION["vocab_size"]
    assert body["limits"]["max_pixels"] == 4_000_000
    assert body["versions"]["onnxruntime"]


def test_get_models_answers_like_post(client):
    got, posted = client.get("/models"), client.post("/models")
    assert got.status_code == posted.status_code == 200, got.text
    assert got.headers["content-type"] == "application/json"
    strip = lambda b: {k: v for k, v in b.items() if k != "models"}  # noqa: E731
    assert strip(got.json()) == strip(posted.json())
    for kind in ("music", "caption"):
        g, p = got.json()["models"][kind], posted.json()["models"][kind]
        assert g["providers"] == p["providers"] and g["device"] == p["device"] == "cpu"
    assert client.get("/models/").status_code in (200, 307)
    assert client.put("/models").status_code == 405


def test_declared_resources():
    """No GPU declared without the CUDA provider; BBSERVICE_DEVICE=cuda declares one (the
    decorator reads it when the service module is imported, hence a fresh interpreter)."""
    from bbservice.service import BBService

    assert "gpu" not in BBService.config["resources"]  # CPU onnxruntime here, device auto
    code = "from bbservice.service import BBService; print(BBService.config['resources'])"
    env = dict(os.environ, BBSERVICE_DEVICE="cuda", BENTOML_DO_NOT_TRACK="True")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str({"cpu": "1", "memory": "2Gi", "gpu": 1})


def _sample(name: str, kind: str) -> float:
    import prometheus_client

    return prometheus_client.REGISTRY.get_sample_value(name, {"kind": kind}) or 0.0


def test_project_metrics_follow_the_requests(client):
    """Batch sizes, decode steps and queue depths are recorded where the service runs models."""
    names = ["bbservice_batch_size_count", "bbservice_decode_steps_count"]
    before = {(n, k): _sample(n, k) for n in names for k in ("music", "caption")}
    steps_before = _sample("bbservice_decode_steps_sum", "music")
    assert caption(client, image_bytes(), beam_size=2).status_code == 200
    assert caption(client, image_bytes(), mode="stochastic", samples=2).status_code == 200
    r = client.post("/generate_json", json={"frames": 6, "num_outputs": 2})
    assert r.status_code == 200, r.text
    after = {key: _sample(*key) for key in before}
    assert after["bbservice_batch_size_count", "caption"] == before[names[0], "caption"] + 1
    assert after["bbservice_batch_size_count", "music"] == before[names[0], "music"]
    assert after["bbservice_decode_steps_count", "caption"] == before[names[1], "caption"] + 2
    assert after["bbservice_decode_steps_count", "music"] == before[names[1], "music"] + 1
    # no primer: one step from the silent frame, then one per new frame but the last
    assert _sample("bbservice_decode_steps_sum", "music") - steps_before == 6
    for gauge in ("bbservice_queue_depth", "bbservice_stochastic_queue_depth"):
        for kind in ("music", "caption"):
            assert _sample(gauge, kind) == 0.0  # nothing is waiting any more


def test_openapi_lists_the_endpoints(client):
    paths = client.get("/docs.json").json()["paths"]
    assert {"/caption", "/generate", "/generate_json", "/models"} <= set(paths)


# --------------------------------------------------------------------------------------------
# Bad input: only 4xx with a message naming the problem; the service keeps answering
# --------------------------------------------------------------------------------------------

GOOD_IMAGES = {
    "cmyk.jpg": (image_bytes("CMYK", fmt="JPEG"), "image/jpeg", (48, 32)),
    "grey.png": (image_bytes("L"), "image/png", (48, 32)),
    "grey16.png": (image_bytes("I;16"), "image/png", (48, 32)),
    "palette.png": (image_bytes("P"), "image/png", (48, 32)),
    "rgba.webp": (image_bytes("RGBA", fmt="WEBP"), "image/webp", (48, 32)),
    "exif.jpg": (exif_rotated_jpeg(), "image/jpeg", (20, 60)),
    "anim.gif": (animated_gif(), "image/gif", (24, 24)),
    "photo.bmp": (image_bytes(fmt="BMP"), "application/octet-stream", (48, 32)),
    "wrong-type.png": (image_bytes(), "image/jpeg", (48, 32)),
}


@pytest.mark.parametrize("name", sorted(GOOD_IMAGES))
def test_any_pillow_image(client, name):
    data, ctype, size = GOOD_IMAGES[name]
    r = caption(client, data, name=name, ctype=ctype)
    assert r.status_code == 200, r.text
    assert (r.json()["image"]["width"], r.json()["image"]["height"]) == size


def _post_caption(**kw):
    return lambda c: c.post("/caption", **kw)


def _caption_file(data: bytes, name="x.png", ctype="image/png", **form):
    return lambda c: caption(c, data, name=name, ctype=ctype, **form)


PNG = image_bytes()
BAD = {
    # name: (request, expected status, words the message must contain)
    "truncated png": (_caption_file(PNG[: len(PNG) // 2]), 400, ["image", "truncated"]),
    "text file": (_caption_file(b"hello, world\n", "notes.txt", "text/plain"), 400, ["image"]),
    "zero-byte file": (_caption_file(b""), 400, ["image", "empty"]),
    "empty body": (_post_caption(content=b""), 400, ["image", "required"]),
    "empty multipart": (
        _post_caption(
            content=b"--b--\r\n", headers={"content-type": "multipart/form-data; boundary=b"}
        ),
        400,
        ["image", "required"],
    ),
    "multipart without boundary": (
        _post_caption(content=b"junk", headers={"content-type": "multipart/form-data"}),
        400,
        ["form"],
    ),
    "bomb header": (_caption_file(png_header_only(100_000, 100_000)), 413, ["pixels", "limit"]),
    "text in the file field": (_post_caption(data={"image": "hello"}), 400, ["image", "file"]),
    "url in the file field": (
        _post_caption(data={"image": "http://127.0.0.1:1/x.png"}),
        400,
        ["image", "file"],
    ),
    "url-encoded url": (
        _post_caption(
            content=b"image=http%3A%2F%2Fexample.com%2Fa.png",
            headers={"content-type": "application/x-www-form-urlencoded"},
        ),
        400,
        ["image", "file"],
    ),
    "json string image": (_post_caption(json={"image": "/etc/passwd"}), 400, ["image"]),
    "invalid json": (
        _post_caption(content=b"{nope", headers={"content-type": "application/json"}),
        400,
        ["json"],
    ),
    "too big upload": (_caption_file(b"\0" * (3 << 20)), 413, ["larger", "limit"]),
    "too big chunked upload": (
        lambda c: c.post(
            "/caption",
            content=(b"\0" * (64 << 10) for _ in range(48)),  # no Content-Length: 3 MiB
            headers={"content-type": "multipart/form-data; boundary=b"},
        ),
        413,
        ["larger", "limit"],
    ),
    "too big primer": (
        lambda c: c.post("/generate", files={"primer": ("a.mid", b"MThd" * 300_000, "audio/midi")}),
        413,
        ["primer", "limit"],
    ),
    "beam_size 0": (_caption_file(PNG, beam_size=0), 400, ["beam_size"]),
    "beam_size 99": (_caption_file(PNG, beam_size=99), 400, ["beam_size"]),
    "beam_size text": (_caption_file(PNG, beam_size="three"), 400, ["beam_size"]),
    "n_best > beam": (_caption_file(PNG, beam_size=2, n_best=3), 400, ["n_best"]),
    "beam_groups not dividing": (
        _caption_file(PNG, beam_size=3, beam_groups=2),
        400,
        ["beam_groups", "divide"],
    ),
    "beam_groups 0": (_caption_file(PNG, beam_groups=0), 400, ["beam_groups"]),
    "diversity < 0": (_caption_file(PNG, diversity=-1), 400, ["diversity"]),
    "diversity text": (_caption_file(PNG, diversity="lots"), 400, ["diversity"]),
    "beam_groups stochastic": (
        _caption_file(PNG, mode="stochastic", beam_size=2, beam_groups=2),
        400,
        ["beam_groups", "mean"],
    ),
    "max_length 0": (_caption_file(PNG, max_length=0), 400, ["max_length"]),
    "negative seed": (_caption_file(PNG, seed=-1), 400, ["seed"]),
    "unknown mode": (_caption_file(PNG, mode="psychic"), 400, ["mode"]),
    "samples 0": (_caption_file(PNG, mode="stochastic", samples=0), 400, ["samples"]),
    "frames 0": (lambda c: c.post("/generate", json={"frames": 0}), 400, ["frames"]),
    "frames huge": (lambda c: c.post("/generate", json={"frames": 10**9}), 400, ["frames"]),
    "temperature 0": (lambda c: c.post("/generate", json={"temperature": 0}), 400, ["temp"]),
    "temperature nan": (
        lambda c: c.post(
            "/generate",
            content=b'{"temperature": NaN}',
            headers={"content-type": "application/json"},
        ),
        400,
        ["temperature"],
    ),
    "tempo 1": (lambda c: c.post("/generate_json", json={"tempo": 1}), 400, ["tempo"]),
    "num_outputs 100": (lambda c: c.post("/generate", json={"num_outputs": 100}), 400, ["num"]),
    "too much work": (
        lambda c: c.post("/generate", json={"frames": 2048, "num_outputs": 8}),
        400,
        ["frames x num_outputs"],
    ),
    "json list body": (lambda c: c.post("/generate", json=[1, 2]), 400, ["input"]),
    "corrupt midi primer": (
        lambda c: c.post(
            "/generate", files={"primer": ("a.mid", b"MThd\0\0\0\6junk", "audio/midi")}
        ),
        400,
        ["primer", "midi"],
    ),
    "text primer": (
        lambda c: c.post("/generate_json", files={"primer": ("a.mid", b"la la la", "text/plain")}),
        400,
        ["primer"],
    ),
    "empty primer": (
        lambda c: c.post("/generate", files={"primer": ("a.mid", b"", "audio/midi")}),
        400,
        ["primer", "empty"],
    ),
    "silent primer": (
        lambda c: c.post(
            "/generate",
            files={"primer": ("a.mid", _silent_midi(), "audio/midi")},
        ),
        400,
        ["primer", "notes"],
    ),
    "endless primer": (
        lambda c: c.post("/generate", files={"primer": ("a.mid", _long_midi(), "audio/midi")}),
        400,
        ["primer", "limit"],
    ),
    "primer as text": (lambda c: c.post("/generate", data={"primer": "x"}), 400, ["primer"]),
    "pickle body": (
        lambda c: c.post(
            "/generate",
            content=b"\x80\x05N.",
            headers={"content-type": "application/vnd.bentoml+pickle"},
        ),
        415,
        ["pickle"],
    ),
}


def _silent_midi() -> bytes:
    pm = pretty_midi.PrettyMIDI()
    pm.instruments.append(pretty_midi.Instrument(0))
    pm.instruments[0].control_changes.append(pretty_midi.ControlChange(64, 0, 2.0))
    buf = io.BytesIO()
    pm.write(buf)
    return buf.getvalue()


def _long_midi() -> bytes:
    pm = pretty_midi.PrettyMIDI(initial_tempo=120)
    inst = pretty_midi.Instrument(0)
    inst.notes.append(pretty_midi.Note(80, 60, 0.0, 3000.0))  # 6000 beats
    pm.instruments.append(inst)
    buf = io.BytesIO()
    pm.write(buf)
    return buf.getvalue()


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_a_4xx_with_a_message(client, name):
    request, status, words = BAD[name]
    r = request(client)
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    message = body["error"].lower()
    assert body["status"] == status
    for word in words:
        assert word.lower() in message, message


def test_the_service_still_answers_after_bad_input(client):
    for name in sorted(BAD):
        BAD[name][0](client)
    assert client.get("/readyz").status_code == 200
    assert caption(client, image_bytes()).status_code == 200
    assert client.post("/generate", json={"frames": 4}).status_code == 200


def test_unknown_route_and_method(client):
    for r, status in ((client.post("/nonesuch"), 404), (client.get("/caption"), 405)):
        assert r.status_code == status
        assert r.json()["status"] == status and r.json()["error"]  # the one error shape


# --------------------------------------------------------------------------------------------
# Readiness, stochastic availability, model store
# --------------------------------------------------------------------------------------------


def test_not_ready_until_warm_up_has_passed(exports, monkeypatch):
    from bbservice.service import BBService

    gate = threading.Event()
    original = BBService.inner._warm_caption

    def slow_warm_up(self, slot):
        gate.wait(30)
        return original(self, slot)

    monkeypatch.setattr(BBService.inner, "_warm_caption", slow_warm_up)
    with make_client(export_env(exports), ready=False) as c:
        assert c.get("/livez").status_code == 200
        assert c.get("/readyz").status_code == 503
        assert c.post("/models").json()["models"]["caption"]["state"] == "loading"
        assert c.post("/generate", json={"frames": 4}).status_code == 200  # music is warm
        gate.set()
        wait_ready(c)
        assert caption(c, image_bytes()).status_code == 200


def test_a_broken_model_keeps_the_service_unready_and_not_alive(exports, tmp_path):
    broken = tmp_path / "caption"
    shutil.copytree(exports["caption"], broken)
    (broken / "caption_step.onnx").write_bytes(b"not onnx")
    failures = _sample("bbservice_model_load_failures_total", "caption")
    with make_client(export_env(exports, BBSERVICE_CAPTION_EXPORT=str(broken)), ready=False) as c:
        deadline = time.monotonic() + 30
        while c.post("/models").json()["models"]["caption"]["state"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.get("/livez").status_code == 503  # BBSERVICE_READY=all can never be met
        assert c.get("/readyz").status_code == 503
        info = c.post("/models").json()["models"]["caption"]
        assert info["state"] == "failed" and "caption_step.onnx" in info["error"]
        assert _sample("bbservice_model_load_failures_total", "caption") == failures + 1
        r = caption(c, image_bytes())
        assert r.status_code == 503 and "caption model is not available" in r.json()["error"]
        assert c.post("/generate", json={"frames": 4}).status_code == 200


def test_stochastic_off_is_a_clear_409(exports):
    with make_client(export_env(exports, BBSERVICE_STOCHASTIC="off")) as c:
        r = caption(c, image_bytes(), mode="stochastic")
        assert r.status_code == 409
        assert "BBSERVICE_STOCHASTIC=off" in r.json()["error"] and "mode=mean" in r.json()["error"]
        assert c.post("/generate", json={"mode": "stochastic"}).status_code == 409
        assert caption(c, image_bytes()).status_code == 200  # the mean path still works


def test_without_torch_stochastic_is_a_409_and_mean_works(exports, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with make_client(export_env(exports)) as c:
        r = c.post("/generate", json={"frames": 4, "mode": "stochastic"})
        assert r.status_code == 409 and "PyTorch is not installed" in r.json()["error"]
        assert c.post("/generate", json={"frames": 4}).status_code == 200
        info = c.post("/models").json()["models"]["music"]["stochastic"]
        assert info["available"] is False and "PyTorch" in info["reason"]


def test_checkpoint_of_another_model_is_refused(exports, tmp_path):
    wrong = tmp_path / "music"
    shutil.copytree(exports["music"], wrong)
    from safetensors.numpy import load_file, save_file

    state = load_file(str(wrong / "checkpoint" / "model.safetensors"))
    state = {k: v + 1.0 if v.dtype.kind == "f" else v for k, v in state.items()}
    save_file(state, str(wrong / "checkpoint" / "model.safetensors"))
    with make_client(export_env(exports, BBSERVICE_MUSIC_EXPORT=str(wrong))) as c:
        r = c.post("/generate", json={"mode": "stochastic"})
        assert r.status_code == 409 and "not the exported model" in r.json()["error"]


def test_models_from_the_bentoml_model_store(exports):
    from export.onnx_export import save_to_store

    tags = {}
    for kind in ("music", "caption"):
        manifest = json.loads((exports[kind] / "manifest.json").read_text())
        tags[kind] = save_to_store(kind, exports[kind], manifest)
    env = {
        "BBSERVICE_MUSIC_EXPORT": None,
        "BBSERVICE_CAPTION_EXPORT": None,
    }
    with make_client(env) as c:
        body = wait_stochastic_loaded(c)
        for kind in ("music", "caption"):
            info = body["models"][kind]
            assert info["source"] == "model store" and info["tag"] == tags[kind]
            assert info["stochastic"]["available"] is True  # checkpoint/ travels with the entry
        r = caption(c, image_bytes())
        assert r.status_code == 200 and r.json()["model"]["tag"] == tags["caption"]


def _pruned_exports(tmp_path: Path) -> dict[str, Path]:
    """Pruned exports of tiny sparse models, with their sparse checkpoints beside them."""
    import torch
    from conftest import PRUNE_ALL, prune_some, sparse_music_model, tiny_caption_config

    from bbservice import checkpoints
    from bbservice.models.caption import CaptionModel
    from export.pruned import export_pruned_caption, export_pruned_music

    def checkpoint(model, kind: str) -> tuple[Path, dict]:
        folder = tmp_path / f"{kind}_checkpoint"
        config = {"kind": kind, "model": model.config.to_dict()}
        checkpoints.save_checkpoint(folder, model, config)
        return folder, config

    music = sparse_music_model("bbeta5", seed=4)
    prune_some(music)
    torch.manual_seed(0)
    cap = CaptionModel.build(tiny_caption_config("bbeta5")).eval()
    with torch.no_grad():
        cap.decoder.cell.log_sigma2_z[:20] = PRUNE_ALL
    out = {}
    for kind, model, exporter in (
        ("music", music, export_pruned_music),
        ("caption", cap, export_pruned_caption),
    ):
        folder, config = checkpoint(model, kind)
        out[kind] = tmp_path / f"{kind}_export"
        exporter(model, out[kind], config=config, store=False, source={"checkpoint": str(folder)})
        out[f"{kind}_checkpoint"] = folder
    return out


def test_pruned_exports_serve_mean_and_stochastic(tmp_path):
    exports = _pruned_exports(tmp_path)
    with make_client(export_env(exports)) as c:
        r = c.post("/generate_json", json={"frames": 8, "seed": 1})
        assert r.status_code == 200, r.text
        r = c.post("/generate_json", json={"frames": 8, "mode": "stochastic", "seed": 1})
        assert r.status_code == 200, r.text  # gates sampled by the sparse PyTorch model
        assert caption(c, image_bytes()).status_code == 200
        r = caption(c, image_bytes(), mode="stochastic", samples=3, seed=0)
        assert r.status_code == 200, r.text
        body = wait_stochastic_loaded(c)
        for kind in ("music", "caption"):
            info = body["models"][kind]["stochastic"]
            assert info["available"] is True, info
            assert info["checkpoint"] == str(exports[f"{kind}_checkpoint"])


# --------------------------------------------------------------------------------------------
# Pieces: the PyTorch device, the caption batcher's queue report
# --------------------------------------------------------------------------------------------


def test_the_pytorch_twin_picks_cuda_when_torch_sees_a_gpu(monkeypatch):
    import torch

    from bbservice.service.slots import torch_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [torch_device(s) for s in ("auto", "cpu", "cuda")] == ["cpu", "cpu", "cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [torch_device(s) for s in ("auto", "cpu", "cuda")] == ["cuda", "cpu", "cuda"]


def test_caption_batcher_reports_its_queue():
    import asyncio

    from bbservice.service.batching import CaptionBatcher

    depths: list[int] = []
    batches: list[int] = []

    def run(key, arrays):
        batches.append(len(arrays))
        time.sleep(0.05)
        return [a.sum() for a in arrays]

    async def main():
        batcher = CaptionBatcher(run, max_batch=8, on_queue=depths.append)
        arrays = [np.full((3, 2, 2), i, np.float32) for i in range(5)]
        first = asyncio.ensure_future(batcher.submit(("k",), arrays[0]))
        await asyncio.sleep(0.01)  # the first request is running now
        rest = await asyncio.gather(*(batcher.submit(("k",), a) for a in arrays[1:]))
        return [await first, *rest]

    results = asyncio.run(main())
    assert [r[0] for r in results] == [0, 12, 24, 36, 48]
    assert [r[1] for r in results] == [1, 4, 4, 4, 4]
    assert batches == [1, 4]  # the first runs alone, the others wait and run together
    assert depths == [1, 0, 1, 2, 3, 4, 0]
