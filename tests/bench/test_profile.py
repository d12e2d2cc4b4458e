"""Reading py-spy's raw samples into stages of a request's way through the server, and wrk's summary."""

from __future__ import annotations

import pytest

from bench.profile import OTHER, parse_wrk, summarize_raw

ROOT = "<module> (service/__main__.py:9);run (uvicorn/main.py:600);Runner.run (asyncio/runners.py:118)"


def test_each_sample_goes_to_the_innermost_stage_it_touched() -> None:
    submit = (
        f"{ROOT};AnsweredHere._submit (service/transport.py:230);InferenceCall.submit (service/routes/inference.py:340)"
    )
    raw = "\n".join(
        [
            f"{submit};Batcher.enqueue (service/batcher.py:190) 20",
            f"{submit};Batcher.enqueue (service/batcher.py:200);MutexValue.inc (prometheus_client/values.py:27) 4",
            f"{submit};parse_infer_request (service/protocol.py:207);_split_body (service/protocol.py:96);"
            "_json (service/protocol.py:88) 3",
            f"{submit};parse_infer_request (service/protocol.py:207);check_infer_document (service/protocol.py:250);"
            "_from_json (service/protocol.py:150) 3",
            f"{ROOT};Batcher._work (service/batcher.py:300);Batcher._execute_rows (service/batcher.py:395);"
            "Runtime.run (service/runtime.py:125);"
            "Session.run (onnxruntime/capi/onnxruntime_inference_collection.py:220) 50",
            f"{ROOT};Batcher._work (service/batcher.py:300);Batcher._execute_rows (service/batcher.py:405);"
            "_split (service/batcher.py:450) 2",
            f"{ROOT};LimitedHttpToolsProtocol.data_received (service/transport.py:270) 13",
            f"{ROOT} 5",  # the loop itself: uvicorn's start-up frames below it are not HTTP work
            "garbage line",
        ]
    )
    summary = summarize_raw(raw)
    assert summary["samples"] == 100
    assert summary["stages"] == {
        "onnxruntime": 50.0,
        "admission and queueing": 20.0,
        "HTTP and the transport guard": 13.0,
        "event loop's own work": 5.0,
        "metrics": 4.0,
        "JSON parse": 3.0,
        "tensor build": 3.0,
        "result split": 2.0,
    }
    assert OTHER not in summary["stages"]
    assert summary["own"][0] == ["Session.run (onnxruntime/capi/onnxruntime_inference_collection.py)", 50.0]


def test_the_compiled_request_path_is_read_as_its_source_is() -> None:
    """py-spy --native names a Cython frame "function (module.c:line)", without its class, and puts the
    interpreter's and libc's own frames inside it: each sample goes to the stage of its source."""
    loop = f"{ROOT};run_forever (loop.c:33192);Handle__run (loop.c:70959)"
    received = f"{loop};data_received (transport.c:11596);feed_data (parser.c:6373)"
    raw = "\n".join(
        [
            f"{received};on_headers_complete (transport.c:14557);Py_DECREF (object.h:537) 4",
            f"{received};on_headers_complete (transport.c:14557);__Pyx_PyObject_GetAttrStr (transport.c:26009) 2",
            f"{received};_submit (transport.c:9000);submit (inference.c:2210);enqueue (batcher.c:20656) 3",
            f"{received};_submit (transport.c:9000);submit (inference.c:2210);Batcher_enqueue (batcher.c:20656) 1",
            f"{received};_submit (transport.c:9000);inference_admission (inference.c:2210) 1",
            f"{received};_submit (transport.c:9000);submit (inference.c:2210);_from_json (protocol.c:19800);"
            "PyArray_DiscoverDTypeAndShape_Recursive (numpy/_core/_multiarray_umath.cpython-311-x86_64-linux-gnu.so) 4",
            f"{received};add (transport.c:8800);add (inference.c:2100);malloc (libc.so.6) 1",
            f"{received};add (transport.c:8800);RequestHeaders_from_raw (inference.c:2000) 1",
            f"{loop};_work (batcher.c:15000);batcher__split (batcher.c:16000) 1",
            f"{loop};respond (transport.c:9500);encode_infer_response (protocol.c:21000) 2",
            # asleep, not working: the loop with nothing to do, and an executor's idle worker
            f"{ROOT};run_forever (loop.c:33192);uv_run (core.c:464);uv__io_poll (linux.c:1452);"
            "epoll_pwait (libc.so.6) 40",
            "thread_run (libpython3.11.so.1.0);Thread.run (threading.py:982);_worker (concurrent/futures/thread.py:81);"
            "_queue_SimpleQueue_get (_queuemodule.c:253);PyThread_acquire_lock_timed (libpython3.11.so.1.0);"
            "0x7f942a6aed90 (libc.so.6);0x7f942a6a3f16 (libc.so.6) 60",
        ]
    )
    summary = summarize_raw(raw)
    assert summary["stages"] == {
        "HTTP and the transport guard": 30.0,
        "admission and queueing": 25.0,
        "tensor build": 20.0,
        "body read": 10.0,
        "response encoding and write": 10.0,
        "result split": 5.0,
    }
    # the interpreter's own frames (Py_DECREF), Cython's helpers and numpy's are their caller's in the table
    assert summary["own"][0] == ["on_headers_complete (transport.c)", 30.0]
    assert ["_from_json (protocol.c)", 20.0] in summary["own"]


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
