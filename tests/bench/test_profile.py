"""Reading py-spy's raw samples into areas of the server, and wrk's summary."""

from __future__ import annotations

import pytest

from bench.profile import OTHER, parse_wrk, summarize_raw

ROOT = "<module> (service/__main__.py:9);run (uvicorn/main.py:600);Runner.run (asyncio/runners.py:118)"


def test_each_sample_goes_to_the_innermost_area_it_touched() -> None:
    raw = "\n".join(
        [
            f"{ROOT};infer (service/routes/inference.py:80);Batcher.submit (service/batcher.py:160) 30",
            f"{ROOT};_execute (service/batcher.py:270);Runtime.run (service/runtime.py:125);"
            "Session.run (onnxruntime/capi/onnxruntime_inference_collection.py:220) 50",
            f"{ROOT};data_received (uvicorn/protocols/http/httptools_impl.py:120) 15",
            f"{ROOT} 5",  # the loop itself: uvicorn's start-up frames below it are not HTTP work
            "garbage line",
        ]
    )
    summary = summarize_raw(raw)
    assert summary["samples"] == 100
    assert summary["areas"] == {"onnxruntime": 50.0, "batching": 30.0, "HTTP (uvicorn, httptools)": 15.0, OTHER: 5.0}
    assert summary["own"][0] == ["Session.run (onnxruntime/capi/onnxruntime_inference_collection.py)", 50.0]


def test_wrk_output_is_read_with_its_units() -> None:
    out = """Running 8s test @ http://127.0.0.1:8000/
  Latency Distribution
     50%  412.00us
     99%    1.20ms
  48000 requests in 8.00s, 10.00MB read
  Non-2xx or 3xx responses: 3
Requests/sec:   6000.50
"""
    assert parse_wrk(out) == {"p50_ms": pytest.approx(0.412), "p99_ms": 1.2, "non_2xx": 3, "throughput": 6000.5}
    with pytest.raises(ValueError, match="no Requests/sec"):
        parse_wrk("unable to connect to 127.0.0.1:8000 Connection refused")
