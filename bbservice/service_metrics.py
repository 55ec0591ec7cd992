"""The project's Prometheus metrics, shown on BentoML's ``/metrics`` next to its own.

BentoML 1.4 serves every ``prometheus_client`` metric of a worker on ``/metrics`` (its
``bentoml.metrics`` module is a deprecated alias of ``prometheus_client``). Workers run
prometheus_client in multiprocess mode, which it picks at import from
``PROMETHEUS_MULTIPROC_DIR``; BentoML sets that variable *after* the service module is
imported, so the metrics here are created on first use (:func:`service_metrics`, from the
service's ``__init__`` or a request), never at import.

Metrics (label ``kind``: ``music`` | ``caption``)::

    bbservice_batch_size              histogram  requests merged into one model call
    bbservice_decode_steps            histogram  model steps of one decode (caption words, frames)
    bbservice_queue_depth             gauge      requests waiting for a model slot
    bbservice_stochastic_queue_depth  gauge      requests waiting for the PyTorch path
    bbservice_model_load_failures     counter    models that failed to load or warm up

Gauges add up over workers (``multiprocess_mode="livesum"``). Every series starts at zero
for both kinds; the batch size is recorded for captions only (music requests are not merged).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

__all__ = ["KINDS", "METRIC_NAMES", "ServiceMetrics", "service_metrics"]

KINDS = ("music", "caption")
PREFIX = "bbservice"
METRIC_NAMES = (
    f"{PREFIX}_batch_size",
    f"{PREFIX}_decode_steps",
    f"{PREFIX}_queue_depth",
    f"{PREFIX}_stochastic_queue_depth",
    f"{PREFIX}_model_load_failures",
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
STEP_BUCKETS = (1, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


@dataclass
class ServiceMetrics:
    """The metric objects and the few calls the service makes on them."""

    batch_size: Any
    decode_steps: Any
    queue_depth: Any
    stochastic_queue_depth: Any
    load_failures: Any

    def observe_batch(self, kind: str, size: int) -> None:
        """One model call served ``size`` requests together."""
        self.batch_size.labels(kind=_kind(kind)).observe(int(size))

    def observe_decode_steps(self, kind: str, steps: int) -> None:
        """One decode ran ``steps`` model steps (caption words, music frames)."""
        self.decode_steps.labels(kind=_kind(kind)).observe(int(steps))

    def set_queue_depth(self, kind: str, depth: int) -> None:
        self.queue_depth.labels(kind=_kind(kind)).set(int(depth))

    def set_stochastic_queue_depth(self, kind: str, depth: int) -> None:
        self.stochastic_queue_depth.labels(kind=_kind(kind)).set(int(depth))

    def load_failed(self, kind: str) -> None:
        """A model failed to load or warm up."""
        self.load_failures.labels(kind=_kind(kind)).inc()

    def zero(self) -> None:
        """Create every series of every kind at zero, so that ``/metrics`` lists them all from
        the start (multiprocess mode shows only series that exist)."""
        for metric in (
            self.batch_size,
            self.decode_steps,
            self.queue_depth,
            self.stochastic_queue_depth,
            self.load_failures,
        ):
            for kind in KINDS:
                metric.labels(kind=kind)


def _kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    return kind


_LOCK = threading.Lock()
_METRICS: ServiceMetrics | None = None


def service_metrics(registry: Any = None) -> ServiceMetrics:
    """The process's :class:`ServiceMetrics`, created on the first call (in prometheus_client's
    default registry, which BentoML's ``/metrics`` collects). ``registry`` (tests) creates a
    fresh set in that ``prometheus_client.CollectorRegistry`` instead."""
    global _METRICS
    if registry is not None:
        return _make(registry)
    with _LOCK:
        if _METRICS is None:
            _METRICS = _make(None)
        return _METRICS


def _make(registry: Any) -> ServiceMetrics:
    import prometheus_client as prom  # deferred: see the module docstring

    kw = {} if registry is None else {"registry": registry}
    labels = ["kind"]
    metrics = ServiceMetrics(
        batch_size=prom.Histogram(
            f"{PREFIX}_batch_size",
            "Requests merged into one model call",
            labels,
            buckets=BATCH_BUCKETS,
            **kw,
        ),
        decode_steps=prom.Histogram(
            f"{PREFIX}_decode_steps",
            "Model steps of one decode (caption words, music frames)",
            labels,
            buckets=STEP_BUCKETS,
            **kw,
        ),
        queue_depth=prom.Gauge(
            f"{PREFIX}_queue_depth",
            "Requests waiting for a model slot",
            labels,
            multiprocess_mode="livesum",
            **kw,
        ),
        stochastic_queue_depth=prom.Gauge(
            f"{PREFIX}_stochastic_queue_depth",
            "Requests waiting for the PyTorch sampled-gate path",
            labels,
            multiprocess_mode="livesum",
            **kw,
        ),
        load_failures=prom.Counter(
            f"{PREFIX}_model_load_failures",
            "Models that failed to load or warm up",
            labels,
            **kw,
        ),
    )
    metrics.zero()
    return metrics
