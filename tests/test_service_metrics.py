"""The project metrics: created lazily, updated through the small API, and exposed the way
BentoML's ``/metrics`` collects them (prometheus_client multiprocess mode)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

prom = pytest.importorskip("prometheus_client")

from bbservice.service_metrics import METRIC_NAMES, service_metrics  # noqa: E402


def test_metrics_register_and_appear_in_the_text_exposition():
    registry = prom.CollectorRegistry()
    m = service_metrics(registry)
    m.observe_batch("caption", 3)
    m.observe_decode_steps("caption", 17)
    m.set_queue_depth("music", 4)
    m.set_stochastic_queue_depth("caption", 2)
    m.load_failed("music")
    text = prom.generate_latest(registry).decode()
    for name in METRIC_NAMES:
        assert f"# HELP {name}" in text
    assert 'bbservice_batch_size_bucket{kind="caption",le="4.0"} 1.0' in text
    assert 'bbservice_decode_steps_sum{kind="caption"} 17.0' in text
    assert 'bbservice_queue_depth{kind="music"} 4.0' in text
    assert 'bbservice_stochastic_queue_depth{kind="caption"} 2.0' in text
    assert 'bbservice_model_load_failures_total{kind="music"} 1.0' in text
    # every series exists from the start, at zero
    assert 'bbservice_model_load_failures_total{kind="caption"} 0.0' in text
    assert 'bbservice_batch_size_count{kind="music"} 0.0' in text


def test_unknown_kind_is_refused():
    m = service_metrics(prom.CollectorRegistry())
    with pytest.raises(ValueError, match="unknown model kind"):
        m.observe_batch("video", 1)


def test_import_does_not_import_prometheus_client():
    code = "import sys, bbservice.service_metrics; print('prometheus_client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_bentoml_metrics_endpoint_collects_them_across_processes(tmp_path):
    """What BentoML's /metrics does in a worker: multiprocess mode, set by
    PROMETHEUS_MULTIPROC_DIR before prometheus_client is imported."""
    pytest.importorskip("bentoml")
    code = textwrap.dedent(
        """
        from bbservice.service_metrics import service_metrics
        m = service_metrics()
        assert service_metrics() is m
        m.observe_batch("caption", 8)
        m.set_queue_depth("caption", 5)
        m.load_failed("caption")
        from bentoml._internal.server.metrics.prometheus import PrometheusClient
        print(PrometheusClient(multiproc=True).generate_latest().decode())
        """
    )
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert 'bbservice_batch_size_bucket{kind="caption",le="8.0"} 1.0' in out
    assert 'bbservice_queue_depth{kind="caption"} 5.0' in out
    assert 'bbservice_model_load_failures_total{kind="caption"} 1.0' in out
