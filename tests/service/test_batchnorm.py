"""The batchnorm endpoint: running vs batch statistics of one batch, through HTTP.

The tiny BatchNorm CNN of the shared repository is loaded here from its checkpoint, so the
endpoint's statistics can be held against numpy's on the inputs of each BatchNorm, and its outputs
against PyTorch in eval and in train() mode.
"""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from export.build import export_model
from models.data import load_splits
from models.train import load_checkpoint, make_checkpoint
from models.zoo import build_model, config_to_dict
from repository import BATCH_STATS_FILE, BN_STATS_FILE
from service.batchnorm import DISTANCE, ONE_SAMPLE_NOTE
from service.config import Settings
from tests.conftest import tiny_cnn_spec
from tests.service.conftest import RunningServer, ServeFactory, free_port, infer_json
from tests.service.user_models import BN_NO_GRAPH_REASON, regress_expected, regress_inputs, write_bn_models

pytestmark = pytest.mark.anyio

CNN = "tiny-cnn-bn"
GN = "tiny-cnn-gn"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def tiny_bn(built_models: tuple[Path, Path]) -> nn.Module:
    """The repository's tiny-cnn-bn as PyTorch has it: unfolded, in eval mode."""
    model, _ = load_checkpoint(built_models[1] / CNN / "checkpoint.pt")
    return model


