"""The KServe v2 gRPC service (service/grpc_service.py) through NVIDIA's own client, tritonclient.grpc, against
a real server: the same answers as over HTTP, the same rules, and the status codes gRPC clients expect.

The server and the client share one copy of the protos (tritonclient's generated modules), so both run in
this process. A few requests are built with the generated stub itself, where tritonclient cannot send them
(typed ``contents``, raw contents that do not match the inputs).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from bench.suite.servers import free_port
from repository import ModelConfig, TensorSpec, write_version
from tests.service.conftest import RunningServer, ServeFactory, affine_expected, infer_json, metric, start_service
from tests.service.malformed import GOOD_INPUT, x_input

ROWS = np.array([[1.0, 2.0, 3.0, 4.0], [-0.5, 0.25, 8.0, -3.0], [1e-3, -7.5, 2.5, 100.0]], dtype=np.float32)


@pytest.fixture(scope="module")
def server(module_serve: ServeFactory) -> Iterator[RunningServer]:
    with module_serve(grpc_port=free_port()) as running:
        yield running


def _target(server: RunningServer) -> str:
    return f"127.0.0.1:{server.settings.grpc_port}"


@pytest.fixture
def client(server: RunningServer) -> Iterator[grpcclient.InferenceServerClient]:
    triton = grpcclient.InferenceServerClient(_target(server))
    try:
        yield triton
    finally:
        triton.close()


@pytest.fixture
def stub(server: RunningServer) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(_target(server)) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def affine_input(x: np.ndarray) -> grpcclient.InferInput:
    return grpcclient.InferInput("x", list(x.shape), "FP32").set_data_from_numpy(x)


def httpclient_answer(url: str, model: str, ids: np.ndarray) -> np.ndarray:
    """The INT64 answer over HTTP, as binary data, through tritonclient.http."""
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    try:
        tensor = httpclient.InferInput("ids", list(ids.shape), "INT64").set_data_from_numpy(ids, binary_data=True)
        answer = client.infer(model, [tensor]).as_numpy("next")
    finally:
        client.close()
    assert answer is not None
    return answer


def _error(raised: pytest.ExceptionInfo[InferenceServerException]) -> tuple[str, str]:
    return str(raised.value.status()), str(raised.value.message())


# -- health and metadata --


def test_live_ready_and_model_readiness(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("affine")
    assert client.is_model_ready("affine", model_version="1")
    assert client.is_model_ready("tiny-cnn-bn")
    assert not client.is_model_ready("affine", model_version="2")
    assert not client.is_model_ready("no-such-model")


def test_server_and_model_metadata_match_http(client: grpcclient.InferenceServerClient, server: RunningServer) -> None:
    metadata = client.get_server_metadata(as_json=True)
    http = httpx.get(f"{server.url}/v2").json()
    assert (metadata["name"], metadata["version"], metadata["extensions"]) == (
        http["name"],
        http["version"],
        http["extensions"],
    )
    model = client.get_model_metadata("affine", as_json=True)
    assert model["name"] == "affine" and model["versions"] == ["1"] and model["platform"] == "onnxruntime_onnx"
    # the JSON mapping of proto3 writes int64 as strings
    assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "4"]}]
    assert [(t["name"], t["shape"]) for t in model["outputs"]] == [("y", ["-1", "3"]), ("total", ["-1", "1"])]


def test_model_config_is_tritons_message(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("tiny-cnn-bn").config
    assert config.name == "tiny-cnn-bn"
    assert config.max_batch_size == 16
    assert config.backend == "onnxruntime" and config.platform == "onnxruntime_onnx"
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("input", 11, [1, 8, 8])]  # TYPE_FP32
    assert [(t.name, list(t.dims)) for t in config.output] == [("logits", [10])]
    assert config.dynamic_batching.default_queue_policy.max_queue_size > 0
    assert client.get_model_config("affine", model_version="1").config.max_batch_size == 8


def test_metadata_of_an_unknown_model_is_not_found(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_metadata("no-such-model")
    status, message = _error(raised)
    assert status == "StatusCode.NOT_FOUND" and "no-such-model" in message


def test_health_serves_for_the_server_and_each_model(server: RunningServer) -> None:
    with grpc.insecure_channel(_target(server)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        for service in ("", "inference.GRPCInferenceService", "affine", "tiny-cnn-bn"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == serving
        with pytest.raises(grpc.RpcError) as raised:
            health.Check(health_pb2.HealthCheckRequest(service="no-such-model"))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


# -- inference --


def test_infer_gives_the_http_answer_bit_for_bit(
    client: grpcclient.InferenceServerClient, server: RunningServer
) -> None:
    result = client.infer("affine", [affine_input(ROWS)], request_id="grpc-1")
    http = httpx.post(f"{server.url}/v2/models/affine/infer", json=infer_json("x", ROWS)).json()
    for output in http["outputs"]:
        got = result.as_numpy(output["name"])
        assert got is not None and got.dtype == np.float32 and list(got.shape) == output["shape"]
        # JSON writes each float32 in its shortest form: read back as float32, the very same numbers
        np.testing.assert_array_equal(got.ravel(), np.asarray(output["data"], dtype=np.float32))
    y, total = affine_expected(ROWS)
    np.testing.assert_allclose(result.as_numpy("y"), y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("total"), total, rtol=1e-6, atol=1e-5)
    response = result.get_response()
    assert response.id == "grpc-1" and response.model_name == "affine" and response.model_version == "1"


def test_only_the_requested_outputs_come_back_in_their_order(client: grpcclient.InferenceServerClient) -> None:
    outputs = [grpcclient.InferRequestedOutput("total"), grpcclient.InferRequestedOutput("y")]
    result = client.infer("affine", [affine_input(ROWS)], outputs=outputs)
    assert [o.name for o in result.get_response().outputs] == ["total", "y"]
    np.testing.assert_allclose(result.as_numpy("total"), affine_expected(ROWS)[1], rtol=1e-6, atol=1e-5)


def test_a_cnn_batch_and_its_classification(client: grpcclient.InferenceServerClient, server: RunningServer) -> None:
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    inputs = [grpcclient.InferInput("input", list(x.shape), "FP32").set_data_from_numpy(x)]
    logits = client.infer("tiny-cnn-bn", inputs).as_numpy("logits")
    http = httpx.post(f"{server.url}/v2/models/tiny-cnn-bn/infer", json=infer_json("input", x)).json()
    assert logits is not None
    np.testing.assert_array_equal(logits.ravel(), np.asarray(http["outputs"][0]["data"], dtype=np.float32))
    top = client.infer("tiny-cnn-bn", inputs, outputs=[grpcclient.InferRequestedOutput("logits", class_count=3)])
    classes = top.as_numpy("logits")
    assert classes is not None and classes.shape == (5, 3)
    for row, scores in zip(classes, logits, strict=True):
        best = np.argsort(-scores, kind="stable")[:3]
        assert [int(c.decode().split(":")[1]) for c in row] == best.tolist()


def test_typed_contents_give_the_raw_answer(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=list(ROWS.shape))
    tensor.contents.fp32_contents.extend(ROWS.ravel().tolist())
    response = stub.ModelInfer(pb.ModelInferRequest(model_name="affine", inputs=[tensor]))
    assert [o.name for o in response.outputs] == ["y", "total"]
    y = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(list(response.outputs[0].shape))
    np.testing.assert_allclose(y, affine_expected(ROWS)[0], rtol=1e-6, atol=1e-6)


def test_http_and_grpc_callers_at_once_each_get_their_own_rows(server: RunningServer) -> None:
    """Many requests over both protocols at once, to a model that batches: each caller gets its own rows."""
    import concurrent.futures

    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((1 + i % 3, 4)).astype(np.float32) for i in range(24)]

    def over_grpc(x: np.ndarray) -> np.ndarray:
        with grpcclient.InferenceServerClient(_target(server)) as triton:
            out = triton.infer("affine", [affine_input(x)]).as_numpy("y")
            assert out is not None
            return out

    def over_http(x: np.ndarray) -> np.ndarray:
        body = httpx.post(f"{server.url}/v2/models/affine/infer", json=infer_json("x", x)).json()
        return np.asarray(body["outputs"][0]["data"], dtype=np.float32).reshape(x.shape[0], 3)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(over_grpc if i % 2 else over_http, x) for i, x in enumerate(batches)]
        for x, future in zip(batches, futures, strict=True):
            np.testing.assert_allclose(future.result(), affine_expected(x)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_a_compressed_request_is_answered(client: grpcclient.InferenceServerClient, algorithm: str) -> None:
    result = client.infer("affine", [affine_input(ROWS)], compression_algorithm=algorithm)
    np.testing.assert_allclose(result.as_numpy("y"), affine_expected(ROWS)[0], rtol=1e-6, atol=1e-6)


# -- errors: the HTTP message, with gRPC's status code --


def test_bad_inputs_get_invalid_argument_with_the_http_message(
    client: grpcclient.InferenceServerClient, server: RunningServer
) -> None:
    wrong_type = ROWS.astype(np.float64)
    with pytest.raises(InferenceServerException) as raised:
        client.infer("affine", [grpcclient.InferInput("x", [3, 4], "FP64").set_data_from_numpy(wrong_type)])
    http = httpx.post(f"{server.url}/v2/models/affine/infer", json=infer_json("x", wrong_type, datatype="FP64"))
    assert http.status_code == 400
    assert _error(raised) == ("StatusCode.INVALID_ARGUMENT", http.json()["error"])

    too_many = np.zeros((9, 4), dtype=np.float32)  # max_batch_size 8
    with pytest.raises(InferenceServerException) as raised:
        client.infer("affine", [affine_input(too_many)])
    http = httpx.post(f"{server.url}/v2/models/affine/infer", json=infer_json("x", too_many))
    assert _error(raised) == ("StatusCode.INVALID_ARGUMENT", http.json()["error"])


def test_an_unknown_model_is_not_found(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as raised:
        client.infer("no-such-model", [affine_input(ROWS)])
    status, message = _error(raised)
    assert status == "StatusCode.NOT_FOUND" and "no-such-model" in message


def test_raw_contents_that_do_not_match_the_inputs_are_refused(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[3, 4])
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(pb.ModelInferRequest(model_name="affine", inputs=[tensor], raw_input_contents=[b"", b""]))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "2 entries for 1 inputs" in str(raised.value.details())
    short = pb.ModelInferRequest(model_name="affine", inputs=[tensor], raw_input_contents=[ROWS.tobytes()[:8]])
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(short)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs 48 bytes" in str(raised.value.details())


def test_a_passed_deadline_is_deadline_exceeded(serve: ServeFactory) -> None:
    # The server holds a batch for a second waiting for more rows, so a call with a deadline of 50 ms cannot be
    # answered in time, however busy the machine: a deadline of 1 µs instead could be answered, on a machine
    # busy enough to starve grpcio's deadline timer (its own thread) while this fast server answers.
    with serve(grpc_port=free_port(), max_queue_delay_ms=1000) as server:
        with grpcclient.InferenceServerClient(_target(server)) as client:
            started = time.monotonic()
            with pytest.raises(InferenceServerException) as raised:
                client.infer("affine", [affine_input(ROWS)], client_timeout=0.05)
            assert str(raised.value.status()) == "StatusCode.DEADLINE_EXCEEDED"
            assert time.monotonic() - started < 0.9  # at its deadline, not when the batch would have run
            # and a call whose deadline leaves the time is answered
            assert client.infer("affine", [affine_input(ROWS)], client_timeout=30).as_numpy("y") is not None


def test_a_message_over_the_limit_is_resource_exhausted(serve: ServeFactory) -> None:
    with serve(grpc_port=free_port(), grpc_max_message_bytes=4096) as small:
        with grpcclient.InferenceServerClient(_target(small)) as triton:
            big = np.zeros((8, 4), dtype=np.float32)
            big_input = grpcclient.InferInput("x", [8, 4], "FP32").set_data_from_numpy(big)
            assert triton.infer("affine", [big_input]).as_numpy("y") is not None  # 128 bytes: within
            x = np.zeros((8, 1, 8, 8), dtype=np.float32)
            x_input = grpcclient.InferInput("input", list(x.shape), "FP32").set_data_from_numpy(x)
            assert triton.infer("tiny-cnn-bn", [x_input]).as_numpy("logits") is not None  # 2 KB
            x = np.zeros((16, 1, 8, 8), dtype=np.float32)  # 4 KB of data and the message around it
            with pytest.raises(InferenceServerException) as raised:
                triton.infer(
                    "tiny-cnn-bn", [grpcclient.InferInput("input", list(x.shape), "FP32").set_data_from_numpy(x)]
                )
            status, message = _error(raised)
            assert status == "StatusCode.RESOURCE_EXHAUSTED" and "4096" in message


# -- access and model control --


def test_the_api_key_guards_inference(serve: ServeFactory) -> None:
    with serve(grpc_port=free_port(), api_key="s3cret-s3cret-s3cret") as keyed:
        with grpcclient.InferenceServerClient(_target(keyed)) as triton:
            assert triton.is_server_live()  # health is open
            with pytest.raises(InferenceServerException) as raised:
                triton.infer("affine", [affine_input(ROWS)])
            status, message = _error(raised)
            assert status == "StatusCode.UNAUTHENTICATED" and "API key" in message
            with pytest.raises(InferenceServerException) as raised:
                triton.infer("affine", [affine_input(ROWS)], headers={"authorization": "Bearer wrong"})
            assert _error(raised)[0] == "StatusCode.UNAUTHENTICATED"
            for headers in ({"authorization": "Bearer s3cret-s3cret-s3cret"}, {"x-api-key": "s3cret-s3cret-s3cret"}):
                assert triton.infer("affine", [affine_input(ROWS)], headers=headers).as_numpy("y") is not None


def test_model_control_is_closed_by_default(client: grpcclient.InferenceServerClient) -> None:
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {(m["name"], m.get("version"), m["state"]) for m in index} >= {("affine", "1", "READY")}
    with pytest.raises(InferenceServerException) as raised:
        client.unload_model("affine")
    status, message = _error(raised)
    assert status == "StatusCode.PERMISSION_DENIED" and "NORMSERVE_MODEL_CONTROL=explicit" in message
    assert client.is_model_ready("affine")


def test_unload_then_load_when_model_control_is_on(serve: ServeFactory) -> None:
    with serve(grpc_port=free_port(), model_control="explicit") as controlled:
        with grpcclient.InferenceServerClient(_target(controlled)) as triton:
            triton.unload_model("affine")
            assert not triton.is_model_ready("affine")
            with pytest.raises(InferenceServerException) as raised:
                triton.infer("affine", [affine_input(ROWS)])
            assert _error(raised)[0] in ("StatusCode.NOT_FOUND", "StatusCode.UNAVAILABLE")
            triton.load_model("affine")
            assert triton.is_model_ready("affine")
            np.testing.assert_allclose(
                triton.infer("affine", [affine_input(ROWS)]).as_numpy("y"),
                affine_expected(ROWS)[0],
                rtol=1e-6,
                atol=1e-6,
            )
            with pytest.raises(InferenceServerException) as raised:
                triton.load_model("no-such-model")
            assert _error(raised)[0] in ("StatusCode.NOT_FOUND", "StatusCode.UNAVAILABLE")


# -- shutdown --


def test_sigterm_turns_health_not_serving_and_loses_no_call_it_accepted(built_repository: Path) -> None:
    """One-row calls queued when SIGTERM comes (a 1.5 s batch delay holds them), and one sent during the drain:
    health and readiness turn NOT_SERVING at once, every accepted call gets its own answer, the process
    exits 0."""
    port = free_port()
    process, url = start_service(
        built_repository, NORMSERVE_GRPC_PORT=str(port), NORMSERVE_MAX_QUEUE_DELAY_MS="1500", NORMSERVE_DRAIN_S="1"
    )
    target = f"127.0.0.1:{port}"
    results: dict[int, np.ndarray | str] = {}

    def call(i: int) -> None:
        with grpcclient.InferenceServerClient(target) as triton:
            try:
                results[i] = triton.infer("affine", [affine_input(ROWS[:1] + i)], client_timeout=30).as_numpy("y")
            except InferenceServerException as e:
                results[i] = f"{e.status()}: {e.message()}"

    callers = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for thread in callers:
        thread.start()
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        inference = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        deadline = time.monotonic() + 20
        while metric(url, "normserve_pending_requests", model="affine", version="1") < 4:  # all four queued
            assert time.monotonic() < deadline, "the calls were never queued"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service="affine")).status == (
            health_pb2.HealthCheckResponse.NOT_SERVING
        )
        assert not inference.ServerReady(pb.ServerReadyRequest()).ready
    late = threading.Thread(target=call, args=(4,))  # during the drain: still served
    late.start()
    for thread in [*callers, late]:
        thread.join(timeout=30)
    _, log = process.communicate(timeout=40)
    assert process.returncode == 0, log
    for i in range(5):
        got = results.get(i)
        assert isinstance(got, np.ndarray), f"call {i}: {got}"
        np.testing.assert_allclose(got, affine_expected(ROWS[:1] + i)[0], rtol=1e-6, atol=1e-5)
    assert "Traceback" not in log


def test_connections_past_their_age_are_replaced_and_no_call_fails(serve: ServeFactory) -> None:
    """NORMSERVE_GRPC_MAX_CONNECTION_AGE_S: the server closes a client's connection once it is that old, the
    client reconnects (from another local port: a Service could send it to another replica), and the calls
    made across the change all succeed."""
    port = free_port()
    with (
        serve(grpc_port=port, grpc_max_connection_age_s=0.3),
        grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as triton,
    ):
        local_ports, answers = set(), 0
        until = time.monotonic() + 2.0
        while time.monotonic() < until:
            y = triton.infer("affine", [affine_input(ROWS)]).as_numpy("y")
            np.testing.assert_allclose(y, affine_expected(ROWS)[0], rtol=1e-6, atol=1e-6)
            answers += 1
            local_ports |= {
                c.laddr.port
                for c in psutil.net_connections("tcp")
                if c.raddr and c.raddr.port == port and c.pid == os.getpid()
            }
            time.sleep(0.02)
    assert answers > 20
    assert len(local_ports) >= 3, f"the client kept {local_ports} over 2 s at a 0.3 s maximum age"


# -- other datatypes and sizes --


def _repository_with_int64_and_large_inputs(root: Path) -> None:
    """A model of INT64 tensors (ids + 1), and one whose rows are 4 MiB of FP32 (their sums, per line)."""
    one = numpy_helper.from_array(np.array(1, dtype=np.int64), "one")
    counter = helper.make_graph(
        [helper.make_node("Add", ["ids", "one"], ["next"])],
        "counter",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3])],
        [helper.make_tensor_value_info("next", TensorProto.INT64, ["N", 3])],
        [one],
    )
    axes = numpy_helper.from_array(np.array([2], dtype=np.int64), "axes")
    big = helper.make_graph(
        [helper.make_node("ReduceSum", ["image", "axes"], ["sums"], keepdims=0)],
        "big",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1024, 1024])],
        [helper.make_tensor_value_info("sums", TensorProto.FLOAT, ["N", 1024])],
        [axes],
    )
    for graph, inputs, outputs in (
        (
            counter,
            [TensorSpec(name="ids", datatype="INT64", shape=[-1, 3])],
            [TensorSpec(name="next", datatype="INT64", shape=[-1, 3])],
        ),
        (
            big,
            [TensorSpec(name="image", datatype="FP32", shape=[-1, 1024, 1024])],
            [TensorSpec(name="sums", datatype="FP32", shape=[-1, 1024])],
        ),
    ):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
        config = ModelConfig(name=graph.name, max_batch_size=8, inputs=inputs, outputs=outputs)
        write_version(root, config, "1", model.SerializeToString(), {"trained": False, "description": "test"})


def test_int64_outputs_and_a_20_mb_raw_request(serve: ServeFactory, tmp_path: Path) -> None:
    _repository_with_int64_and_large_inputs(tmp_path)
    port = free_port()
    with (
        serve(repository=tmp_path, grpc_port=port) as server,
        grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as triton,
    ):
        ids = np.array([[0, 1, 2], [2**62, -5, 7]], dtype=np.int64)  # past what a float64 holds exactly
        got = triton.infer("counter", [grpcclient.InferInput("ids", [2, 3], "INT64").set_data_from_numpy(ids)])
        answer = got.as_numpy("next")
        assert answer is not None and answer.dtype == np.int64
        np.testing.assert_array_equal(answer, ids + 1)
        over_http = httpclient_answer(server.url, "counter", ids)
        assert over_http.tobytes() == answer.tobytes()  # binary-equal over both protocols

        image = np.random.default_rng(0).random((5, 1024, 1024), dtype=np.float32)  # 20 MiB, past grpcio's 4 MiB
        sums = triton.infer(
            "big", [grpcclient.InferInput("image", list(image.shape), "FP32").set_data_from_numpy(image)]
        )
        np.testing.assert_allclose(sums.as_numpy("sums"), image.sum(axis=2), rtol=1e-4)


def _request(
    *tensors: pb.ModelInferRequest.InferInputTensor, raw: list[bytes] | None = None, **fields: Any
) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name="affine", inputs=list(tensors), raw_input_contents=raw or [], **fields)


def _x(
    shape: list[int], datatype: str = "FP32", name: str = "x", values: list[float] | None = None
) -> pb.ModelInferRequest.InferInputTensor:
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    if values is not None:
        tensor.contents.fp32_contents.extend(values)
    return tensor


FOUR = [1.0, 2.0, 3.0, 4.0]
# gRPC requests with the fault of a row of the HTTP bad-input table (tests/service/malformed.py), the JSON
# request that has it over HTTP (None where only gRPC can send it), and what the message must hold.
GRPC_CASES: list[tuple[str, pb.ModelInferRequest, dict[str, Any] | None, list[str]]] = [
    (
        "shape with 5 columns",
        _request(_x([1, 5], values=[0.0] * 5)),
        x_input(shape=[1, 5], data=[0] * 5).body,
        ["expected [-1, 4]"],
    ),
    ("datatype FP64", _request(_x([1, 4], "FP64"), raw=[b"\0" * 32]), None, ["'FP64'", "expected FP32"]),
    (
        "unknown input name",
        _request(_x([1, 4], name="input", values=FOUR)),
        x_input(name="input").body,
        ["no input 'input'"],
    ),
    ("no inputs", _request(), {"inputs": []}, ["'inputs' is []", "x (FP32 [-1, 4])"]),
    (
        "input given twice",
        _request(_x([1, 4], values=FOUR), _x([1, 4], values=FOUR)),
        {"inputs": [GOOD_INPUT, GOOD_INPUT]},
        ["given twice"],
    ),
    (
        "too few values",
        _request(_x([1, 4], values=[1.0, 2.0, 3.0])),
        x_input(data=[1, 2, 3]).body,
        ["has 3 values", "needs 4"],
    ),
    ("zero rows", _request(_x([0, 4], values=[])), x_input(shape=[0, 4], data=[]).body, ["has 0 rows", "at least 1"]),
    (
        "9 rows, over max batch 8",
        _request(_x([9, 4], values=[0.0] * 36)),
        infer_json("x", np.ones((9, 4), np.float32)),
        ["max batch size of 8"],
    ),
    (
        "unknown output",
        _request(_x([1, 4], values=FOUR), outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="z")]),
        {"inputs": [GOOD_INPUT], "outputs": [{"name": "z"}]},
        ["no output 'z'"],
    ),
    (
        "NaN in raw contents",
        _request(_x([1, 4]), raw=[np.array([0, np.nan, 1, 2], np.float32).tobytes()]),
        None,
        ["1 NaN or Infinity value(s)", "flat index 1"],
    ),
    (
        "NaN in typed contents",
        _request(_x([1, 4], values=[0.0, float("nan"), 1.0, 2.0])),
        None,
        ["NaN or Infinity", "finite numbers"],
    ),
    ("raw contents 12 bytes", _request(_x([1, 4]), raw=[b"\0" * 12]), None, ["FP32 needs 16 bytes"]),
    (
        "negative timeout",
        _request(_x([1, 4], values=FOUR), parameters={"timeout": pb.InferParameter(int64_param=-1)}),
        {"inputs": [GOOD_INPUT], "parameters": {"timeout": -1}},
        ["'timeout' is -1", "positive number of microseconds"],
    ),
]


@pytest.mark.parametrize(
    ("description", "request_", "over_http", "fragments"), GRPC_CASES, ids=[c[0] for c in GRPC_CASES]
)
def test_a_bad_input_is_invalid_argument_with_the_http_message(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
    server: RunningServer,
    description: str,
    request_: pb.ModelInferRequest,
    over_http: dict[str, Any] | None,
    fragments: list[str],
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(request_)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, description
    message = str(raised.value.details())
    for fragment in fragments:
        assert fragment in message, f"{description}: {message}"
    if over_http is not None:
        http = httpx.post(f"{server.url}/v2/models/affine/infer", json=over_http)
        assert http.status_code == 400 and http.json()["error"] == message
    answered = stub.ModelInfer(_request(_x([1, 4], values=FOUR)))  # and the server goes on answering
    assert np.frombuffer(answered.raw_output_contents[0], np.float32).shape == (3,)


def test_an_http_and_a_grpc_request_share_one_batch_and_each_gets_its_rows(serve: ServeFactory) -> None:
    """A 1 s batch delay holds the first request until the second comes (both clients connected first): one
    batch of both, over both protocols, and each caller gets exactly its own rows back."""
    port = free_port()
    with (
        serve(grpc_port=port, max_queue_delay_ms=1000) as server,
        grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as triton,
        httpx.Client() as client,
    ):
        assert triton.is_server_ready() and client.get(f"{server.url}/v2/health/ready").status_code == 200
        over_http_x, over_grpc_x = ROWS[:2], ROWS[2:] * 3
        answers: dict[str, np.ndarray] = {}

        def over_http() -> None:
            body = client.post(f"{server.url}/v2/models/affine/infer", json=infer_json("x", over_http_x)).json()
            answers["http"] = np.asarray(body["outputs"][0]["data"], dtype=np.float32).reshape(2, 3)

        def over_grpc() -> None:
            answer = triton.infer("affine", [affine_input(over_grpc_x)]).as_numpy("y")
            assert answer is not None
            answers["grpc"] = answer

        callers = [threading.Thread(target=over_http), threading.Thread(target=over_grpc)]
        for thread in callers:
            thread.start()
        for thread in callers:
            thread.join(timeout=30)
        stats = client.get(f"{server.url}/v2/models/affine/stats").json()["model_stats"][0]
    assert stats["execution_count"] == 1 and stats["inference_count"] == 3  # one batch of 2 + 1 rows
    assert [b["batch_size"] for b in stats["batch_stats"]] == [3]
    np.testing.assert_allclose(answers["http"], affine_expected(over_http_x)[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(answers["grpc"], affine_expected(over_grpc_x)[0], rtol=1e-6, atol=1e-5)


def test_streaming_inference_answers_each_request_by_its_id_and_goes_on_after_an_error(
    client: grpcclient.InferenceServerClient,
) -> None:
    """ModelStreamInfer through tritonclient's stream: every request answered, each named by its id with its
    own rows, and a bad request answered with HTTP's message while the stream goes on."""
    import queue

    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for i in range(6):
            client.async_stream_infer("affine", [affine_input(ROWS + i)], request_id=f"s{i}")
        wrong = grpcclient.InferInput("x", [1, 5], "FP32").set_data_from_numpy(np.zeros((1, 5), np.float32))
        client.async_stream_infer("affine", [wrong], request_id="bad")
        client.async_stream_infer("affine", [affine_input(ROWS + 9)], request_id="s9")
        got = [results.get(timeout=30) for _ in range(8)]
    finally:
        client.stop_stream()
    answered = {result.get_response().id: result for result, error in got if error is None}
    errors = [error for _, error in got if error is not None]
    assert sorted(answered) == sorted([f"s{i}" for i in range(6)] + ["s9"])
    for name, result in answered.items():
        shift = int(name[1:])
        np.testing.assert_allclose(result.as_numpy("y"), affine_expected(ROWS + shift)[0], rtol=1e-6, atol=1e-5)
    assert len(errors) == 1 and "[1, 5]" in str(errors[0].message()) and "expected [-1, 4]" in str(errors[0].message())
