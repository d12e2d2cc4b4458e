"""Users' own models, exported and imported by the commands, then served through HTTP to tritonclient:
the answers are PyTorch's and onnxruntime's, and the batchnorm endpoint gives the module's train() output."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import tritonclient.http as triton
from onnx import TensorProto, helper, numpy_helper

from bench.suite.servers import free_port
from export.from_onnx import import_onnx
from export.from_pytorch import export_module
from export.intake import InputSpec
from service.config import Settings
from tests.normserve.user_modules import TOKENS, text_inputs, tiny_cnn, tiny_text
from tests.service.conftest import RunningServer


def unbatched_onnx() -> onnx.ModelProto:
    """x FP32 [4, 5] (no batch axis) -> Gemm -> BatchNormalization -> y FP32 [4, 3]."""
    rng = np.random.default_rng(7)
    init = [
        numpy_helper.from_array(rng.standard_normal((3, 5)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 3).astype(np.float32), "scale"),
        numpy_helper.from_array(rng.normal(0, 0.1, 3).astype(np.float32), "B"),
        numpy_helper.from_array(rng.normal(0, 0.5, 3).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, 3).astype(np.float32), "var"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "W", "b"], ["g"], transB=1),
            helper.make_node("BatchNormalization", ["g", "scale", "B", "mean", "var"], ["y"], name="bn"),
        ],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])],
        init,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("users") / "repository"
    specs = [InputSpec("token_ids", "INT64", (TOKENS,)), InputSpec("attention_mask", "BOOL", (TOKENS,))]
    export_module(tiny_text(), "text", specs, root, output_names=["logits", "tokens"], max_batch_size=8)
    export_module(tiny_cnn(), "cnn", [InputSpec("x", "FP32", (2, 6, 6))], root, labels=["a", "b", "c"])
    onnx.save(unbatched_onnx(), root.parent / "fixed.onnx")
    import_onnx(root.parent / "fixed.onnx", "fixed", root)
    return root


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[RunningServer]:
    with RunningServer(Settings(repository=repository, port=free_port(), provider="cpu")) as running:
        yield running


def tensor(name: str, array: np.ndarray, datatype: str, binary: bool) -> triton.InferInput:
    t = triton.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array, binary_data=binary)
    return t


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_a_two_input_text_model_answers_what_pytorch_answers(server: RunningServer, binary: bool) -> None:
    ids, mask = text_inputs(5, seed=11)
    client = triton.InferenceServerClient(server.host)
    result = client.infer(
        "text",
        [tensor("token_ids", ids.numpy(), "INT64", binary), tensor("attention_mask", mask.numpy(), "BOOL", binary)],
        outputs=[triton.InferRequestedOutput(n, binary_data=binary) for n in ("logits", "tokens")],
    )
    with torch.no_grad():
        logits, tokens = tiny_text()(ids, mask)
    np.testing.assert_allclose(result.as_numpy("logits"), logits.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(result.as_numpy("tokens"), tokens.numpy())
    metadata = client.get_model_metadata("text")
    assert [(i["name"], i["datatype"], i["shape"]) for i in metadata["inputs"]] == [
        ("token_ids", "INT64", [-1, TOKENS]),
        ("attention_mask", "BOOL", [-1, TOKENS]),
    ]


def test_a_model_without_a_batch_axis_answers_what_onnxruntime_answers(server: RunningServer, repository: Path) -> None:
    x = np.random.default_rng(3).standard_normal((4, 5)).astype(np.float32)
    client = triton.InferenceServerClient(server.host)
    y = client.infer("fixed", [tensor("x", x, "FP32", True)]).as_numpy("y")
    expected = ort.InferenceSession(unbatched_onnx().SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert client.get_model_config("fixed")["max_batch_size"] == 0
    wrong = httpx.post(
        f"{server.url}/v2/models/fixed/infer",
        json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4, 5], "data": [0.0] * 20}]},
    )
    assert wrong.status_code == 400 and "[4, 5]" in wrong.json()["error"]


def test_the_batchnorm_endpoint_of_a_users_module_is_its_train_output(server: RunningServer) -> None:
    x = np.random.default_rng(5).standard_normal((6, 2, 6, 6)).astype(np.float32) * 2 + 3  # far from calibration
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.flatten().tolist()}]}
    answer = httpx.post(f"{server.url}/v2/models/cnn/batchnorm", json=body, timeout=30).json()
    model = tiny_cnn()
    with torch.no_grad():
        running = model(torch.tensor(x)).numpy()
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.train()
        batch = model(torch.tensor(x)).numpy()
    np.testing.assert_allclose(answer["running"]["logits"], running, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(answer["batch"]["logits"], batch, rtol=1e-5, atol=1e-4)
    assert np.abs(batch - running).max() > 0.01  # 100x the parity tolerance: the batch statistics matter
    assert [layer["name"] for layer in answer["layers"]] == ["bn", "bn_after_relu"]


def test_labels_serve_the_classification_extension(server: RunningServer) -> None:
    x = np.random.default_rng(9).standard_normal((2, 2, 6, 6)).astype(np.float32)
    client = triton.InferenceServerClient(server.host)
    output = client.get_model_metadata("cnn")["outputs"][0]["name"]  # named from the graph: no --output given
    top = client.infer(
        "cnn", [tensor("x", x, "FP32", True)], outputs=[triton.InferRequestedOutput(output, class_count=1)]
    )
    with torch.no_grad():
        predicted = tiny_cnn()(torch.tensor(x)).argmax(1).tolist()
    assert [s.decode().split(":")[2] for s in top.as_numpy(output).flatten()] == ["abc"[i] for i in predicted]
