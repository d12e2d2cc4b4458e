"""Prometheus metrics, in a registry of the app's own (so that two apps in one process never collide).

Names follow Triton's where one exists (``nv_inference_request_success`` -> ``normserve_request_success_total``).
The batchnorm endpoint has the same families under ``normserve_batchnorm_`` (``Metrics.batchnorm``):
its requests, and the batches of its batch-statistics graph. The running-statistics half of each of
its requests runs on the served graph, so its rows and batches also count in ``normserve_inference_count``,
``normserve_execution_count`` and the queue and batch-size histograms, as the work they are.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric

__all__ = ["Duration", "Metrics", "ModelMetrics", "ModelState", "ModelStates", "Statistics", "observe_all"]

# Worker processes (service.workers): every process's values go to files in this folder, and /metrics reads them all.
MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR" in os.environ
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def observe_all(histogram: Histogram, amounts: list[float]) -> None:
    """``histogram.observe(amount)`` for each of ``amounts`` (one labelled child), in one update of its sum and
    one of each bucket they fall in, where each observation takes a lock for the sum and one for its bucket.
    prometheus_client keeps a histogram's buckets apart (each counts the observations up to its bound and
    above the last: it adds them up when it exposes them); ``observe`` adds one to the first bucket whose
    bound is at least the amount, as ``bisect_left`` finds it."""
    if not amounts:
        return
    histogram._raise_if_not_observable()  # type: ignore[no-untyped-call]
    bounds = histogram._upper_bounds
    counts = [0] * len(bounds)
    for amount in amounts:
        counts[bisect.bisect_left(bounds, amount)] += 1
    histogram._sum.inc(sum(amounts))
    for bucket, count in zip(histogram._buckets, counts, strict=True):
        if count:
            bucket.inc(count)


class Duration:
    """A count and the nanoseconds it took, as Triton's statistics extension reports each."""

    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)

    def document(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


class Statistics:
    """One graph's counts in the shape of Triton's statistics extension (``GET /v2/models/stats``, gRPC
    ModelStatistics), kept as plain integers beside the Prometheus families, over HTTP and gRPC alike.

    As Triton counts them: ``inference_count`` rows and ``execution_count`` batches; ``success`` and
    ``fail`` requests with their time in the server; ``queue`` each request's wait; ``compute_input`` (the
    batch's inputs put together), ``compute_infer`` (onnxruntime) and ``compute_output`` (the outputs handed
    to each request) once per request, each with its batch's time, so the three counts are equal;
    ``batch_stats`` per batch size (rows), once per batch. No response cache: its counts stay 0.
    """

    __slots__ = (
        "batches",
        "compute_infer",
        "compute_input",
        "compute_output",
        "executions",
        "fail",
        "inferences",
        "last_inference_ms",
        "queue",
        "success",
    )

    def __init__(self) -> None:
        self.last_inference_ms = 0
        self.inferences = 0
        self.executions = 0
        self.success, self.fail, self.queue = Duration(), Duration(), Duration()
        self.compute_input, self.compute_infer, self.compute_output = Duration(), Duration(), Duration()
        self.batches: dict[int, tuple[Duration, Duration, Duration]] = {}

    def executed(self, rows: int, requests: int, input_s: float, infer_s: float, output_s: float) -> None:
        self.inferences += rows
        self.executions += 1
        self.last_inference_ms = int(time.time() * 1000)
        self.compute_input.add(input_s * requests, requests)
        self.compute_infer.add(infer_s * requests, requests)
        self.compute_output.add(output_s * requests, requests)
        by_size = self.batches.get(rows)
        if by_size is None:
            by_size = self.batches[rows] = (Duration(), Duration(), Duration())
        for duration, seconds in zip(by_size, (input_s, infer_s, output_s), strict=True):
            duration.add(seconds)

    def document(self, name: str, version: str) -> dict[str, Any]:
        """The entry of ``model_stats`` for the graph, as Triton writes it."""
        zero = {"count": 0, "ns": 0}
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inferences,
            "execution_count": self.executions,
            "inference_stats": {
                "success": self.success.document(),
                "fail": self.fail.document(),
                "queue": self.queue.document(),
                "compute_input": self.compute_input.document(),
                "compute_infer": self.compute_infer.document(),
                "compute_output": self.compute_output.document(),
                "cache_hit": zero,
                "cache_miss": zero,
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": durations[0].document(),
                    "compute_infer": durations[1].document(),
                    "compute_output": durations[2].document(),
                }
                for size, durations in sorted(self.batches.items())
            ],
        }


