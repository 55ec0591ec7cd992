"""Faults the service survives (issue 13): missing and broken models, the readiness policy,
serving one kind, pinned tags, the frame budget with a primer, the bounded stochastic queues and
the request limits, every refusal in the one error shape.

In process (``BBService.to_asgi()`` under starlette's TestClient, helpers of test_service.py);
one subprocess runs BentoML's own start-up model resolution on a store that lacks a model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_service import (
    caption,
    export_env,
    image_bytes,
    make_client,
    primer_midi,
    tiny_exports,
)

from bbservice.errors import ConfigError
from bbservice.service.settings import Settings

pytestmark = [
    pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`"),
    pytest.mark.filterwarnings("ignore:Unable to serialize value None with the plain serial"),
]


@pytest.fixture(scope="module")
def exports():
    return tiny_exports()


@pytest.fixture(scope="module")
def store_tags(exports) -> dict[str, str]:
    """Both tiny models saved into this test run's BentoML model store."""
    from export.onnx_export import save_to_store

    tags = {}
    for kind in ("music", "caption"):
        manifest = json.loads((exports[kind] / "manifest.json").read_text())
        tags[kind] = save_to_store(kind, exports[kind], manifest)
    return tags


def one_error(r, status: int) -> str:
    """The message of an answer in the documented error shape with ``status``."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["x-bbservice-error"] == "1"
    body = r.json()
    assert set(body) <= {"error", "status", "detail"} and body["status"] == status
    assert body["error"] and "\n" not in body["error"]
    return body["error"]


def wait_settled(c, timeout: float = 60.0) -> dict:
    """``/models`` once no served model is still loading."""
    deadline = time.monotonic() + timeout
    while True:
        body = c.post("/models").json()
        if all(m["state"] != "loading" for m in body["models"].values()):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


# -- settings ----------------------------------------------------------------------------------


def test_settings_of_the_new_variables():
    s = Settings.from_env(
        {
            "BBSERVICE_MODELS": "caption",
            "BBSERVICE_CAPTION_TAG": "abc123",
            "BBSERVICE_MUSIC_TAG": "my-music:v2",
            "BBSERVICE_READY": "any",
            "BBSERVICE_STOCHASTIC_QUEUE": "0",
        }
    )
    assert s.models == ("caption",) and s.ready == "any" and s.stochastic_queue == 0
    assert s.store_tag("caption") == "bbservice-caption:abc123"
    assert s.store_tag("music") == "my-music:v2"
    assert Settings.from_env({}).store_tag("music") == "bbservice-music:latest"
    assert Settings.from_env({"BBSERVICE_MODELS": "caption, music"}).models == ("music", "caption")
    for env, words in (
        ({"BBSERVICE_MODELS": "video"}, "BBSERVICE_MODELS"),
        ({"BBSERVICE_MODELS": ","}, "BBSERVICE_MODELS"),
        ({"BBSERVICE_READY": "most"}, "BBSERVICE_READY"),
        ({"BBSERVICE_CAPTION_TAG": "a b"}, "BBSERVICE_CAPTION_TAG"),
        ({"BBSERVICE_TIMEOUT_S": "nan"}, "BBSERVICE_TIMEOUT_S"),
        ({"BBSERVICE_MAX_CONCURRENCY": "0"}, "BBSERVICE_MAX_CONCURRENCY"),
    ):
        with pytest.raises(ConfigError, match=words):
            Settings.from_env(env)


def test_bentoml_traffic_limits_are_left_to_the_guard():
    """BentoML's own 429/504 middlewares run outside every service middleware and answer in
    their own shape: the service leaves max_concurrency unset and sets BentoML's timeout as a
    backstop behind RequestGuard's."""
    from bbservice.service import BBService

    traffic = BBService.config["traffic"]
    assert "max_concurrency" not in traffic
    assert traffic["timeout"] > Settings.from_env().timeout_s


# -- missing and broken models, readiness policy, liveness ------------------------------------


def test_only_models_in_the_store_are_declared(store_tags):
    from bbservice.service import store

    env = {"BBSERVICE_CAPTION_TAG": "bbservice-caption:nosuchversion"}
    settings = Settings.from_env(env)
    assert store.declared_model("caption", settings) is None
    import bentoml

    declared = store.declared_model("music", settings)
    latest = bentoml.models.get("bbservice-music:latest").tag
    assert declared.tag == latest and latest.version != "latest"  # the resolved version
    assert store.declared_model("music", Settings.from_env({"BBSERVICE_MODELS": "caption"})) is None
    with pytest.raises(Exception, match="nosuchversion.*not in the BentoML model store"):
        store.stored_model("caption", settings)


