"""Users' own models through HTTP, as tritonclient.http sends them: several inputs and outputs, every datatype
in and out (JSON and binary), a model with no batch dimension, no labels, a broken model beside them, and a
model written into the repository after start-up and loaded without a restart.

The models (tests/service/user_models.py) are built by hand with onnx.helper; every answer is held against
onnxruntime's on the same inputs, from the same model.onnx.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from service.config import Settings
from tests.service.conftest import RunningServer, affine_expected, free_port, infer_json, write_affine
from tests.service.user_models import (
    GRID_CONFIG,
    USER_MODELS,
    dtypes_expected,
    dtypes_inputs,
    grid_expected,
    text_expected,
    text_inputs,
    write_grid,
    write_text,
    write_user_models,
)

GRID_X = np.arange(12, dtype=np.float32).reshape(3, 4) / 2 - 2


@pytest.fixture(scope="module")
def user_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("user-repository")
    write_affine(root)
    return write_user_models(root, broken=True)


@pytest.fixture(scope="module")
def server(user_repository: Path) -> Iterator[RunningServer]:
    """One server for the module's tests that only read from it (each counts metrics as differences)."""
    with RunningServer(Settings(repository=user_repository, port=free_port(), provider="cpu")) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpclient.InferenceServerClient]:
    triton = httpclient.InferenceServerClient(server.host)
    try:
        yield triton
    finally:
        triton.close()


def onnxruntime_answer(root: Path, model: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What onnxruntime itself answers, from the repository's model.onnx."""
    session = ort.InferenceSession(str(root / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))


def triton_inputs(config: dict[str, Any], feeds: dict[str, np.ndarray], binary: bool) -> list[httpclient.InferInput]:
    datatypes = {t["name"]: t["datatype"] for t in config["inputs"]}
    return [
        httpclient.InferInput(name, list(x.shape), datatypes[name]).set_data_from_numpy(x, binary_data=binary)
        for name, x in feeds.items()
    ]


def assert_answers(result: httpclient.InferResult, expected: dict[str, np.ndarray]) -> None:
    """Every output equal to onnxruntime's, in value, datatype and shape."""
    for name, want in expected.items():
        got = result.as_numpy(name)
        assert got is not None, name
        assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, got.shape)
        np.testing.assert_array_equal(got, want, err_msg=name)


# -- the repository as served --


def test_every_user_model_serves_and_the_broken_one_says_why_without_stopping_them(server: RunningServer) -> None:
    ready = httpx.get(f"{server.url}/v2/health/ready")
    assert ready.status_code == 200, ready.text  # every model that loaded is warm
    states = {m["name"]: m for m in ready.json()["models"]}
    assert {name: states[name]["state"] for name in USER_MODELS} == dict.fromkeys(USER_MODELS, "READY")
    broken = states["wrong-dtype"]
    assert broken["state"] == "UNAVAILABLE"
    # The config passes the schema; the graph takes x as INT64: the reason names both.
    assert "model.onnx does not take or give what config.json declares" in broken["reason"]
    assert "input x (INT64 [?, 4]) is declared x (FP32 [-1, 4])" in broken["reason"]
    refused = httpx.post(f"{server.url}/v2/models/wrong-dtype/infer", json=infer_json("x", np.zeros((1, 4))))
    assert refused.status_code == 503 and "declared x (FP32 [-1, 4])" in refused.json()["error"]
    x = np.ones((2, 4), np.float32)
    answer = httpx.post(f"{server.url}/v2/models/affine/infer", json=infer_json("x", x)).json()
    np.testing.assert_array_equal(np.reshape(answer["outputs"][0]["data"], (2, 3)), affine_expected(x)[0])


# -- several inputs and outputs; every datatype --