@pytest.fixture(scope="module")
def with_gn(built_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared repository plus a tiny GroupNorm CNN, exported by the real exporter, and users' BatchNorm
    models built by hand (tests/service/user_models.py): a two-input regression head with and without a batch
    dimension, and one whose report says why it has no batch-statistics graph."""
    root = tmp_path_factory.mktemp("with-gn") / "repository"
    shutil.copytree(built_repository, root)
    spec = tiny_cnn_spec("gn")
    model = build_model(spec.arch, config_to_dict(spec.config)).eval()
    meta = make_checkpoint(spec, model, {"test_accuracy": None})
    del meta["state_dict"]
    export_model(model, meta, root)
    return write_bn_models(root)


@pytest.fixture(scope="module")
def server(with_gn: Path) -> Iterator[RunningServer]:
    """One server for the read-only tests of this module."""
    with RunningServer(Settings(repository=with_gn, port=free_port(), provider="cpu")) as running:
        yield running


def digits(n: int, start: int = 0) -> np.ndarray:
    return np.array(load_splits().x_test[start : start + n])


def bn_inputs(model: nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    """What each BatchNorm of ``model`` receives on ``x`` (the inputs do not depend on the BN's mode
    for the first layer only, so run in train() mode as the batch-statistics graph does)."""
    model = copy.deepcopy(model)
    seen: dict[str, np.ndarray] = {}
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm):
            m.train()
            m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0].numpy().copy()))
    with torch.no_grad():
        model(torch.tensor(x))
    return seen


def post(server: RunningServer, model: str, x: np.ndarray, **extra: object) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/{model}/batchnorm", json=infer_json("input", x, **extra), timeout=30)


def test_statistics_equal_numpys_and_running_outputs_equal_infers(server: RunningServer, tiny_bn: nn.Module) -> None:
    x = digits(8)
    response = post(server, CNN, x, id="stats")
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["model_name"], answer["model_version"], answer["id"]) == (CNN, "1", "stats")
    assert answer["batch_size"] == 8 and "note" not in answer and answer["distance"] == DISTANCE

    inputs = bn_inputs(tiny_bn, x)
    layers = {name: m for name, m in tiny_bn.named_modules() if isinstance(m, _BatchNorm)}
    assert [layer["name"] for layer in answer["layers"]] == list(layers)
    for layer in answer["layers"]:
        bn, seen = layers[layer["name"]], inputs[layer["name"]]
        mean, var = seen.mean(axis=(0, 2, 3)), seen.var(axis=(0, 2, 3))  # numpy's var is the biased one
        np.testing.assert_allclose(layer["batch_mean"], mean, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(layer["batch_var"], var, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(layer["running_mean"], bn.running_mean.numpy(), rtol=1e-6)
        np.testing.assert_allclose(layer["running_var"], bn.running_var.numpy(), rtol=1e-6)
        rm, rv = bn.running_mean.numpy().astype(np.float64), bn.running_var.numpy().astype(np.float64)
        bm, bv = np.array(layer["batch_mean"]), np.array(layer["batch_var"])
        expected = np.sqrt(np.mean(((bm - rm) ** 2 + (np.sqrt(bv) - np.sqrt(rv)) ** 2) / (rv + bn.eps)))
        assert layer["distance"] == pytest.approx(expected, rel=1e-6)
        assert (layer["type"], layer["channels"], layer["reduced_over"]) == ("BatchNorm2d", bn.num_features, "N, H, W")
        assert layer["values_per_channel"] == seen.shape[0] * seen.shape[2] * seen.shape[3]

    infer = httpx.post(f"{server.url}/v2/models/{CNN}/infer", json=infer_json("input", x)).json()
    served = np.array(infer["outputs"][0]["data"], dtype=np.float32).reshape(8, 10)
    np.testing.assert_allclose(answer["running"]["logits"], served, rtol=0, atol=1e-6)
    with torch.no_grad():
        eval_out = tiny_bn(torch.tensor(x)).numpy()
        train_model = copy.deepcopy(tiny_bn)
        for m in train_model.modules():
            if isinstance(m, _BatchNorm):
                m.train()
        train_out = train_model(torch.tensor(x)).numpy()
    np.testing.assert_allclose(answer["running"]["logits"], eval_out, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(answer["batch"]["logits"], train_out, rtol=1e-5, atol=1e-4)
    assert np.abs(train_out - eval_out).max() > 0.1  # the random running statistics are far from these digits'

    for side in ("running", "batch"):
        probabilities = np.array(answer[side]["probabilities"])
        np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-9)
        assert answer[side]["predictions"] == np.argmax(answer[side]["logits"], axis=1).tolist()
    assert answer["changed"] == [
        r != b for r, b in zip(answer["running"]["predictions"], answer["batch"]["predictions"], strict=True)
    ]
    assert answer["labels"] == [str(d) for d in range(10)]  # the class names of config.json


def test_a_batch_of_one_is_answered_and_says_what_its_statistics_do(server: RunningServer) -> None:
    response = post(server, CNN, digits(1))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["batch_size"] == 1 and answer["note"] == ONE_SAMPLE_NOTE
    assert all(np.isfinite(layer["batch_var"]).all() for layer in answer["layers"])
    assert np.isfinite(answer["batch"]["logits"]).all()


def test_binary_input_gets_the_same_answer_as_json(server: RunningServer) -> None:
    x = digits(3, start=10)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [3, 1, 8, 8],
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ]
        }
    ).encode()
    binary = httpx.post(
        f"{server.url}/v2/models/{CNN}/versions/1/batchnorm",
        content=header + x.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert binary.status_code == 200, binary.text
    as_json = post(server, CNN, x).json()
    assert binary.json()["batch"]["logits"] == as_json["batch"]["logits"]


def test_a_model_without_batchnorm_gets_a_400_naming_its_norm_layers(server: RunningServer) -> None:
    response = post(server, GN, digits(2))
    assert response.status_code == 400
    error = response.json()["error"]
    assert "has no BatchNorm layer" in error and "GroupNorm x" in error and "Expected a BatchNorm model" in error
    assert (
        server.metric(
            "normserve_batchnorm_request_failure_total", model=GN, version="", protocol="http", reason="invalid_input"
        )
        >= 1
    )


def binary_body(feeds: dict[str, np.ndarray], datatypes: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    """A request of binary tensors, and its headers."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": n,
                    "datatype": datatypes[n],
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
                for n, x in feeds.items()
            ]
        }
    ).encode()
    headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
    return header + b"".join(x.tobytes() for x in feeds.values()), headers


