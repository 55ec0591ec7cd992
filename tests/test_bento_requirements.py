"""The bentos' locked requirements follow ``pyproject.toml`` (scripts/bento_requirements.py):
a drift fails here, offline."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bento_requirements  # noqa: E402

IMAGES = bento_requirements.IMAGES


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_locked_files_match_pyproject(image):
    assert bento_requirements.check(image, IMAGES[image]) == []


def test_images_take_their_packages_from_pyproject():
    cpu = bento_requirements.direct_requirements(IMAGES["cpu"])
    gpu = bento_requirements.direct_requirements(IMAGES["gpu"])
    assert "onnxruntime==1.31.1" in cpu and "bentoml==1.4.39" in cpu
    assert not [r for r in cpu if r.startswith(("torch", "onnxruntime-gpu"))]
    assert {"torch==2.14.1", "torchvision==0.29.1", "onnxruntime-gpu[cuda,cudnn]==1.31.1"} <= set(
        gpu
    )
    assert not [r for r in gpu if r.startswith("onnxruntime==")]


def test_cpu_lock_has_no_torch():
    pins = bento_requirements.pins(IMAGES["cpu"].path("cpu").read_text())
    assert "torch" not in pins and "torchvision" not in pins and "onnxruntime" in pins


def test_a_pyproject_change_is_reported_as_drift(tmp_path):
    changed = (
        (ROOT / "pyproject.toml")
        .read_text()
        .replace('cpu = ["onnxruntime==1.31.1"]', 'cpu = ["onnxruntime==1.30.0"]')
    )
    assert changed != (ROOT / "pyproject.toml").read_text()
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(changed)
    problems = bento_requirements.check("cpu", IMAGES["cpu"], pyproject)
    assert any("run scripts/bento_requirements.py" in p for p in problems)
    assert any("onnxruntime==1.31.1 does not satisfy onnxruntime==1.30.0" in p for p in problems)
