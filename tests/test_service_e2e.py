"""End to end: ``bbservice serve`` (a real ``bentoml serve`` process) on 127.0.0.1, a free port.

Start it on the tiny cached exports, wait for ``/readyz``, caption an image and download a MIDI
file over real HTTP, then shut it down. Skipped, with the server's log tail as the reason, when
BentoML does not come up in time.
"""

from __future__ import annotations

import argparse
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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    exports = tiny_exports()
    tmp = tmp_path_factory.mktemp("e2e")
    port = free_port()
    env = dict(os.environ, BENTOML_HOME=str(tmp / "bentoml"), BENTOML_DO_NOT_TRACK="True")
    command = [sys.executable, "-m", "bbservice.cli", "serve", "--port", str(port)]
    command += [
        "--music-export",
        str(exports["music"]),
        "--caption-export",
        str(exports["caption"]),
    ]
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
            tail = (tmp / "server.log").read_text(errors="replace")[-1500:]
            state = f"exited with {proc.returncode}" if proc.poll() is not None else "running"
            pytest.skip(f"bentoml serve not ready in {START_TIMEOUT_S} s ({state}): {tail}")
        with httpx.Client(base_url=base, timeout=60) as client:
            yield client, proc, tmp / "server.log"
    finally:
        _stop(proc)
        log.close()


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
