"""A small model repository and a real uvicorn on a loopback port, for the service tests.

The repository holds two models:
- ``affine``: a hand-built graph with known weights, so answers can be asserted exactly. Input ``x``
  FP32 [-1, 4]; outputs ``y = x @ W + b`` FP32 [-1, 3] and ``total = sum(y)`` FP32 [-1, 1]; max batch 8.
- ``tiny-cnn-bn``: a tiny CNN with BatchNorm (non-trivial running statistics), trained nowhere but
  folded, exported and verified by the real exporter. Input FP32 [-1, 1, 8, 8]; max batch 16.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np
import onnx
import pytest
import torch
import uvicorn
from onnx import TensorProto, helper, numpy_helper

from bench.suite.servers import free_port, metric, wait_ready
from export.build import export_model
from models.train import make_checkpoint
from models.zoo import build_model, config_to_dict
from repository import ModelConfig, TensorSpec, write_version
from service.app import create_app
from service.config import Settings
from service.transport import server_config
from tests.conftest import randomize_batchnorms, tiny_cnn_spec

AFFINE_W = np.arange(12, dtype=np.float32).reshape(4, 3) / 4 - 1
AFFINE_B = np.array([0.5, -1.0, 2.0], dtype=np.float32)


def affine_expected(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = x.astype(np.float32) @ AFFINE_W + AFFINE_B
    return y, y.sum(axis=1, keepdims=True)


def affine_onnx() -> bytes:
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
            helper.make_node("ReduceSum", ["y", "axes"], ["total"], keepdims=1),
        ],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("total", TensorProto.FLOAT, ["N", 1]),
        ],
        [
            numpy_helper.from_array(AFFINE_W, "W"),
            numpy_helper.from_array(AFFINE_B, "b"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    return model.SerializeToString()


AFFINE_CONFIG = ModelConfig(
    name="affine",
    max_batch_size=8,
    inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 4])],
    outputs=[
        TensorSpec(name="y", datatype="FP32", shape=[-1, 3]),
        TensorSpec(name="total", datatype="FP32", shape=[-1, 1]),
    ],
    description="y = x @ W + b and its row sums, with known weights",
)


def write_affine(root: Path, version: str = "1") -> None:
    write_version(root, AFFINE_CONFIG, version, affine_onnx(), {"trained": False, "description": "test"})


@pytest.fixture(scope="session")
def built_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A repository, and beside it the artifacts folder with tiny-cnn-bn's checkpoint."""
    root = tmp_path_factory.mktemp("repository")
    write_affine(root)
    spec = tiny_cnn_spec()
    model = randomize_batchnorms(build_model(spec.arch, config_to_dict(spec.config)))
    checkpoint = make_checkpoint(spec, model, {"test_accuracy": None})
    artifacts = tmp_path_factory.mktemp("artifacts")
    (artifacts / spec.name).mkdir()
    torch.save(checkpoint, artifacts / spec.name / "checkpoint.pt")
    del checkpoint["state_dict"]
    export_model(model, checkpoint, root)
    return root, artifacts


@pytest.fixture(scope="session")
def built_repository(built_models: tuple[Path, Path]) -> Path:
    return built_models[0]


@pytest.fixture
def repository(built_repository: Path, tmp_path: Path) -> Path:
    """A private copy of the repository, for tests that change files in it."""
    root = tmp_path / "repository"
    shutil.copytree(built_repository, root)
    return root


class RunningServer:
    """uvicorn serving ``create_app(settings)`` on a thread, on a free loopback port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.server = uvicorn.Server(server_config(self.app, settings))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{settings.port}"
        self.host = f"127.0.0.1:{settings.port}"

    def __enter__(self) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not (self.server.started and self.app.state.normserve.started):  # listening, and models loaded
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.url, name, **labels)


def start_service(
    repository: Path,
    stderr: IO[str] | int = subprocess.PIPE,
    files: int | None = None,
    module: str = "service",
    **env: str,
) -> tuple[subprocess.Popen[str], str]:
    """``python -m service`` (or ``module``) with those NORMSERVE_* variables, once it is ready; ``files``
    lowers its soft open-file limit first."""
    port = free_port()
    environment = os.environ | {"NORMSERVE_REPOSITORY": str(repository), "NORMSERVE_PORT": str(port)} | env

    def limit_files() -> None:
        if files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (files, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    command = [sys.executable, "-m", module]
    process = subprocess.Popen(command, env=environment, stderr=stderr, text=True, preexec_fn=limit_files)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, f"{url}/v2/health/ready", 60, "the service")
    except RuntimeError as e:
        raise RuntimeError(f"{e}: {process.communicate()[1] or 'see its log'}") from None
    return process, url


class KeepAliveLoad:
    """``with KeepAliveLoad(url, x) as load:`` four clients send ``x`` to ``affine`` over keep-alive connections
    (which a drain must close), every 5 ms, until the block ends; ``load.outcomes`` has each answer's status
    and Connection header, or ``lost: ...`` for a request sent and never answered."""

    def __init__(self, url: str, x: np.ndarray, clients: int = 4) -> None:
        self.url, self.x = url, x
        self.outcomes: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._send) for _ in range(clients)]

    def _send(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                try:
                    response = client.post(f"{self.url}/v2/models/affine/infer", json=infer_json("x", self.x))
                    self.outcomes.append(f"{response.status_code} {response.headers.get('connection', 'keep-alive')}")
                except httpx.TransportError as e:
                    self.outcomes.append(f"lost: {e!r}")  # sent and never answered: what must not happen
                time.sleep(0.005)

    def __enter__(self) -> KeepAliveLoad:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)


ServeFactory = Callable[..., contextlib.AbstractContextManager[RunningServer]]


def _serve_factory(repository: Path) -> ServeFactory:
    @contextlib.contextmanager
    def start(**overrides: Any) -> Iterator[RunningServer]:
        fields: dict[str, Any] = {"repository": repository, "port": free_port(), "provider": "cpu"}
        fields.update(overrides)
        with RunningServer(Settings(**fields)) as server:
            yield server

    return start


@pytest.fixture
def serve(built_repository: Path) -> ServeFactory:
    """``with serve(queue_limit=2, repository=...) as server:`` starts a server with those settings."""
    return _serve_factory(built_repository)


@pytest.fixture(scope="module")
def module_serve(built_repository: Path) -> ServeFactory:
    """``serve`` for a module-scoped fixture: one server shared by every test of a module that only reads
    from it (no metric it counts, no model it loads or unloads)."""
    return _serve_factory(built_repository)


@pytest.fixture
def server(serve: ServeFactory) -> Iterator[RunningServer]:
    """A server with the default settings over the shared repository."""
    with serve() as running:
        yield running


def infer_json(name: str, x: np.ndarray, datatype: str = "FP32", **extra: Any) -> dict[str, Any]:
    """A KServe v2 JSON inference request with one input."""
    return {"inputs": [{"name": name, "datatype": datatype, "shape": list(x.shape), "data": x.tolist()}], **extra}