@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
def test_a_two_input_text_model_answers_as_onnxruntime(
    client: httpclient.InferenceServerClient, user_repository: Path, binary_in: bool, binary_out: bool
) -> None:
    feeds = text_inputs(5)
    expected = onnxruntime_answer(user_repository, "text-cls", feeds)
    np.testing.assert_allclose(expected["logits"], text_expected(feeds)["logits"], rtol=1e-6)
    metadata = client.get_model_metadata("text-cls")
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary_out) for n in ("logits", "tokens")]
    result = client.infer("text-cls", triton_inputs(metadata, feeds, binary_in), outputs=outputs)
    assert_answers(result, expected)
    assert result.as_numpy("tokens").dtype == np.int64 and result.as_numpy("tokens").shape == (5,)


@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
def test_every_datatype_goes_in_and_comes_out_as_onnxruntime_gives_it(
    client: httpclient.InferenceServerClient, user_repository: Path, binary_in: bool, binary_out: bool
) -> None:
    feeds = dtypes_inputs(3, seed=int(binary_in) * 2 + int(binary_out))
    expected = onnxruntime_answer(user_repository, "dtypes", feeds)
    for name, want in dtypes_expected(feeds).items():
        np.testing.assert_array_equal(expected[name], want, err_msg=name)
    metadata = client.get_model_metadata("dtypes")
    assert {t["datatype"] for t in metadata["inputs"] + metadata["outputs"]} == {
        "FP16", "FP64", "INT32", "UINT8", "INT8", "INT16", "BOOL"
    }  # fmt: skip
    outputs = [httpclient.InferRequestedOutput(t["name"], binary_data=binary_out) for t in metadata["outputs"]]
    result = client.infer("dtypes", triton_inputs(metadata, feeds, binary_in), outputs=outputs)
    assert_answers(result, expected)
    datatypes = {o["name"]: o["datatype"] for o in result.get_response()["outputs"]}
    assert datatypes == {t["name"]: t["datatype"] for t in metadata["outputs"]}


def test_bool_is_true_and_false_in_json_and_one_byte_in_binary(server: RunningServer) -> None:
    feeds = dtypes_inputs(2)
    tensors = [
        {"name": n, "datatype": d, "shape": [2, 2], "data": x.tolist()}
        for (n, x), d in zip(feeds.items(), ["FP16", "FP64", "INT32", "UINT8", "INT8", "INT16", "BOOL"], strict=True)
    ]
    url = f"{server.url}/v2/models/dtypes/infer"
    answer = httpx.post(url, json={"inputs": tensors, "outputs": [{"name": "g2"}, {"name": "positive"}]}).json()
    g2 = next(o for o in answer["outputs"] if o["name"] == "g2")
    assert g2["datatype"] == "BOOL" and g2["data"] == (~feeds["g"]).ravel().tolist()  # true/false, not 1/0
    as_ints = httpx.post(url, json={"inputs": tensors[:-1] + [{**tensors[-1], "data": [1, 0, 0, 1]}]})
    assert as_ints.status_code == 400 and "expected BOOL numbers" in as_ints.json()["error"]
    # Binary: one byte per element, 0 or 1; any other byte is refused.
    header = {"inputs": tensors[:-1] + [{**tensors[-1], "parameters": {"binary_data_size": 4}}]}
    del header["inputs"][-1]["data"]
    head = json.dumps(header).encode()
    for blob, status in [(bytes([1, 0, 0, 1]), 200), (bytes([1, 0, 2, 1]), 400)]:
        response = httpx.post(
            url,
            content=head + blob,
            headers={"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"},
        )
        assert response.status_code == status, response.text
    assert "byte 2 at flat index 2" in response.json()["error"] and "0 (false) or 1 (true)" in response.json()["error"]