@dataclass(frozen=True)
class ModelState:
    """One graph of a model version, as ``ModelStates`` reports it: ``graph`` "" for infer's, "batchnorm" for
    the batchnorm endpoint's; ``ready`` False for a version in the repository that failed to load."""

    graph: str
    model: str
    version: str
    ready: bool
    provider: str | None
    queue_limit: int | None


class ModelStates:
    """``normserve_model_ready``, ``normserve_model_provider``, ``normserve_queue_limit`` (and the batchnorm
    endpoint's ``normserve_batchnorm_...``) and ``normserve_gpu_required``, read from the registry at each
    scrape: what is served now, so an unloaded model has no series left behind, and with worker processes
    (whose model control keeps them alike) one worker's states are every worker's."""

    def __init__(self, states: Callable[[], Iterable[ModelState]], require_gpu: bool) -> None:
        self.states, self.require_gpu = states, require_gpu

    def collect(self) -> Iterator[Metric]:
        families: dict[str, tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]] = {}
        for graph in ("", "batchnorm"):
            p = "normserve_batchnorm" if graph else "normserve"
            families[graph] = (
                GaugeMetricFamily(f"{p}_model_ready", "1 when the model version serves", labels=["model", "version"]),
                GaugeMetricFamily(
                    f"{p}_model_provider",
                    "1 for the execution provider each model version really runs on",
                    labels=["model", "version", "provider"],
                ),
                GaugeMetricFamily(
                    f"{p}_queue_limit",
                    "Requests the model version queues before it refuses with 503",
                    labels=["model", "version"],
                ),
            )
        for state in self.states():
            ready, provider, limit = families[state.graph]
            ready.add_metric([state.model, state.version], 1 if state.ready else 0)
            if state.provider is not None:
                provider.add_metric([state.model, state.version, state.provider], 1)
            if state.queue_limit is not None:
                limit.add_metric([state.model, state.version], state.queue_limit)
        for family in families.values():
            yield from family
        yield GaugeMetricFamily(
            "normserve_gpu_required",
            "1 when NORMSERVE_REQUIRE_GPU is set: a model on CPU keeps it not ready",
            value=1 if self.require_gpu else 0,
        )


