"""Resources declared to BentoML and the log level under ``bentoml serve``."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from bbservice.deployment import configure_logging, declares_gpu, service_resources

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def test_gpu_declared_only_when_the_cuda_provider_is_configured():
    assert service_resources("cuda", available_providers=[CPU])["gpu"] == 1
    assert service_resources("auto", available_providers=[CUDA, CPU])["gpu"] == 1
    assert "gpu" not in service_resources("auto", available_providers=[CPU])
    assert "gpu" not in service_resources("cpu", available_providers=[CUDA, CPU])
    assert service_resources("cpu", cpu="4", memory="8Gi") == {"cpu": "4", "memory": "8Gi"}


def test_auto_asks_the_installed_onnxruntime():
    import onnxruntime

    assert declares_gpu("auto") == (CUDA in onnxruntime.get_available_providers())


def test_unknown_device_and_level_are_refused():
    with pytest.raises(ValueError, match="unknown device"):
        service_resources("tpu")
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("LOUD")


@pytest.mark.parametrize("configure", [False, True])
def test_project_info_lines_survive_bentoml_server_logging(configure):
    """BentoML's worker logging drops INFO from other loggers; configure_logging lets ours
    through."""
    pytest.importorskip("bentoml")
    code = textwrap.dedent(
        f"""
        import logging
        from bentoml._internal.log import configure_server_logging
        configure_server_logging()
        from bbservice.deployment import configure_logging
        if {configure}:
            configure_logging()
        logging.getLogger("bbservice.runtime").info("providers PROBE")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert ("providers PROBE" in out.stdout + out.stderr) is configure
