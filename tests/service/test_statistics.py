"""Triton's statistics extension over HTTP and gRPC: the counts after a known sequence of requests, in the
shape tritonclient and perf_analyzer read."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import json_format
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from tritonclient.utils import InferenceServerException

from bench.suite.servers import free_port
from service.metrics import Metrics, observe_all
from tests.service.conftest import ServeFactory, infer_json

ONE = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
THREE = np.arange(12, dtype=np.float32).reshape(3, 4)
DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")


def _affine(stats: dict) -> dict:
    (entry,) = [s for s in stats["model_stats"] if s["name"] == "affine"]
    return entry


def test_counts_after_a_known_sequence_over_both_protocols(serve: ServeFactory) -> None:
    """4 one-row requests over HTTP, 3 over gRPC, one of 3 rows, one refused: each request alone in its
    batch (sent one after another), so every count is known."""
    port = free_port()
    with serve(grpc_port=port) as server, grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as triton:
        for _ in range(4):
            assert httpx.post(f"{server.url}/v2/models/affine/infer", json=infer_json("x", ONE)).status_code == 200
        one = grpcclient.InferInput("x", [1, 4], "FP32").set_data_from_numpy(ONE)
        for _ in range(3):
            triton.infer("affine", [one])
        triton.infer("affine", [grpcclient.InferInput("x", [3, 4], "FP32").set_data_from_numpy(THREE)])
        bad = httpx.post(f"{server.url}/v2/models/affine/infer", json=infer_json("x", ONE, datatype="FP64"))
        assert bad.status_code == 400

        stats = _affine(httpx.get(f"{server.url}/v2/models/affine/stats").json())
        assert (stats["name"], stats["version"]) == ("affine", "1")
        assert stats["inference_count"] == 4 + 3 + 3  # rows
        assert stats["execution_count"] == 8  # batches: one request each
        inference = stats["inference_stats"]
        assert set(inference) == set(DURATIONS)
        assert inference["success"]["count"] == 8 and inference["fail"]["count"] == 1
        assert inference["queue"]["count"] == 8
        for part in ("compute_input", "compute_infer", "compute_output"):
            assert inference[part]["count"] == 8
        assert inference["compute_infer"]["ns"] > 0
        assert inference["success"]["ns"] >= inference["compute_infer"]["ns"]  # a request's time holds its compute
        assert inference["cache_hit"] == inference["cache_miss"] == {"count": 0, "ns": 0}
        by_size = {b["batch_size"]: b for b in stats["batch_stats"]}
        assert sorted(by_size) == [1, 3]
        assert by_size[1]["compute_infer"]["count"] == 7 and by_size[3]["compute_infer"]["count"] == 1
        assert stats["last_inference"] > 1_700_000_000_000  # milliseconds since the epoch

        # gRPC says the same, in Triton's ModelStatistics message
        message = triton.get_inference_statistics("affine", "1")
        from_grpc = json_format.MessageToDict(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        (grpc_entry,) = from_grpc["model_stats"]
        assert int(grpc_entry["inference_count"]) == 10 and int(grpc_entry["execution_count"]) == 8
        assert int(grpc_entry["inference_stats"]["success"]["count"]) == 8
        assert int(grpc_entry["inference_stats"]["fail"]["count"]) == 1

        # and Prometheus has them by protocol
        labels = {"model": "affine", "version": "1"}
        assert server.metric("normserve_request_success_total", **labels, protocol="http") == 4
        assert server.metric("normserve_request_success_total", **labels, protocol="grpc") == 4
        assert server.metric("normserve_request_duration_seconds_count", **labels, protocol="grpc") == 4
        assert server.metric("normserve_request_failure_total", **labels, protocol="http", reason="invalid_input") == 1


def test_every_served_model_is_listed_and_an_unknown_one_is_not_found(serve: ServeFactory) -> None:
    port = free_port()
    with serve(grpc_port=port) as server:
        everything = httpx.get(f"{server.url}/v2/models/stats").json()["model_stats"]
        names = {(s["name"], s["version"]) for s in everything}
        assert {("affine", "1"), ("tiny-cnn-bn", "1")} <= names
        assert ("tiny-cnn-bn/batchnorm", "1") in names  # the batchnorm endpoint's own graph
        assert "statistics" in httpx.get(f"{server.url}/v2").json()["extensions"]
        version = httpx.get(f"{server.url}/v2/models/affine/versions/1/stats").json()["model_stats"]
        assert [(s["name"], s["version"]) for s in version] == [("affine", "1")]
        missing = httpx.get(f"{server.url}/v2/models/no-such-model/stats")
        assert missing.status_code == 404 and "no-such-model" in missing.json()["error"]
        assert httpx.get(f"{server.url}/v2/models/affine/versions/9/stats").status_code == 404
        with grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as triton:
            try:
                triton.get_inference_statistics("no-such-model")
                raise AssertionError("no error for an unknown model")
            except InferenceServerException as e:
                assert str(e.status()) == "StatusCode.NOT_FOUND"


def test_the_batchnorm_endpoints_graph_counts_under_its_own_entry(serve: ServeFactory) -> None:
    with serve() as server:
        x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
        answered = httpx.post(f"{server.url}/v2/models/tiny-cnn-bn/batchnorm", json=infer_json("input", x))
        assert answered.status_code == 200, answered.text
        stats = {s["name"]: s for s in httpx.get(f"{server.url}/v2/models/tiny-cnn-bn/stats").json()["model_stats"]}
        graph = stats["tiny-cnn-bn/batchnorm"]
        assert graph["execution_count"] == 1 and graph["inference_count"] == 4
        assert graph["inference_stats"]["success"]["count"] == 1
        # its running-statistics half runs on the served graph, and counts there, as the work it is
        assert stats["tiny-cnn-bn"]["execution_count"] == 1 and stats["tiny-cnn-bn"]["inference_count"] == 4


def test_tritonclient_http_reads_the_statistics(serve: ServeFactory) -> None:
    with serve() as server:
        client = httpclient.InferenceServerClient(server.host)
        try:
            client.infer("affine", [httpclient.InferInput("x", [1, 4], "FP32").set_data_from_numpy(ONE)])
            stats = client.get_inference_statistics("affine")
        finally:
            client.close()
        (entry,) = stats["model_stats"]
        assert entry["inference_count"] == 1 and entry["inference_stats"]["success"]["count"] == 1


@pytest.mark.parametrize("amounts", [[], [0.0], [0.25, 0.25, 0.5, 1.0, 3.0, 1e-9, 2.5], [0.5] * 64 + [0.125, 100.0]])
def test_a_batchs_observations_at_once_expose_as_each_one_would(amounts: list[float]) -> None:
    # The queue's histogram is updated once per batch (service.metrics.observe_all): /metrics must read as it
    # would have with one observe() per request, at every bucket's edge too. (Binary fractions: their sums
    # are exact in either order.)
    exposed = []
    for at_once in (False, True):
        registry = CollectorRegistry()
        family = Histogram("wait_seconds", "w", ["model"], buckets=(0.25, 0.5, 1.0, 2.5), registry=registry)
        child = family.labels("m")
        if at_once:
            observe_all(child, amounts)
        else:
            for amount in amounts:
                child.observe(amount)
        text = generate_latest(registry).decode()
        exposed.append("\n".join(line for line in text.splitlines() if "_created" not in line))  # when made
    assert exposed[0] == exposed[1]
    assert f'wait_seconds_count{{model="m"}} {float(len(amounts))}' in exposed[1]


@pytest.mark.anyio
async def test_the_requests_a_turn_of_the_loop_answers_are_counted_before_its_next_turn_serves_anything() -> None:
    # A batch's answers go out in one turn of the event loop and are counted once at the start of the next
    # (ModelMetrics.succeeded): whatever the loop serves after them, a scrape included, sees them.
    metrics = Metrics()
    version = metrics.model("m", "1")
    started = time.perf_counter()
    for _ in range(3):
        version.succeeded(started)
    version.succeeded(started, "grpc")
    await asyncio.sleep(0)  # the next turn
    text = generate_latest(metrics.registry).decode()
    assert 'normserve_request_success_total{model="m",protocol="http",version="1"} 3.0' in text
    assert 'normserve_request_success_total{model="m",protocol="grpc",version="1"} 1.0' in text
    assert 'normserve_request_duration_seconds_count{model="m",protocol="http",version="1"} 3.0' in text
    assert version.statistics.success.count == 4


def test_outside_a_running_loop_a_request_answered_is_counted_at_once() -> None:
    metrics = Metrics()
    version = metrics.model("m", "1")
    version.succeeded(time.perf_counter())
    assert 'normserve_request_success_total{model="m",protocol="http",version="1"} 1.0' in (
        generate_latest(metrics.registry).decode()
    )
    assert version.statistics.success.count == 1