class Metrics:
    """Every metric family, in ``registry`` (a new one by default), named ``<prefix>_...``.

    The main set (prefix ``normserve``) also creates ``batchnorm``: the same families for the
    batchnorm endpoint, in the same registry.
    """

    def __init__(self, registry: CollectorRegistry | None = None, prefix: str = "normserve", worker: int = 0) -> None:
        self.registry = r = registry or CollectorRegistry(auto_describe=True)
        self._statistics: dict[tuple[str, str], Statistics] = {}
        # What each version's queues hold, read for its pending gauge (``ModelMetrics.watch_pending``).
        self.pending_sources: dict[tuple[str, str], list[Callable[[], int]]] = {}
        self._states: list[ModelStates] = []
        p = prefix
        what = "Inference" if p == "normserve" else "Batchnorm endpoint"
        model = ["model", "version"]
        # Requests are counted by the protocol they came over: http or grpc.
        by_protocol = [*model, "protocol"]
        self.request_success = Counter(
            f"{p}_request_success", f"{what} requests answered with 200 (gRPC: OK)", by_protocol, registry=r
        )
        self.request_failure = Counter(
            f"{p}_request_failure",
            f"{what} requests answered with an error, by reason (invalid_input, not_found, too_large, "
            "unsupported_media_type, not_ready, overloaded, deadline, disconnected, internal)",
            [*by_protocol, "reason"],
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
            by_protocol,
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
        # With worker processes (prometheus_client's multiprocess mode), the workers' values add up.
        self.pending = Gauge(
            f"{p}_pending_requests", "Requests queued, not yet running", model, registry=r, multiprocess_mode="livesum"
        )
        self.held_connections = Gauge(
            f"{p}_held_connections",
            "Keep-alive connections read no further until the model version answers more (service/intake.py): "
            "what their clients send waits unparsed",
            model,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.batchnorm: Metrics | None = None
        if p == "normserve":
            self.batchnorm = Metrics(r, "normserve_batchnorm")
            # Per worker process (NORMSERVE_WORKERS): whether the kernel spreads the load, and which worker
            # is stuck. Counted per batch, off the per-request path.
            self.worker_inferences = Counter(
                f"{p}_worker_inference_count",
                "Rows inferred by each worker process (one worker: worker 0)",
                ["worker"],
                registry=r,
            ).labels(str(worker))
            self.connections_closed = Counter(
                f"{p}_connections_closed",
                "Connections the server closed on a client, by reason (head_too_large, too_many_headers, "
                "head_timeout, body_timeout, silent, connection_cap); service/transport.py",
                ["reason"],
                registry=r,
            )
            self._closed: dict[str, Counter] = {}

    def exposition(self) -> CollectorRegistry:
        """What ``/metrics`` writes: this registry, or with worker processes every worker's values (their
        files in PROMETHEUS_MULTIPROC_DIR) and this worker's model states (the same in every worker)."""
        if not MULTIPROCESS:
            return self.registry
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped library
        for collector in self._states:
            registry.register(collector)
        return registry

    def register_states(self, collector: ModelStates) -> None:
        self.registry.register(collector)
        self._states.append(collector)

    def model(self, name: str, version: str) -> ModelMetrics:
        return ModelMetrics(self, name, version)

    def statistics(self, name: str, version: str) -> Statistics:
        """The version's statistics (one per name and version: every ModelMetrics of it shares them)."""
        found = self._statistics.get((name, version))
        if found is None:
            found = self._statistics[(name, version)] = Statistics()
        return found

    def failure(self, name: str, version: str, reason: str, protocol: str = "http") -> None:
        self.request_failure.labels(model=name, version=version, protocol=protocol, reason=reason).inc()

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
        # The children of both protocols, bound once: HTTP's first, as the hot path's.
        self.success = metrics.request_success.labels(name, version, "http")
        self.request_seconds = metrics.request_seconds.labels(name, version, "http")
        self.success_grpc = metrics.request_success.labels(name, version, "grpc")
        self.request_seconds_grpc = metrics.request_seconds.labels(name, version, "grpc")
        self.inferences = metrics.inference_count.labels(name, version)
        self.executions = metrics.execution_count.labels(name, version)
        self.batch_size = metrics.batch_size.labels(name, version)
        self.queue_seconds = metrics.queue_seconds.labels(name, version)
        self.compute_seconds = metrics.compute_seconds.labels(name, version)
        self.pending = metrics.pending.labels(name, version)
        self.held_connections = metrics.held_connections.labels(name, version)
        self.statistics = metrics.statistics(name, version)
        # infer's rows per worker (the batchnorm endpoint's family has none: its rows count in infer's too)
        self._worker_inferences = getattr(metrics, "worker_inferences", None)
        self._failures: dict[tuple[str, str], Counter] = {}
        # The seconds of the requests answered in this turn of the event loop, by protocol, counted at the next
        # turn (``succeeded``); whether that count is due.
        self._answered: dict[str, list[float]] = {"http": [], "grpc": []}
        self._count_due = False

    def forget(self) -> None:
        """The version stopped serving (unloaded, or gone from the repository): its gauges leave /metrics.
        With worker processes a series cannot be removed (prometheus_client's multiprocess mode): it stays, at
        0, its requests all answered."""
        if MULTIPROCESS:
            return
        for gauge in (self._metrics.pending, self._metrics.held_connections):
            with contextlib.suppress(KeyError):  # never bound
                gauge.remove(self.name, self.version)

    def watch_pending(self, pending: Callable[[], int]) -> Callable[[], None] | None:
        """Count ``pending`` (what one queue of this version holds) in the version's pending gauge, with its
        other queues (the batchnorm endpoint's has one of its own): the sum read at scrape time in one process,
        at no cost to the hot path. With worker processes, the callable returned sets the gauge, to be called
        each time the queue changes (as ``watch_held``). ``unwatch_pending`` once the queue is gone."""
        self._metrics.pending_sources.setdefault((self.name, self.version), []).append(pending)
        if not MULTIPROCESS:
            self.pending.set_function(self._pending_now)
            return None
        return lambda: self.pending.set(self._pending_now())

    def unwatch_pending(self, pending: Callable[[], int]) -> None:
        sources = self._metrics.pending_sources.get((self.name, self.version), [])
        if pending in sources:
            sources.remove(pending)
        if MULTIPROCESS:
            self.pending.set(self._pending_now())

    def _pending_now(self) -> int:
        """What the version's queues hold now, together."""
        return sum(source() for source in self._metrics.pending_sources.get((self.name, self.version), ()))

    def watch_held(self, held: Callable[[], int]) -> Callable[[], None] | None:
        """The held-connections gauge from ``held``: read at scrape time in one process, at no cost to the hot
        path. With worker processes a gauge lives in a shared file, which a function read at scrape cannot
        fill: the callable returned sets it, to be called each time the number changes."""
        if not MULTIPROCESS:
            self.held_connections.set_function(held)
            return None
        return lambda: self.held_connections.set(held())

    def executed(self, rows: int, requests: int, input_s: float, infer_s: float, output_s: float) -> None:
        """One batch of ``rows`` rows from ``requests`` requests: the seconds it took to put its inputs
        together, to run, and to hand each request its outputs."""
        self.inferences.inc(rows)
        if self._worker_inferences is not None:
            self._worker_inferences.inc(rows)
        self.executions.inc()
        self.batch_size.observe(rows)
        self.compute_seconds.observe(input_s + infer_s)
        self.statistics.executed(rows, requests, input_s, infer_s, output_s)

    def queued_all(self, seconds: list[float]) -> None:
        """The requests of one batch, taken into it after ``seconds`` each in the queue: one observation each
        in the queue histogram and the statistics, in one update of each count."""
        observe_all(self.queue_seconds, seconds)
        self.statistics.queue.add(sum(seconds), len(seconds))

    def failure(self, reason: str, protocol: str = "http") -> None:
        child = self._failures.get((reason, protocol))
        if child is None:  # a label lookup costs microseconds: under overload, refusals come by the thousand
            child = self._failures[(reason, protocol)] = self._metrics.request_failure.labels(
                model=self.name, version=self.version, protocol=protocol, reason=reason
            )
        child.inc()
        self.statistics.fail.add(0.0)

    def succeeded(self, started: float, protocol: str = "http") -> None:
        """One request answered with 200 (gRPC: OK); ``started`` is its ``time.perf_counter()`` on arrival.

        Counted with the others answered in the same turn of the event loop (a batch's answers go out in one)
        at the start of the next, once for them all (``observe_all``): before anything the loop reads after
        them, a scrape of /metrics or the statistics included, is served. Outside a running loop, at once."""
        self._answered[protocol].append(perf_counter() - started)
        if not self._count_due:
            try:
                asyncio.get_running_loop().call_soon(self.count_answered)
            except RuntimeError:  # no loop runs: nothing would count them later
                self.count_answered()
                return
            self._count_due = True

    def count_answered(self) -> None:
        """Count the requests ``succeeded`` has been told of since the last count."""
        self._count_due = False
        for protocol, success, histogram in (
            ("http", self.success, self.request_seconds),
            ("grpc", self.success_grpc, self.request_seconds_grpc),
        ):
            if answered := self._answered[protocol]:
                self._answered[protocol] = []
                success.inc(len(answered))
                observe_all(histogram, answered)
                self.statistics.success.add(sum(answered), len(answered))