@pytest.mark.parametrize(
    ("name", "datatype", "value", "fragment"),
    [
        ("a", "FP16", np.float16("nan"), "NaN or Infinity"),
        ("b", "FP64", np.float64("inf"), "NaN or Infinity"),
    ],
)
def test_nan_and_infinity_are_refused_in_fp16_and_fp64_binary_data(
    client: httpclient.InferenceServerClient, name: str, datatype: str, value: np.generic, fragment: str
) -> None:
    feeds = dtypes_inputs(1)
    feeds[name] = np.full((1, 2), value, dtype=feeds[name].dtype)
    with pytest.raises(InferenceServerException) as raised:
        client.infer("dtypes", triton_inputs(client.get_model_metadata("dtypes"), feeds, binary=True))
    assert raised.value.status() == "400"
    assert f"input '{name}'" in str(raised.value.message()) and fragment in str(raised.value.message())


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [("a", 70000.0, "outside FP16's range"), ("d", -1, "outside UINT8's range"), ("e", 128, "outside INT8's range")],
)
def test_json_values_past_a_narrow_datatype_are_refused(
    server: RunningServer, name: str, value: Any, fragment: str
) -> None:
    feeds = dtypes_inputs(1)
    types = dict(zip("abcdefg", ["FP16", "FP64", "INT32", "UINT8", "INT8", "INT16", "BOOL"], strict=True))
    tensors = [{"name": n, "datatype": types[n], "shape": [1, 2], "data": x.tolist()} for n, x in feeds.items()]
    next(t for t in tensors if t["name"] == name)["data"] = [value, value]
    response = httpx.post(f"{server.url}/v2/models/dtypes/infer", json={"inputs": tensors})
    assert response.status_code == 400 and fragment in response.json()["error"]