@pytest.mark.parametrize(("model", "rows"), [("regress-bn", 6), ("regress-bn-fixed", 5)])
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_a_two_input_regression_head_compares_its_output_with_and_without_a_batch_dimension(
    server: RunningServer, model: str, rows: int, binary: bool
) -> None:
    feeds = regress_inputs(rows, seed=rows)
    url = f"{server.url}/v2/models/{model}/batchnorm"
    if binary:
        content, headers = binary_body(feeds, {"x": "FP32", "shift": "INT64"})
        response = httpx.post(url, content=content, headers=headers)
    else:
        tensors = [infer_json("x", feeds["x"])["inputs"][0], infer_json("shift", feeds["shift"], "INT64")["inputs"][0]]
        response = httpx.post(url, json={"id": "r", "inputs": tensors})
    assert response.status_code == 200, response.text
    answer = response.json()
    expected = regress_expected(feeds)
    assert (answer["batch_size"], answer["output"], answer["labels"]) == (rows, "pred", [])
    np.testing.assert_allclose(answer["running"]["logits"], expected["running"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(answer["batch"]["logits"], expected["batch"], rtol=1e-5, atol=1e-5)
    assert np.abs(expected["batch"] - expected["running"]).max() > 0.1  # the batch is far from the running statistics
    (layer,) = answer["layers"]
    assert (layer["name"], layer["type"], layer["channels"], layer["values_per_channel"]) == (
        "head.bn",
        "BatchNorm1d",
        3,
        rows,
    )
    np.testing.assert_allclose(layer["batch_mean"], expected["mean"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer["batch_var"], expected["var"], rtol=1e-5, atol=1e-5)
    assert layer["distance"] > 0
    # A 2-output regression head has no classes: its probabilities and predictions are given, and mean nothing.
    for side in ("running", "batch"):
        np.testing.assert_allclose(np.sum(answer[side]["probabilities"], axis=1), 1, rtol=1e-9)
        assert answer[side]["predictions"] == np.argmax(answer[side]["logits"], axis=1).tolist()
    infer = httpx.post(f"{server.url}/v2/models/{model}/infer", json={"inputs": [
        infer_json("x", feeds["x"])["inputs"][0], infer_json("shift", feeds["shift"], "INT64")["inputs"][0]
    ]}).json()  # fmt: skip
    np.testing.assert_allclose(
        np.reshape(infer["outputs"][0]["data"], (rows, 2)), answer["running"]["logits"], atol=1e-6
    )


def test_a_model_without_a_batch_dimension_takes_its_one_fixed_batch_only(server: RunningServer) -> None:
    feeds = regress_inputs(4)
    tensors = [infer_json("x", feeds["x"])["inputs"][0], infer_json("shift", feeds["shift"], "INT64")["inputs"][0]]
    response = httpx.post(f"{server.url}/v2/models/regress-bn-fixed/batchnorm", json={"inputs": tensors})
    assert response.status_code == 400
    assert "input 'x' has shape [4, 4]; expected exactly [5, 4]" in response.json()["error"]
    missing = httpx.post(f"{server.url}/v2/models/regress-bn/batchnorm", json={"inputs": tensors[:1]})
    assert missing.status_code == 400 and "missing input shift (INT64 [-1, 2])" in missing.json()["error"]


def test_a_model_whose_report_says_why_it_has_no_batch_statistics_graph_gets_that_reason(
    server: RunningServer,
) -> None:
    feeds = regress_inputs(2)
    tensors = [infer_json("x", feeds["x"])["inputs"][0], infer_json("shift", feeds["shift"], "INT64")["inputs"][0]]
    response = httpx.post(f"{server.url}/v2/models/bn-no-graph/batchnorm", json={"inputs": tensors})
    assert response.status_code == 400
    error = response.json()["error"]
    assert "bn-no-graph version 1 has no batch-statistics graph" in error and BN_NO_GRAPH_REASON in error
    assert "BatchNormalization x1" in error
    metadata = httpx.get(f"{server.url}/v2/models/bn-no-graph").json()
    assert metadata["batch_statistics"] == {"available": False, "reason": error}
    assert httpx.get(f"{server.url}/v2/models/regress-bn").json()["batch_statistics"] == {"available": True}
    assert httpx.get(f"{server.url}/v2/models/{CNN}").json()["batch_statistics"] == {"available": True}
    assert httpx.get(f"{server.url}/v2/models/{GN}").json()["batch_statistics"]["available"] is False


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v2/models/nope/batchnorm", infer_json("input", np.zeros((1, 1, 8, 8))), 404, "unknown model 'nope'"),
        (f"/v2/models/{CNN}/versions/7/batchnorm", infer_json("input", np.zeros((1, 1, 8, 8))), 404, "no version '7'"),
        (f"/v2/models/{CNN}/batchnorm", infer_json("input", np.zeros((1, 1, 4, 4))), 400, "expected [-1, 1, 8, 8]"),
        (f"/v2/models/{CNN}/batchnorm", infer_json("input", np.zeros((17, 1, 8, 8))), 400, "max batch size of 16"),
        (f"/v2/models/{CNN}/batchnorm", {"inputs": "x"}, 400, "expected a list of tensors"),
    ],
)
def test_bad_requests_get_the_errors_infer_gives(
    server: RunningServer, path: str, body: dict[str, object], status: int, message: str
) -> None:
    response = httpx.post(f"{server.url}{path}", json=body)
    assert response.status_code == status
    assert message in response.json()["error"]


def test_an_unsupported_content_type_is_415_and_counted(server: RunningServer) -> None:
    # The model and its version are known from the head, before the body is looked at.
    before = server.metric(
        "normserve_batchnorm_request_failure_total",
        model=CNN,
        version="1",
        protocol="http",
        reason="unsupported_media_type",
    )
    response = httpx.post(
        f"{server.url}/v2/models/{CNN}/batchnorm", content=b"x", headers={"Content-Type": "text/plain"}
    )
    assert response.status_code == 415 and "application/json" in response.json()["error"]
    after = server.metric(
        "normserve_batchnorm_request_failure_total",
        model=CNN,
        version="1",
        protocol="http",
        reason="unsupported_media_type",
    )
    assert after == before + 1


async def test_concurrent_requests_are_never_batched_together(serve: ServeFactory) -> None:
    rng = np.random.default_rng(1)
    x = load_splits().x_test
    batches = [x[rng.choice(len(x), size=int(n), replace=False)] for n in rng.integers(1, 9, size=24)]
    # A queue delay would make infer's queue batch concurrent requests; neither of the endpoint's queues may.
    with serve(max_queue_delay_ms=20, batchnorm_queue_limit=len(batches)) as server:
        url = f"{server.url}/v2/models/{CNN}/batchnorm"
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=32), timeout=30) as client:
            alone = [(await client.post(url, json=infer_json("input", b))).json() for b in batches]
            labels = {"model": CNN, "version": "1"}
            executions = server.metric("normserve_batchnorm_execution_count_total", **labels)
            served_executions = server.metric("normserve_execution_count_total", **labels)
            together = await asyncio.gather(*(client.post(url, json=infer_json("input", b)) for b in batches))
        assert server.metric("normserve_batchnorm_execution_count_total", **labels) - executions == len(batches)
        # The running-statistics half runs on the served graph, one request at a time on the endpoint's own
        # queue: its rows count with infer's, but it never waits in (or fills) infer's queue.
        assert server.metric("normserve_execution_count_total", **labels) - served_executions == len(batches)
        assert server.metric("normserve_batchnorm_request_success_total", **labels, protocol="http") == 2 * len(batches)
    for solo, response in zip(alone, together, strict=True):
        assert response.status_code == 200, response.text
        answer = response.json()
        np.testing.assert_allclose(answer["batch"]["logits"], solo["batch"]["logits"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(answer["running"]["logits"], solo["running"]["logits"], rtol=0, atol=1e-5)
        for mine, theirs in zip(answer["layers"], solo["layers"], strict=True):
            np.testing.assert_allclose(mine["batch_mean"], theirs["batch_mean"], rtol=0, atol=1e-5)


def test_the_extension_is_listed_and_documented(server: RunningServer) -> None:
    assert "batchnorm" in httpx.get(f"{server.url}/v2").json()["extensions"]
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    for path in ("/v2/models/{model_name}/batchnorm", "/v2/models/{model_name}/versions/{model_version}/batchnorm"):
        documented = paths[path]["post"]
        assert "requestBody" in documented and "BatchNormResponseSchema" in json.dumps(documented)


@pytest.mark.parametrize("file", [BATCH_STATS_FILE, BN_STATS_FILE])
def test_a_tampered_batch_statistics_file_is_refused_like_a_tampered_model(
    serve: ServeFactory, repository: Path, file: str
) -> None:
    path = repository / CNN / "1" / file
    path.write_bytes(path.read_bytes().replace(b"0", b"1", 1) if file.endswith("json") else path.read_bytes() + b"\0")
    with serve(repository=repository) as server:
        ready = httpx.get(f"{server.url}/v2/health/ready").json()
        state = next(m for m in ready["models"] if m["name"] == CNN)
        assert state["state"] == "UNAVAILABLE"
        assert file in state["reason"] and "the file changed after it was exported and verified" in state["reason"]
        response = post(server, CNN, digits(2))
        assert response.status_code == 503 and "not ready" in response.json()["error"]
        assert (
            httpx.post(f"{server.url}/v2/models/affine/infer", json=infer_json("x", np.zeros((1, 4)))).status_code
            == 200
        )


async def test_a_reload_under_batchnorm_traffic_loses_nothing_and_unload_clears_both_graphs_gauges(
    serve: ServeFactory,
) -> None:
    x = load_splits().x_test
    labels = {"model": CNN, "version": "1"}
    with serve(model_control="explicit", batchnorm_queue_limit=64) as server:
        url = f"{server.url}/v2/models/{CNN}/batchnorm"
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=32), timeout=30) as client:
            requests = [client.post(url, json=infer_json("input", x[i : i + 4])) for i in range(0, 96, 4)]
            reload = client.post(f"{server.url}/v2/repository/models/{CNN}/load")
            responses = await asyncio.gather(*requests[:12], reload, *requests[12:])  # the reload halfway
        assert len(responses) == 25
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
        for family in ("normserve", "normserve_batchnorm"):
            assert server.metric(f"{family}_model_ready", **labels) == 1
            assert server.metric(f"{family}_model_provider", **labels, provider="CPUExecutionProvider") == 1
        assert httpx.post(f"{server.url}/v2/repository/models/{CNN}/unload").status_code == 200
        for family in ("normserve", "normserve_batchnorm"):
            assert server.metric(f"{family}_model_ready", **labels) == 0
            assert server.metric(f"{family}_model_provider", **labels, provider="CPUExecutionProvider") == 0
        assert httpx.post(url, json=infer_json("input", x[:2])).status_code == 404


