"""NVIDIA's own client, tritonclient.http, against the real server: the protocol as Triton's users speak it.

Every call goes through ``tritonclient.http.InferenceServerClient`` (gevent, geventhttpclient) to a
real uvicorn on a loopback port; nothing here builds a request by hand.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.service.conftest import RunningServer, ServeFactory, affine_expected

ROWS = np.array(
    [[1.0, 2.0, 3.0, 4.0], [-0.5, 0.25, 8.0, -3.0], [0.0, 0.0, 0.0, 0.0], [1e-3, -7.5, 2.5, 100.0]],
    dtype=np.float32,
)


@pytest.fixture(scope="module")
def server(module_serve: ServeFactory) -> Iterator[RunningServer]:
    """One server for the module, whose models a client may load (NORMSERVE_MODEL_CONTROL=explicit). The
    test that unloads a model has a server of its own."""
    with module_serve(model_control="explicit") as running:
        yield running


def _client(server: RunningServer) -> Iterator[httpclient.InferenceServerClient]:
    triton = httpclient.InferenceServerClient(server.host)
    try:
        yield triton
    finally:
        triton.close()


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpclient.InferenceServerClient]:
    yield from _client(server)


@pytest.fixture
def own_client(serve: ServeFactory) -> Iterator[httpclient.InferenceServerClient]:
    """A client of a server of its own, for a test that unloads models."""
    with serve(model_control="explicit") as running:
        yield from _client(running)


def affine_input(x: np.ndarray, binary: bool = True) -> httpclient.InferInput:
    return httpclient.InferInput("x", list(x.shape), "FP32").set_data_from_numpy(x, binary_data=binary)


def assert_affine(result: httpclient.InferResult, x: np.ndarray) -> None:
    y, total = affine_expected(x)
    got_y, got_total = result.as_numpy("y"), result.as_numpy("total")
    assert got_y is not None and got_total is not None
    assert got_y.dtype == np.float32 and got_total.dtype == np.float32
    np.testing.assert_allclose(got_y, y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_total, total, rtol=1e-6, atol=1e-5)


# -- health and metadata --


def test_the_server_is_live_and_ready(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()


def test_model_readiness_by_name_and_version(client: httpclient.InferenceServerClient) -> None:
    assert client.is_model_ready("affine")
    assert client.is_model_ready("affine", model_version="1")
    assert client.is_model_ready("tiny-cnn-bn")
    # tritonclient answers readiness from the status code alone: anything but 200 is "not ready"
    assert not client.is_model_ready("affine", model_version="2")
    assert not client.is_model_ready("no-such-model")


def test_server_metadata_names_the_extensions_clients_rely_on(client: httpclient.InferenceServerClient) -> None:
    metadata = client.get_server_metadata()
    assert metadata["name"] == "normserve"
    assert isinstance(metadata["version"], str) and metadata["version"]
    assert {"binary_tensor_data", "model_repository"} <= set(metadata["extensions"])


@pytest.mark.parametrize("version", ["", "1"])
def test_model_metadata_declares_tensors_as_configured(client: httpclient.InferenceServerClient, version: str) -> None:
    metadata = client.get_model_metadata("affine", model_version=version)
    assert metadata["name"] == "affine"
    assert metadata["versions"] == ["1"]
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert metadata["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "total", "datatype": "FP32", "shape": [-1, 1]},
    ]
    cnn = client.get_model_metadata("tiny-cnn-bn")
    assert [(t["name"], t["datatype"], t["shape"]) for t in cnn["inputs"]] == [("input", "FP32", [-1, 1, 8, 8])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in cnn["outputs"]] == [("logits", "FP32", [-1, 10])]


def test_model_metadata_of_an_unknown_model_is_a_404(client: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_metadata("no-such-model")
    assert raised.value.status() == "404"
    assert "no-such-model" in str(raised.value.message())


def test_model_config_gives_name_and_max_batch_size(client: httpclient.InferenceServerClient) -> None:
    config = client.get_model_config("affine")
    assert config["name"] == "affine"
    assert config["max_batch_size"] == 8
    assert client.get_model_config("tiny-cnn-bn")["max_batch_size"] == 16


def test_model_config_of_one_version(client: httpclient.InferenceServerClient) -> None:
    config = client.get_model_config("affine", model_version="1")
    assert config["name"] == "affine" and config["max_batch_size"] == 8


def test_model_config_uses_tritons_model_config_schema(client: httpclient.InferenceServerClient) -> None:
    config = client.get_model_config("affine")
    assert [(t["name"], t["data_type"], list(t["dims"])) for t in config["input"]] == [("x", "TYPE_FP32", [4])]
    assert [(t["name"], t["data_type"], list(t["dims"])) for t in config["output"]] == [
        ("y", "TYPE_FP32", [3]),
        ("total", "TYPE_FP32", [1]),
    ]


# -- inference --


@pytest.mark.parametrize("binary_inputs", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("outputs", ["json", "binary", "unrequested"], ids=lambda o: f"{o}-out")
def test_infer_gives_the_exact_answer_in_every_encoding(
    client: httpclient.InferenceServerClient, binary_inputs: bool, outputs: str
) -> None:
    requested = (
        None
        if outputs == "unrequested"  # tritonclient then asks for every output, as binary
        else [httpclient.InferRequestedOutput(n, binary_data=outputs == "binary") for n in ("y", "total")]
    )
    result = client.infer("affine", [affine_input(ROWS, binary_inputs)], outputs=requested)
    assert_affine(result, ROWS)
    response = result.get_response()
    assert response["model_name"] == "affine" and response["model_version"] == "1"
    sent_as_binary = {o["name"]: "binary_data_size" in (o.get("parameters") or {}) for o in response["outputs"]}
    assert sent_as_binary == {"y": outputs != "json", "total": outputs != "json"}


def test_only_the_requested_output_comes_back(client: httpclient.InferenceServerClient) -> None:
    for binary in (False, True):
        result = client.infer(
            "affine", [affine_input(ROWS)], outputs=[httpclient.InferRequestedOutput("total", binary_data=binary)]
        )
        assert result.as_numpy("y") is None
        np.testing.assert_allclose(result.as_numpy("total"), affine_expected(ROWS)[1], rtol=1e-6, atol=1e-5)
        assert [o["name"] for o in result.get_response()["outputs"]] == ["total"]


def test_the_request_id_is_echoed(client: httpclient.InferenceServerClient) -> None:
    result = client.infer("affine", [affine_input(ROWS[:1])], request_id="abc")
    assert result.get_response()["id"] == "abc"
    assert "id" not in client.infer("affine", [affine_input(ROWS[:1])]).get_response()


def test_infer_on_a_named_version(client: httpclient.InferenceServerClient) -> None:
    result = client.infer("affine", [affine_input(ROWS)], model_version="1")
    assert_affine(result, ROWS)
    assert result.get_response()["model_version"] == "1"
    with pytest.raises(InferenceServerException) as raised:
        client.infer("affine", [affine_input(ROWS)], model_version="2")
    assert raised.value.status() == "404"
    assert "version '2'" in str(raised.value.message())


def test_a_cnn_batch_gives_the_same_logits_in_binary_and_json(client: httpclient.InferenceServerClient) -> None:
    batch = np.random.default_rng(7).uniform(0.0, 1.0, size=(5, 1, 8, 8)).astype(np.float32)

    def logits(binary: bool) -> np.ndarray:
        given = httpclient.InferInput("input", list(batch.shape), "FP32").set_data_from_numpy(batch, binary_data=binary)
        wanted = [httpclient.InferRequestedOutput("logits", binary_data=binary)]
        out = client.infer("tiny-cnn-bn", [given], outputs=wanted).as_numpy("logits")
        assert out is not None
        return out

    as_binary, as_json = logits(True), logits(False)
    assert as_binary.shape == (5, 10) and as_binary.dtype == np.float32
    assert np.isfinite(as_binary).all()
    assert not np.allclose(as_binary, as_binary[0])  # different digits, different logits
    np.testing.assert_allclose(as_json, as_binary, rtol=1e-6, atol=1e-6)


def text(element: bytes | str) -> str:
    """A BYTES element as tritonclient gives it: bytes from binary data, str from JSON."""
    return element.decode() if isinstance(element, bytes) else element


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_classification_gives_the_top_classes_with_their_labels(
    client: httpclient.InferenceServerClient, binary: bool
) -> None:
    x = np.random.default_rng(3).random((4, 1, 8, 8), dtype=np.float32)
    image = httpclient.InferInput("input", list(x.shape), "FP32").set_data_from_numpy(x)
    logits = client.infer("tiny-cnn-bn", [image]).as_numpy("logits")
    top3 = client.infer(
        "tiny-cnn-bn", [image], outputs=[httpclient.InferRequestedOutput("logits", binary_data=binary, class_count=3)]
    ).as_numpy("logits")
    assert logits is not None and top3 is not None and top3.shape == (4, 3)
    for row, classes in zip(logits, top3, strict=True):
        parsed = [text(c).split(":") for c in classes]
        indices = [int(index) for _, index, _ in parsed]
        assert indices == list(np.argsort(-row, kind="stable")[:3])
        assert [label for _, _, label in parsed] == [str(i) for i in indices]  # the digits' labels are "0".."9"
        np.testing.assert_allclose([float(score) for score, _, _ in parsed], row[indices], rtol=1e-6)


def test_classification_without_labels_and_past_the_class_count(client: httpclient.InferenceServerClient) -> None:
    out = httpclient.InferRequestedOutput("y", binary_data=False, class_count=1)
    (best,) = client.infer("affine", [affine_input(ROWS[:1])], outputs=[out]).as_numpy("y")[0]
    y = affine_expected(ROWS[:1])[0][0]
    assert text(best) == f"{y.max()}:{y.argmax()}"  # "<score>:<index>": affine has no labels
    with pytest.raises(InferenceServerException) as raised:
        client.infer("affine", [affine_input(ROWS)], outputs=[httpclient.InferRequestedOutput("y", class_count=4)])
    assert raised.value.status() == "400" and "1..3" in str(raised.value.message())


def test_a_generous_timeout_is_accepted(client: httpclient.InferenceServerClient) -> None:
    result = client.infer("affine", [affine_input(ROWS)], timeout=30_000_000)  # microseconds: 30 s
    assert_affine(result, ROWS)


def test_concurrent_async_requests_each_get_their_own_rows(server: RunningServer) -> None:
    """async_infer sends on gevent greenlets; the server may batch them, yet each answer is its own."""
    with httpclient.InferenceServerClient(server.host, concurrency=4) as triton:
        batches = [ROWS[i % len(ROWS) :][:2] * (i + 1) for i in range(8)]
        pending = [triton.async_infer("affine", [affine_input(x)], request_id=str(i)) for i, x in enumerate(batches)]
        for i, (request, x) in enumerate(zip(pending, batches, strict=True)):
            result = request.get_result()
            assert result.get_response()["id"] == str(i)
            assert_affine(result, x)


def test_response_compression_request_is_answered(client: httpclient.InferenceServerClient) -> None:
    """Accept-Encoding is a request, not a demand: an uncompressed answer is still read correctly."""
    assert_affine(client.infer("affine", [affine_input(ROWS)], response_compression_algorithm="gzip"), ROWS)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_a_compressed_request_is_accepted(client: httpclient.InferenceServerClient, algorithm: str) -> None:
    assert_affine(client.infer("affine", [affine_input(ROWS)], request_compression_algorithm=algorithm), ROWS)


# -- errors, as the client raises them --


def test_an_unknown_model_raises_404_naming_it(client: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as raised:
        client.infer("no-such-model", [affine_input(ROWS)])
    assert raised.value.status() == "404"
    assert "no-such-model" in str(raised.value.message())


def test_a_wrong_datatype_raises_400_naming_the_expected_one(client: httpclient.InferenceServerClient) -> None:
    wrong = httpclient.InferInput("x", [1, 4], "FP64").set_data_from_numpy(np.ones((1, 4), dtype=np.float64))
    with pytest.raises(InferenceServerException) as raised:
        client.infer("affine", [wrong])
    assert raised.value.status() == "400"
    assert "FP32" in str(raised.value.message())


def test_too_many_rows_raise_400_naming_the_max_batch_size(client: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as raised:
        client.infer("affine", [affine_input(np.zeros((9, 4), dtype=np.float32))])
    assert raised.value.status() == "400"
    message = str(raised.value.message())
    assert "9" in message and "8" in message  # the rows sent and the most the model takes


# -- the model repository extension --


def test_the_repository_index_lists_every_model_ready(client: httpclient.InferenceServerClient) -> None:
    index = client.get_model_repository_index()
    states = {(row["name"], row.get("version")): row["state"] for row in index}
    assert states == {("affine", "1"): "READY", ("tiny-cnn-bn", "1"): "READY"}


def test_unload_then_load_through_the_client(own_client: httpclient.InferenceServerClient) -> None:
    client = own_client
    client.unload_model("affine")
    assert not client.is_model_ready("affine")
    assert not client.is_model_ready("affine", model_version="1")
    with pytest.raises(InferenceServerException) as raised:
        client.infer("affine", [affine_input(ROWS)])
    assert raised.value.status() == "404" and "affine" in str(raised.value.message())
    index = {row["name"]: row for row in client.get_model_repository_index()}
    assert index["affine"]["state"] != "READY"  # still listed: the repository holds it
    assert index["tiny-cnn-bn"]["state"] == "READY"  # the others serve on
    assert client.is_model_ready("tiny-cnn-bn")

    client.load_model("affine")
    assert client.is_model_ready("affine")
    assert_affine(client.infer("affine", [affine_input(ROWS)]), ROWS)
    assert {row["name"]: row["state"] for row in client.get_model_repository_index()}["affine"] == "READY"


def test_loading_a_model_the_repository_lacks_raises(client: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as raised:
        client.load_model("no-such-model")
    assert raised.value.status() == "404"
    assert "no-such-model" in str(raised.value.message())