def test_values_the_model_refuses_are_a_400_for_that_request_alone(
    user_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A token id past the embedding: onnxruntime refuses it (INVALID_ARGUMENT), as Triton answers, with 400;
    the requests batched with it are answered as if it had not been there."""
    settings = Settings(repository=user_repository, port=free_port(), provider="cpu", max_queue_delay_ms=200)
    feeds = [text_inputs(2, seed=s) for s in range(4)]
    feeds[1]["token_ids"][1, 0] = 10  # the embedding has 10 rows
    with (
        RunningServer(settings) as server,
        httpclient.InferenceServerClient(server.host, concurrency=4) as triton,
    ):
        metadata = triton.get_model_metadata("text-cls")
        runs = server.metric("normserve_execution_count_total", model="text-cls", version="1")
        pending = [triton.async_infer("text-cls", triton_inputs(metadata, f, True)) for f in feeds]
        for i, (request, f) in enumerate(zip(pending, feeds, strict=True)):
            if i == 1:
                with pytest.raises(InferenceServerException) as refused:
                    request.get_result()
                assert refused.value.status() == "400"
                assert "the model refused the inputs' values" in str(refused.value.message())
                assert "out of data bounds" in str(refused.value.message())  # onnxruntime's own reason
            else:
                np.testing.assert_allclose(request.get_result().as_numpy("logits"), text_expected(f)["logits"])
        assert server.metric("normserve_execution_count_total", model="text-cls", version="1") - runs >= 3
    assert any("failed a batch of 4 requests" in r.getMessage() for r in caplog.records)  # they were batched


# -- no labels; classification --


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_classification_without_labels_answers_score_and_index_as_triton_does(
    client: httpclient.InferenceServerClient, user_repository: Path, binary: bool
) -> None:
    feeds = text_inputs(4, seed=3)
    logits = onnxruntime_answer(user_repository, "text-cls", feeds)["logits"]
    metadata = client.get_model_metadata("text-cls")
    assert metadata["labels"] == [] and metadata["description"] == "" and metadata["input_description"] == ""
    wanted = [httpclient.InferRequestedOutput("logits", binary_data=binary, class_count=2)]
    top2 = client.infer("text-cls", triton_inputs(metadata, feeds, True), outputs=wanted).as_numpy("logits")
    assert top2 is not None and top2.shape == (4, 2)
    for row, classes in zip(logits, top2, strict=True):
        parsed = [(c.decode() if isinstance(c, bytes) else c).split(":") for c in classes]
        assert all(len(p) == 2 for p in parsed)  # "<score>:<index>": no label to add
        assert [int(i) for _, i in parsed] == list(np.argsort(-row, kind="stable")[:2])


def test_classification_of_an_output_that_is_not_2d_is_a_400(client: httpclient.InferenceServerClient) -> None:
    metadata = client.get_model_metadata("text-cls")
    wanted = [httpclient.InferRequestedOutput("tokens", class_count=1)]
    with pytest.raises(InferenceServerException) as raised:
        client.infer("text-cls", triton_inputs(metadata, text_inputs(1), True), outputs=wanted)
    message = str(raised.value.message())
    assert raised.value.status() == "400"
    assert "output 'tokens' has shape [-1]" in message and "classification needs a 2-D output" in message


# -- no batch dimension --


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_a_model_without_a_batch_dimension_takes_its_exact_shape(
    client: httpclient.InferenceServerClient, user_repository: Path, binary: bool
) -> None:
    given = httpclient.InferInput("x", [3, 4], "FP32").set_data_from_numpy(GRID_X, binary_data=binary)
    result = client.infer("grid", [given], outputs=[httpclient.InferRequestedOutput("y", binary_data=binary)])
    expected = onnxruntime_answer(user_repository, "grid", {"x": GRID_X})
    np.testing.assert_allclose(expected["y"], grid_expected(GRID_X), rtol=1e-6)
    assert_answers(result, expected)


@pytest.mark.parametrize("shape", [[1, 3, 4], [2, 4], [6, 4], [12]])
def test_a_request_of_another_shape_is_refused_naming_the_shape_expected(
    client: httpclient.InferenceServerClient, shape: list[int]
) -> None:
    x = np.zeros(shape, dtype=np.float32)
    with pytest.raises(InferenceServerException) as raised:
        client.infer("grid", [httpclient.InferInput("x", shape, "FP32").set_data_from_numpy(x)])
    message = str(raised.value.message())
    assert raised.value.status() == "400"
    assert f"input 'x' has shape {shape}; expected exactly [3, 4]" in message and "max_batch_size 0" in message


def test_metadata_and_config_of_a_model_without_a_batch_dimension(client: httpclient.InferenceServerClient) -> None:
    assert client.is_model_ready("grid") and client.is_model_ready("grid", model_version="1")
    metadata = client.get_model_metadata("grid")
    assert metadata["max_batch_size"] == 0
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [3, 4]}]
    assert metadata["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [3, 2]}]
    assert metadata["description"] == GRID_CONFIG.description and metadata["norm_layers"] == {}
    assert metadata["batch_statistics"]["available"] is False
    config = client.get_model_config("grid")
    assert config["max_batch_size"] == 0 and "dynamic_batching" not in config  # as Triton writes it
    assert [(t["name"], t["data_type"], list(t["dims"])) for t in config["input"]] == [("x", "TYPE_FP32", [3, 4])]
    assert [(t["name"], t["data_type"], list(t["dims"])) for t in config["output"]] == [("y", "TYPE_FP32", [3, 2])]
    batched = client.get_model_config("text-cls")
    assert batched["max_batch_size"] == 8 and "dynamic_batching" in batched
    assert [list(t["dims"]) for t in batched["input"]] == [[8], [8]]  # the batch dimension is implied
    assert [list(t["dims"]) for t in batched["output"]] == [[3], []]


def test_concurrent_requests_without_a_batch_dimension_each_run_alone(server: RunningServer) -> None:
    labels = {"model": "grid", "version": "1"}
    runs, rows = (server.metric(f"normserve_{m}_count_total", **labels) for m in ("execution", "inference"))
    with httpclient.InferenceServerClient(server.host, concurrency=4) as triton:
        xs = [GRID_X + i for i in range(8)]
        pending = [
            triton.async_infer("grid", [httpclient.InferInput("x", [3, 4], "FP32").set_data_from_numpy(x)]) for x in xs
        ]
        for x, request in zip(xs, pending, strict=True):
            np.testing.assert_allclose(request.get_result().as_numpy("y"), grid_expected(x), rtol=1e-6)
    assert server.metric("normserve_execution_count_total", **labels) - runs == 8  # one run a request
    assert server.metric("normserve_inference_count_total", **labels) - rows == 8  # a request counts 1


def test_batch_size_settings_leave_a_model_without_a_batch_dimension_as_it_is(user_repository: Path) -> None:
    settings = Settings(
        repository=user_repository,
        port=free_port(),
        provider="cpu",
        max_batch_size=2,
        models={"grid": {"max_batch_size": 4, "max_queue_delay_ms": 500}, "text-cls": {"max_batch_size": 3}},
    )
    with RunningServer(settings) as server:
        grid = httpx.get(f"{server.url}/v2/models/grid/config").json()
        assert grid["max_batch_size"] == 0 and "dynamic_batching" not in grid
        assert httpx.get(f"{server.url}/v2/models/dtypes").json()["max_batch_size"] == 2  # the server-wide cap
        assert httpx.get(f"{server.url}/v2/models/text-cls").json()["max_batch_size"] == 3
        response = httpx.post(f"{server.url}/v2/models/grid/infer", json=infer_json("x", GRID_X))
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(np.reshape(response.json()["outputs"][0]["data"], (3, 2)), grid_expected(GRID_X))


# -- explicit model control: a model that did not exist at start-up --


def test_a_model_written_after_start_up_is_loaded_and_a_new_version_swapped_in_with_no_restart(
    tmp_path: Path,
) -> None:
    root = tmp_path / "repository"
    write_affine(root)
    settings = Settings(
        repository=root, port=free_port(), provider="cpu", model_control="explicit", max_queue_delay_ms=2000
    )
    feeds = text_inputs(1, seed=5)
    with (
        RunningServer(settings) as server,
        httpclient.InferenceServerClient(server.host, concurrency=8) as triton,
    ):
        assert not triton.is_model_ready("text-cls")
        write_text(root)  # written into the served repository after start-up
        triton.load_model("text-cls")
        assert triton.is_model_ready("text-cls")
        assert [(r["name"], r.get("version"), r["state"]) for r in triton.get_model_repository_index()] == [
            ("affine", "1", "READY"),
            ("text-cls", "1", "READY"),
        ]
        metadata = triton.get_model_metadata("text-cls")

        # Requests waiting out the 2 s batch delay on version 1 when version 2 is loaded finish on version 1.
        queued = [triton.async_infer("text-cls", triton_inputs(metadata, feeds, True)) for _ in range(3)]
        gevent.sleep(0.5)  # sent, and queued
        write_text(root, version="2", scale=2.0)
        triton.load_model("text-cls")
        for request in queued:
            result = request.get_result()
            assert result.get_response()["model_version"] == "1"
            np.testing.assert_allclose(result.as_numpy("logits"), text_expected(feeds)["logits"], rtol=1e-6)
        newest = triton.infer("text-cls", triton_inputs(metadata, feeds, True))
        assert newest.get_response()["model_version"] == "2"
        np.testing.assert_allclose(newest.as_numpy("logits"), text_expected(feeds, scale=2.0)["logits"], rtol=1e-6)
        assert triton.get_model_metadata("text-cls")["versions"] == ["1", "2"]

        # A model without a batch dimension loads the same way.
        write_grid(root)
        triton.load_model("grid")
        x = httpclient.InferInput("x", [3, 4], "FP32").set_data_from_numpy(GRID_X)
        np.testing.assert_allclose(triton.infer("grid", [x]).as_numpy("y"), grid_expected(GRID_X), rtol=1e-6)
