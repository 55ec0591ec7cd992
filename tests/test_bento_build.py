"""``bentoml build`` of ``bentofile.yaml`` (GPU image) and ``bentofile.cpu.yaml``, offline.

In a subprocess with its own BentoML home: the tiny cached exports go into the model store
(``export.onnx_export.save_to_store``, as ``bbservice export`` does), both bentos are built with
every network route closed (a dead proxy, uv and pip offline), and the Docker build context is
made without a Docker engine (``bentoml._internal.container.construct_containerfile``, what
``bentoml containerize`` does before calling the engine). The test then reads the generated
Dockerfile, the locked requirements (``bento/requirements-*.txt``) and the models packed into
the context.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_service import tiny_exports

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, subprocess, sys
from pathlib import Path
from export.onnx_export import save_to_store

exports, out = json.loads(sys.argv[1]), Path(sys.argv[2])
tags = {}
for kind, folder in exports.items():
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    tags[kind] = save_to_store(kind, Path(folder), manifest)

import bentoml
from bentoml._internal.container import construct_containerfile

result = {"models": tags, "bentos": {}}
for bentofile in ("bentofile.yaml", "bentofile.cpu.yaml"):
    proc = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "-f", bentofile, "-o", "tag"],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"bentoml build -f {bentofile} failed:\n{proc.stdout}\n{proc.stderr}")
    tag = proc.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    bento = bentoml.bentos.get(tag)
    with construct_containerfile(bento, enable_buildkit=False) as (context, dockerfile):
        context = Path(context)
        packed = {}
        for manifest in sorted(context.glob("models/*/*/manifest.json")):
            entry = manifest.parent
            packed[f"{entry.parent.name}:{entry.name}"] = {
                "content_hash": json.loads(manifest.read_text())["content_hash"],
                "files": sorted(str(p.relative_to(entry)) for p in entry.rglob("*") if p.is_file()),
            }
        result["bentos"][bentofile] = {
            "tag": str(bento.tag),
            "path": str(bento.path),
            "dockerfile": Path(dockerfile).read_text(),
            "requirements": (Path(bento.path) / "env/python/requirements.txt").read_text(),
            "src": sorted(
                str(p.relative_to(Path(bento.path) / "src"))
                for p in (Path(bento.path) / "src").rglob("*") if p.is_file()
            ),
            "packed_models": packed,
        }
(out / "result.json").write_text(json.dumps(result))
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    exports = {k: str(v) for k, v in tiny_exports().items()}
    tmp = tmp_path_factory.mktemp("bento")
    dead = "http://127.0.0.1:9"  # nothing listens there: any download attempt fails fast
    env = dict(
        os.environ,
        BENTOML_HOME=str(tmp / "home"),
        BENTOML_DO_NOT_TRACK="True",
        HTTP_PROXY=dead,
        HTTPS_PROXY=dead,
        http_proxy=dead,
        https_proxy=dead,
        NO_PROXY="",
        UV_OFFLINE="1",
        PIP_NO_INDEX="1",
    )
    for key in ("BBSERVICE_MUSIC_EXPORT", "BBSERVICE_CAPTION_EXPORT"):
        env.pop(key, None)  # the build takes the models from the store
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(exports), str(tmp)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp / "result.json").read_text())
    result["exports"] = exports
    return result


def requirement_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def test_gpu_image_gets_cuda_13_from_pip_wheels_on_a_plain_python_base(built):
    bento = built["bentos"]["bentofile.yaml"]
    dockerfile = bento["dockerfile"]
    froms = [line for line in dockerfile.splitlines() if line.startswith("FROM ")]
    assert froms == ["FROM python:3.11-slim AS base-container"]
    assert "nvidia/cuda" not in dockerfile and "cuda-" not in dockerfile.lower()
    assert "pip install -r $BENTO_PATH/env/python/requirements.txt" in dockerfile
    assert "ENV BBSERVICE_DEVICE=$BBSERVICE_DEVICE" in dockerfile
    assert "EXPOSE 3000" in dockerfile
    # g++ for the fused CPU kernels of mode=stochastic, whose source travels with the bento
    installs = [line for line in dockerfile.splitlines() if "apt-get install" in line]
    assert any(" g++" in line for line in installs), installs
    assert "bbservice/fused/kernels.cpp" in bento["src"]
    assert "ENV BENTOML_DO_NOT_TRACK=$BENTOML_DO_NOT_TRACK" in dockerfile
    assert "ARG BENTOML_DO_NOT_TRACK=True" in dockerfile
    reqs = requirement_lines(bento["requirements"])
    assert {"onnxruntime-gpu==1.31.1", "torch==2.14.1", "torchvision==0.29.1"} <= set(reqs)
    assert "bentoml==1.4.39" in reqs and "nvidia-cudnn-cu13" in bento["requirements"]
    assert not any(r.startswith("onnxruntime==") for r in reqs)
    # Locked: the generated file (scripts/bento_requirements.py), every package pinned.
    locked = (ROOT / "bento" / "requirements-gpu.txt").read_text()
    assert set(reqs) == set(requirement_lines(locked))  # BentoML appends bentoml again
    assert all("==" in r for r in reqs)


def test_cpu_variant(built):
    bento = built["bentos"]["bentofile.cpu.yaml"]
    assert bento["tag"].startswith("bbservice-cpu:")
    reqs = requirement_lines(bento["requirements"])
    assert "onnxruntime==1.31.1" in reqs and "bentoml==1.4.39" in reqs
    assert not any(r.startswith(("onnxruntime-gpu", "torch", "nvidia-cu")) for r in reqs)
    assert all("==" in r for r in reqs)
    assert "ENV BENTOML_DO_NOT_TRACK=$BENTOML_DO_NOT_TRACK" in bento["dockerfile"]
    assert "FROM python:3.11-slim AS base-container" in bento["dockerfile"]
    assert "ARG BBSERVICE_DEVICE=cpu" in bento["dockerfile"]
    assert "g++" not in bento["dockerfile"]  # no torch here, so no kernels to build
    assert "bbservice/fused/kernels.cpp" not in bento["src"]


@pytest.mark.parametrize("bentofile", ["bentofile.yaml", "bentofile.cpu.yaml"])
def test_models_are_packed_with_their_checkpoints(built, bentofile):
    bento = built["bentos"][bentofile]
    assert set(bento["packed_models"]) == set(built["models"].values())
    for kind, tag in built["models"].items():
        packed = bento["packed_models"][tag]
        manifest = json.loads((Path(built["exports"][kind]) / "manifest.json").read_text())
        assert packed["content_hash"] == manifest["content_hash"]
        assert set(manifest["files"]) <= set(packed["files"])
        # The PyTorch checkpoint travels with the store entry (mode=stochastic).
        assert "checkpoint/model.safetensors" in packed["files"]
    bento_yaml = (Path(bento["path"]) / "bento.yaml").read_text()
    assert all(tag in bento_yaml for tag in built["models"].values())


def test_bento_holds_the_service_package_only(built):
    src = built["bentos"]["bentofile.yaml"]["src"]
    service = {"bbservice/service/__init__.py", "bbservice/service/app.py"}
    assert service | {"bbservice/runtime.py", "bbservice/decoding.py"} <= set(src)
    assert not [p for p in src if p.startswith(("training/", "tests/", "export/", "artifacts/"))]
    assert not [p for p in src if "__pycache__" in p or p.endswith(".pyc")]