def test_bentoml_start_up_resolution_survives_a_missing_model(store_tags, tmp_path):
    """What aborted `bentoml serve` before the service existed: BentoML resolves the models a
    service declares when it starts (server_on_deployment). A store without the caption model
    must leave the service importable and resolvable, the music model declared."""
    code = (
        "from _bentoml_impl.server.serving import server_on_deployment\n"
        "from bbservice.service import BBService\n"
        "server_on_deployment(BBService)\n"
        "print(sorted(str(m.tag) for m in BBService.models))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BBSERVICE_")}
    env["BBSERVICE_CAPTION_TAG"] = "bbservice-caption:nosuchversion"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    declared = proc.stdout.strip().splitlines()[-1]
    assert declared.startswith("['bbservice-music:") and "," not in declared, declared


@pytest.mark.parametrize("policy", ["any", "all"])
def test_a_missing_model_leaves_the_other_serving(exports, store_tags, policy):
    env = export_env(
        exports,
        BBSERVICE_CAPTION_EXPORT=None,
        BBSERVICE_CAPTION_TAG="bbservice-caption:nosuchversion",
        BBSERVICE_READY=policy,
    )
    with make_client(env, ready=False) as c:
        body = wait_settled(c)
        info = body["models"]["caption"]
        assert info["state"] == "failed" and "not in the BentoML model store" in info["error"]
        assert info["tag"] == "bbservice-caption:nosuchversion"
        assert body["models"]["music"]["state"] == "warm" and body["ready_policy"] == policy
        message = one_error(caption(c, image_bytes()), 503)
        assert "caption model is not available" in message and "nosuchversion" in message
        assert c.post("/generate", json={"frames": 4}).status_code == 200
        # any: the music model is enough; all: never ready, so no longer alive either
        expected = 200 if policy == "any" else 503
        assert c.get("/readyz").status_code == expected
        assert c.get("/livez").status_code == expected
        assert body["alive"] is (policy == "any")


def test_any_policy_is_not_alive_when_every_model_failed(exports, tmp_path):
    broken = tmp_path / "music"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    env = export_env(
        exports,
        BBSERVICE_MODELS="music",
        BBSERVICE_MUSIC_EXPORT=str(broken),
        BBSERVICE_READY="any",
    )
    with make_client(env, ready=False) as c:
        body = wait_settled(c)
        assert list(body["models"]) == ["music"] and body["models"]["music"]["state"] == "failed"
        assert c.get("/readyz").status_code == 503 and c.get("/livez").status_code == 503


def test_still_warming_is_alive_but_not_ready(exports, monkeypatch):
    from bbservice.service import BBService

    gate = threading.Event()
    original = BBService.inner._warm_music

    def slow(self, slot):
        gate.wait(30)
        return original(self, slot)

    monkeypatch.setattr(BBService.inner, "_warm_music", slow)
    with make_client(export_env(exports, BBSERVICE_MODELS="music"), ready=False) as c:
        try:
            assert c.get("/livez").status_code == 200
            assert c.get("/readyz").status_code == 503
        finally:
            gate.set()
        wait_settled(c)
        assert c.get("/readyz").status_code == 200


def test_serve_one_kind_only(exports):
    env = export_env(exports, BBSERVICE_MODELS="caption", BBSERVICE_MUSIC_EXPORT="/nonexistent")
    with make_client(env) as c:  # ready without the music model
        body = c.post("/models").json()
        assert list(body["models"]) == ["caption"] and body["ready"] is True
        assert caption(c, image_bytes()).status_code == 200
        for route in ("/generate", "/generate_json"):
            message = one_error(c.post(route, json={"frames": 4}), 404)
            assert "does not serve the music model" in message and "BBSERVICE_MODELS" in message


