"""Triton's perf_analyzer, unchanged, against a real server over HTTP and gRPC: it runs, and the requests it
counts agree with the server's own statistics (the extension it reads its server-side figures from)."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from bench.perf_analyzer import binary, run
from bench.suite.servers import free_port
from tests.service.conftest import ServeFactory, start_service

pytestmark = pytest.mark.skipif(
    binary() is None, reason="no perf_analyzer: `make perf-analyzer` installs it (tritonclient 2.41.0's wheel)"
)


def _successes(url: str) -> int:
    stats = httpx.get(f"{url}/v2/models/affine/stats").json()["model_stats"]
    return int(stats[0]["inference_stats"]["success"]["count"])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_runs_and_its_counts_agree_with_the_servers_statistics(
    serve: ServeFactory, protocol: str
) -> None:
    port = free_port()
    with serve(grpc_port=port) as server:
        url = server.host if protocol == "http" else f"127.0.0.1:{port}"
        before = _successes(server.url)
        # Windows of 1 s (2.5 s if those never agree), stable within 50 %: only a stable level has the counts
        # to compare, and a machine busy with other tests keeps windows from agreeing within the default 10 %
        (row,) = run(url, protocol, "affine", [2], interval_ms=1000, timeout_s=120, stability_pct=50)
        assert row["stable"], row
        sent = _successes(server.url) - before
    assert row["Inferences/Second"] > 0 and row["p50 latency"] > 0
    # Over its measurement windows, what it sent and what the server's statistics say it answered agree
    # (a request in flight at a window's edge may fall on either side).
    assert row["client_requests"] > 0
    assert abs(row["client_requests"] - row["server_successes"]) <= max(4, 0.02 * row["client_requests"])
    # and the server answered at least those (perf_analyzer also sends before and between its windows)
    assert sent >= row["client_requests"]
    # its server-side breakdown comes from the statistics extension: compute infer cannot be zero
    assert row["Server Compute Infer"] > 0


def test_the_grpc_floor_answers_zeros_at_once_and_perf_analyzer_measures_it(built_repository: Path) -> None:
    """``bench.grpc_floor``, which T8's judgement cites: normserve's gRPC service with ModelInfer answered
    without the model, zeros of the outputs' shapes for the request's rows, and nothing counted as run."""
    port = free_port()
    process, url = start_service(built_repository, module="bench.grpc_floor", NORMSERVE_GRPC_PORT=str(port))
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        x = np.ones((3, 4), np.float32)
        result = client.infer(
            "affine", [grpcclient.InferInput("x", [3, 4], "FP32").set_data_from_numpy(x)], request_id="f1"
        )
        for output in result.get_response().outputs:
            got = result.as_numpy(output.name)
            assert got is not None and got.shape[0] == 3 and not got.any()
        assert result.get_response().id == "f1" and result.get_response().model_version == "1"
        (row,) = run(f"127.0.0.1:{port}", "grpc", "affine", [2], interval_ms=500, timeout_s=120, version="1")
        # Its calls take some 200 µs: on a busy machine the windows may not agree, and then the last
        # window's throughput is what there is to report.
        assert row["Inferences/Second"] > 0 and (row["p50 latency"] > 0 or not row["stable"])
        assert _successes(url) == 0  # answered, never run
    finally:
        process.terminate()
        process.communicate(timeout=30)
