"""Prometheus metrics, in a registry of the app's own (so that two apps in one process never collide).

Names follow Triton's where one exists (``nv_inference_request_success`` -> ``normserve_request_success_total``).
The batchnorm endpoint has the same families under ``normserve_batchnorm_`` (``Metrics.batchnorm``):
its requests, and the batches of its batch-statistics graph. The running-statistics half of each of
its requests runs on the served graph, so its rows and batches also count in ``normserve_inference_count``,
``normserve_execution_count`` and the queue and batch-size histograms, as the work they are.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics", "ModelMetrics"]

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every metric family, in ``registry`` (a new one by default), named ``<prefix>_...``.

    The main set (prefix ``normserve``) also creates ``batchnorm``: the same families for the
    batchnorm endpoint, in the same registry.
    """

    def __init__(self, registry: CollectorRegistry | None = None, prefix: str = "normserve") -> None:
        self.registry = r = registry or CollectorRegistry(auto_describe=True)
        p = prefix
        what = "Inference" if p == "normserve" else "Batchnorm endpoint"
        model = ["model", "version"]
        self.request_success = Counter(f"{p}_request_success", f"{what} requests answered with 200", model, registry=r)
        self.request_failure = Counter(
            f"{p}_request_failure",
            f"{what} requests answered with an error, by reason (invalid_input, not_found, too_large, "
            "unsupported_media_type, not_ready, overloaded, deadline, disconnected, internal)",
            [*model, "reason"],
            registry=r,
        )
        self.inference_count = Counter(
            f"{p}_inference_count", "Rows inferred (a request of n rows counts n)", model, registry=r
        )
        self.execution_count = Counter(f"{p}_execution_count", "Batches run by onnxruntime", model, registry=r)
        self.batch_size = Histogram(f"{p}_batch_size", "Rows per batch run", model, buckets=_BATCH_BUCKETS, registry=r)
        self.request_seconds = Histogram(
            f"{p}_request_duration_seconds",
            "Time from a request's headers to its answer, for requests answered with 200",
            model,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            f"{p}_queue_duration_seconds",
            "Time a request waited in its model's queue",
            model,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            f"{p}_compute_duration_seconds",
            "Time onnxruntime took per batch",
            model,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.pending = Gauge(f"{p}_pending_requests", "Requests queued, not yet running", model, registry=r)
        self.held_connections = Gauge(
            f"{p}_held_connections",
            "Keep-alive connections read no further until the model version answers more (service/intake.py): "
            "what their clients send waits in the kernel",
            model,
            registry=r,
        )
        self.provider = Gauge(
            f"{p}_model_provider",
            "1 for the execution provider each model version really runs on",
            [*model, "provider"],
            registry=r,
        )
        self.model_ready = Gauge(f"{p}_model_ready", "1 when the model version serves", model, registry=r)
        self.queue_limit = Gauge(
            f"{p}_queue_limit", "Requests the model version queues before it refuses with 503", model, registry=r
        )
        self.batchnorm: Metrics | None = None
        if p == "normserve":
            self.gpu_required = Gauge(
                f"{p}_gpu_required",
                "1 when NORMSERVE_REQUIRE_GPU is set: a model on CPU keeps it not ready",
                registry=r,
            )
            self.batchnorm = Metrics(r, "normserve_batchnorm")
            self.connections_closed = Counter(
                f"{p}_connections_closed",
                "Connections the server closed on a client, by reason (head_too_large, too_many_headers, "
                "head_timeout, body_timeout, silent, connection_cap); service/transport.py",
                ["reason"],
                registry=r,
            )
            self._closed: dict[str, Counter] = {}

    def model(self, name: str, version: str) -> ModelMetrics:
        return ModelMetrics(self, name, version)

    def failure(self, name: str, version: str, reason: str) -> None:
        self.request_failure.labels(name, version, reason).inc()

    def connection_closed(self, reason: str) -> None:
        child = self._closed.get(reason)
        if child is None:
            child = self._closed[reason] = self.connections_closed.labels(reason)
        child.inc()


class ModelMetrics:
    """One model version's metric children, bound once so the hot path does no label lookups."""

    def __init__(self, metrics: Metrics, name: str, version: str) -> None:
        self._metrics = metrics
        self.name = name
        self.version = version
        self.success = metrics.request_success.labels(name, version)
        self.request_seconds = metrics.request_seconds.labels(name, version)
        self.inferences = metrics.inference_count.labels(name, version)
        self.executions = metrics.execution_count.labels(name, version)
        self.batch_size = metrics.batch_size.labels(name, version)
        self.queue_seconds = metrics.queue_seconds.labels(name, version)
        self.compute_seconds = metrics.compute_seconds.labels(name, version)
        self.pending = metrics.pending.labels(name, version)
        self.held_connections = metrics.held_connections.labels(name, version)
        self._failures: dict[str, Counter] = {}

    def executed(self, rows: int, seconds: float) -> None:
        self.inferences.inc(rows)
        self.executions.inc()
        self.batch_size.observe(rows)
        self.compute_seconds.observe(seconds)

    def failure(self, reason: str) -> None:
        child = self._failures.get(reason)
        if child is None:  # a label lookup costs microseconds: under overload, refusals come by the thousand
            child = self._failures[reason] = self._metrics.request_failure.labels(self.name, self.version, reason)
        child.inc()

    def succeeded(self, started: float) -> None:
        """One request answered with 200; ``started`` is its ``time.perf_counter()`` on arrival."""
        self.success.inc()
        self.request_seconds.observe(time.perf_counter() - started)