async def test_a_batchnorm_flood_leaves_infer_its_queue(serve: ServeFactory) -> None:
    """60 batchnorm requests at once against queues of 2: they are refused from their heads past that, and
    the infer requests sent among them, within infer's own queue limit, are all answered."""
    x = load_splits().x_test[:8]
    with serve(queue_limit=4, batchnorm_queue_limit=2, max_queue_delay_ms=50) as server:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=80), timeout=30) as client:
            flood = [
                client.post(f"{server.url}/v2/models/{CNN}/batchnorm", json=infer_json("input", x)) for _ in range(60)
            ]
            infers = [
                client.post(f"{server.url}/v2/models/{CNN}/infer", json=infer_json("input", x[:1])) for _ in range(3)
            ]
            answers = await asyncio.gather(*flood[:30], *infers, *flood[30:])
    bn = answers[:30] + answers[33:]
    assert {a.status_code for a in answers[30:33]} == {200}, [a.text for a in answers[30:33]]
    assert {a.status_code for a in bn} <= {200, 503} and any(a.status_code == 503 for a in bn)
    refused = next(a for a in bn if a.status_code == 503)
    assert "NORMSERVE_BATCHNORM_QUEUE_LIMIT" in refused.json()["error"] and refused.headers["retry-after"] == "1"
