"""End to end: ``bbservice serve`` (a real ``bentoml serve`` process) on 127.0.0.1, a free port.

Start it on the tiny cached exports, wait for ``/readyz``, caption an image and download a MIDI
file over real HTTP, then shut it down. A server that dies at start or is not ready in time
FAILS the test, with its log tail; only a missing BentoML skips. A second server starts from a
model store that lacks the caption model (what used to abort ``bentoml serve``) and must serve
music while answering captions with a 503 that names the missing tag.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pretty_midi
import pytest
from test_service import image_bytes, tiny_exports

pytest.importorskip("bentoml", reason="serving needs BentoML (pip install 'bbservice[serve]')")

from bbservice.errors import ConfigError
from bbservice.serve_cli import SERVICE, build_command
from bbservice.service_metrics import METRIC_NAMES

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@contextlib.contextmanager
def start_server(tmp: Path, extra_args: list[str], env: dict[str, str]):
    """(client, process) of a ready ``bbservice serve``; fails with the log tail otherwise."""
    port = free_port()
    command = [sys.executable, "-m", "bbservice.cli", "serve", "--port", str(port), *extra_args]
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    ready = False
    try:
        with httpx.Client(base_url=base, timeout=5) as client:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    ready = client.get("/readyz").status_code == 200
                except httpx.TransportError:
                    ready = False
                if ready:
                    break
                time.sleep(0.25)
        if not ready:
            tail = (tmp / "server.log").read_text(errors="replace")[-3000:]
            state = f"exited with {proc.returncode}" if proc.poll() is not None else "running"
            pytest.fail(f"bentoml serve not ready in {START_TIMEOUT_S} s ({state}): {tail}")
        with httpx.Client(base_url=base, timeout=60) as client:
            yield client, proc, tmp / "server.log"
    finally:
        _stop(proc)
        log.close()


def clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BBSERVICE_")}
    return {**env, "BENTOML_HOME": str(tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "True", **extra}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    exports = tiny_exports()
    tmp = tmp_path_factory.mktemp("e2e")
    args = ["--music-export", str(exports["music"]), "--caption-export", str(exports["caption"])]
    with start_server(tmp, args, clean_env(tmp)) as running:
        yield running


def test_a_model_missing_from_the_store_leaves_the_other_serving(tmp_path):
    """BentoML resolves declared models at start: a missing one used to abort the server."""
    exports = tiny_exports()
    env = clean_env(tmp_path, BBSERVICE_READY="any")
    save = (
        "import json, sys; from pathlib import Path; from export.onnx_export import save_to_store;"
        "f = Path(sys.argv[1]); print(save_to_store('music', f, "
        "json.loads((f / 'manifest.json').read_text())))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", save, str(exports["music"])],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    music_tag = proc.stdout.strip().splitlines()[-1]
    env["BBSERVICE_MUSIC_TAG"] = music_tag  # pinned
    with start_server(tmp_path, [], env) as (client, _, _):
        models = client.post("/models").json()
        assert models["ready"] is True and models["alive"] is True
        assert models["models"]["music"]["tag"] == music_tag
        caption = models["models"]["caption"]
        assert caption["state"] == "failed" and "bbservice-caption:latest" in caption["error"]
        r = client.post("/caption", files={"image": ("a.png", image_bytes(), "image/png")})
        assert r.status_code == 503 and "bbservice-caption:latest" in r.json()["error"]
        assert r.json()["status"] == 503
        assert client.post("/generate", json={"frames": 8}).status_code == 200
        assert client.get("/livez").status_code == 200


def test_serve_caption_generate_and_shut_down(server):
    client, proc, log_path = server
    assert client.get("/livez").status_code == 200
    r = client.post(
        "/caption",
        files={"image": ("photo.jpg", image_bytes(fmt="JPEG"), "image/jpeg")},
        data={"beam_size": "3", "attention": "true"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["captions"][0]["text"] and r.json()["model"]["gate_family"] == "bbeta5"

    r = client.post("/generate", json={"frames": 32, "seed": 7, "tempo": 120})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/midi"
    assert "bbservice-seed7.mid" in r.headers["content-disposition"]
    assert pretty_midi.PrettyMIDI(io.BytesIO(r.content)).get_end_time() > 0

    r = client.post("/caption", files={"image": ("x.png", b"\x89PNG\r\n\x1a\n", "image/png")})
    assert r.status_code == 400 and "image" in r.json()["error"]
    models = client.get("/models").json()
    assert models["ready"] is True and models["models"]["music"]["state"] == "warm"
    assert models["models"]["caption"]["device"] == "cpu"
    assert client.post("/models").json()["models"].keys() == models["models"].keys()
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    for name in METRIC_NAMES:  # the project's metrics, from the worker, next to BentoML's
        assert f"# TYPE {name}" in metrics.text, name
    assert 'bbservice_batch_size_count{kind="caption"} 1.0' in metrics.text
    # the project's INFO lines pass BentoML's log level: which providers each graph really got
    log_text = log_path.read_text(errors="replace")
    assert "caption_step.onnx: ONNX Runtime providers ['CPUExecutionProvider']" in log_text
    assert client.get("/readyz").status_code == 200  # still up after the bad request

    _stop(proc)
    assert proc.returncode is not None
    with pytest.raises(httpx.TransportError):
        client.get("/livez", timeout=2)


def test_serve_command_line():
    args = argparse.Namespace(
        host="127.0.0.1",
        port=3000,
        music_export=None,
        caption_export=None,
        device="cpu",
        precision=None,
        bento=None,
    )
    command, env = build_command(args)
    assert command[1:] == [
        "-m",
        "bentoml",
        "serve",
        SERVICE,
        "--host",
        "127.0.0.1",
        "--port",
        "3000",
    ]
    assert env["BBSERVICE_DEVICE"] == "cpu"
    with pytest.raises(ConfigError, match="--port"):
        build_command(argparse.Namespace(**{**vars(args), "port": 0}))
    with pytest.raises(ConfigError, match="not an export folder"):
        build_command(argparse.Namespace(**{**vars(args), "music_export": "/nonexistent"}))
