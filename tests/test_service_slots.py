"""``bbservice.service.slots``: which gate kernels the PyTorch twin of a slot runs.

The service paths of the slots (beams, gate-sampling passes, rolls) are tested through the
HTTP service in ``test_service.py``; this file covers the helpers that need no running service.
"""

from __future__ import annotations

import logging

import pytest

from bbservice import fused
from bbservice.fused import build
from bbservice.service.slots import gate_kernels


def test_cuda_runs_eager_without_building_anything(monkeypatch):
    monkeypatch.setattr(build, "load", lambda: pytest.fail("the C++ kernels are CPU-only"))
    assert gate_kernels("cuda") == "eager"


def test_fused_off_runs_eager(monkeypatch):
    monkeypatch.setattr(fused, "_enabled", False)
    monkeypatch.setattr(build, "load", lambda: pytest.fail("BBSERVICE_FUSED=0 builds nothing"))
    assert gate_kernels("cpu") == "eager"


def test_cpu_builds_the_kernels_at_load_time(monkeypatch):
    calls = []
    monkeypatch.setattr(fused, "_enabled", True)
    monkeypatch.setattr(build, "load", lambda: calls.append(1) or object())
    assert gate_kernels("cpu") == "fused" and calls == [1]


def test_without_a_compiler_the_reason_is_logged(monkeypatch, caplog):
    monkeypatch.setattr(fused, "_enabled", True)
    monkeypatch.setattr(build, "load", lambda: None)
    monkeypatch.setitem(build._state, "why", "no C++ compiler (g++/c++) found")
    with caplog.at_level(logging.WARNING, logger="bbservice.service"):
        assert gate_kernels("cpu") == "eager"
    assert "running eager: no C++ compiler (g++/c++) found" in caplog.text


@pytest.mark.skipif(build.load() is None, reason="no C++ compiler for the kernels")
def test_the_real_kernels_load():
    assert gate_kernels("cpu") == "fused"