def test_a_pinned_tag_is_served_instead_of_latest(exports, store_tags):
    from export.onnx_export import save_to_store

    manifest = json.loads((exports["music"] / "manifest.json").read_text())
    newer = save_to_store("music", exports["music"], manifest)  # now :latest
    assert newer != store_tags["music"]
    version = store_tags["music"].split(":")[1]
    env = export_env(
        exports, BBSERVICE_MUSIC_EXPORT=None, BBSERVICE_MUSIC_TAG=version, BBSERVICE_MODELS="music"
    )
    with make_client(env) as c:
        r = c.post("/generate_json", json={"frames": 4})
        assert r.status_code == 200 and r.json()["model"]["tag"] == store_tags["music"]
        assert c.post("/models").json()["models"]["music"]["tag"] == store_tags["music"]


# -- frame budget, queues, request limits ------------------------------------------------------


def test_primer_frames_count_toward_the_frame_budget(exports):
    with make_client(export_env(exports, BBSERVICE_MODELS="music")) as c:
        files = {"primer": ("tune.mid", primer_midi(), "audio/midi")}  # 4 frames
        r = c.post("/generate_json", data={"frames": "2048", "num_outputs": "4"}, files=files)
        message = one_error(r, 400)  # 2048 x 4 alone is within the 8192 limit
        assert "(primer frames + frames) x num_outputs = 8208" in message
        r = c.post("/generate_json", data={"frames": "2044", "num_outputs": "4"}, files=files)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["frames"] == 2048


@pytest.fixture
def blocked(monkeypatch):
    """Stochastic captions that run only once ``gate`` is set; ``running`` is set inside."""
    from bbservice.service import slots

    gate, running = threading.Event(), threading.Event()
    calls = {"started": 0, "ended": 0}
    original = slots.caption_passes

    def passes(*args):
        calls["started"] += 1
        running.set()
        try:
            gate.wait(30)
            return original(*args)
        finally:
            calls["ended"] += 1

    monkeypatch.setattr(slots, "caption_passes", passes)
    yield gate, running
    gate.set()
    deadline = time.monotonic() + 60  # no model still running in a thread at exit
    while calls["ended"] < calls["started"] and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_full_stochastic_queue_is_a_429_and_mean_requests_still_answer(exports, blocked):
    gate, running = blocked
    env = export_env(exports, BBSERVICE_STOCHASTIC_QUEUE="1")
    with make_client(env) as c, ThreadPoolExecutor(2) as pool:
        stochastic = dict(mode="stochastic", samples=2, beam_size=1)
        first = pool.submit(caption, c, image_bytes(), **stochastic)
        assert running.wait(30)
        second = pool.submit(caption, c, image_bytes(), **stochastic)  # waits in the queue
        deadline = time.monotonic() + 30
        while c.post("/models").json()["models"]["caption"]["stochastic_queue"]["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        message = one_error(caption(c, image_bytes(), **stochastic), 429)
        assert "stochastic caption queue is full" in message
        # mean requests and the other kind's stochastic queue are not behind it
        assert caption(c, image_bytes()).status_code == 200
        assert c.post("/generate_json", json={"frames": 4}).status_code == 200
        r = c.post("/generate_json", json={"frames": 4, "mode": "stochastic"})
        assert r.status_code == 200, r.text
        gate.set()
        assert first.result(60).status_code == 200 and second.result(60).status_code == 200
        stats = c.post("/models").json()["models"]["caption"]["stochastic_queue"]
        assert stats["refused"] == 1 and stats["served"] == 2 and stats["waiting"] == 0


def test_too_many_in_flight_is_a_429_and_a_timeout_a_504_in_the_one_shape(exports, blocked):
    gate, running = blocked
    env = export_env(exports, BBSERVICE_MAX_CONCURRENCY="1", BBSERVICE_TIMEOUT_S="1.5")
    with make_client(env) as c, ThreadPoolExecutor(1) as pool:
        slow = pool.submit(caption, c, image_bytes(), mode="stochastic", samples=2)
        assert running.wait(30)
        message = one_error(c.post("/generate", json={"frames": 4}), 429)
        assert "BBSERVICE_MAX_CONCURRENCY" in message
        assert c.get("/readyz").status_code == 200  # health checks are not counted
        message = one_error(slow.result(60), 504)
        assert "BBSERVICE_TIMEOUT_S" in message
        # the cancelled request's thread still runs: it keeps its place in the queue
        queue = c.post("/models").json()["models"]["caption"]["stochastic_queue"]
        assert queue["running"] == 1
        gate.set()
        deadline = time.monotonic() + 60
        while c.post("/models").json()["models"]["caption"]["stochastic_queue"]["running"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.post("/generate", json={"frames": 4}).status_code == 200
