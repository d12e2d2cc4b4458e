"""The app factory: inference served ahead of FastAPI's stack, and the same answers through it."""

from __future__ import annotations

import asyncio
import gc
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import pytest
from fastapi import FastAPI, Request, Response

from service.app import GC_YOUNG_THRESHOLD, create_app
from service.config import Settings
from service.routes import inference
from service.runtime import Runtime
from tests.service.conftest import RunningServer, ServeFactory, affine_expected, free_port, infer_json


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_mounted_under_a_prefix_inference_goes_through_fastapi_and_answers_the_same(
    built_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    routed: list[str] = []  # requests that went through FastAPI's router rather than the fast path
    through_fastapi = inference._infer_through_fastapi

    async def spy(request: Request, model_name: str, model_version: str | None) -> Response:
        routed.append(request.url.path)
        return await through_fastapi(request, model_name, model_version)

    monkeypatch.setattr(inference, "_infer_through_fastapi", spy)
    app = create_app(Settings(repository=built_repository, provider="cpu"))
    outer = FastAPI()
    outer.mount("/normserve", app)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    async with app.router.lifespan_context(app):
        while not app.state.normserve.started:  # models load in the background
            await asyncio.sleep(0.01)
        for target, prefix in ((app, ""), (outer, "/normserve")):
            transport = httpx.ASGITransport(app=target)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                good = await client.post(f"{prefix}/v2/models/affine/infer", json=infer_json("x", x, id="7"))
                bad = await client.post(f"{prefix}/v2/models/affine/versions/1/infer", json=infer_json("x", x[:, :3]))
                binary = await client.post(
                    f"{prefix}/v2/models/affine/infer",
                    json=infer_json("x", x, outputs=[{"name": "total", "parameters": {"binary_data": True}}]),
                )
            assert len(routed) == (3 if prefix else 0)
            routed.clear()
            assert good.status_code == 200 and good.json()["id"] == "7"
            y = np.array(good.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, 3)
            np.testing.assert_allclose(y, affine_expected(x)[0], rtol=1e-6)
            assert bad.status_code == 400 and "expected [-1, 4]" in bad.json()["error"]
            header_length = int(binary.headers["Inference-Header-Content-Length"])
            total = np.frombuffer(binary.content[header_length:], dtype=np.float32)
            np.testing.assert_allclose(total, affine_expected(x)[1].ravel(), rtol=1e-6)


@pytest.mark.anyio
async def test_refusals_from_the_head_leave_nothing_for_the_cyclic_garbage_collector(built_repository: Path) -> None:
    # Under overload refusals come by the thousand a second: garbage in reference cycles (a raised exception's
    # traceback and frames) would pile up for the collector, whose full passes stall the loop.
    app = create_app(Settings(repository=built_repository, provider="cpu", request_timeout_ms=0.001))
    async with app.router.lifespan_context(app):
        while not app.state.normserve.started:
            await asyncio.sleep(0.01)
        path = "/v2/models/affine/infer"

        def refuse() -> int:  # as the HTTP protocol does: the answer is held in a local of the caller's frame
            refused = app.inference.admission(path)[1]
            return refused.status if refused is not None else 0

        assert refuse() == 503  # no request could meet a 1 µs deadline
        gc.collect()
        gc.disable()
        try:
            statuses = [refuse() for _ in range(100)]
            cyclic = gc.collect()
        finally:
            gc.enable()
    assert statuses == [503] * 100
    assert cyclic == 0, f"100 refusals left {cyclic} objects in reference cycles"


@pytest.mark.anyio
async def test_answered_requests_leave_nothing_for_the_cyclic_garbage_collector(built_repository: Path) -> None:
    # Serving raises the young generation's collection threshold (GC_YOUNG_THRESHOLD) because a collection
    # on the request path frees nothing: answering makes no reference cycles. Each request takes the steps
    # the connection takes (service.transport.AnsweredHere).
    before = gc.get_threshold()
    app = create_app(Settings(repository=built_repository, provider="cpu"))
    state = app.state.normserve
    body = json.dumps(infer_json("x", np.ones((1, 4), dtype=np.float32))).encode()
    try:
        async with app.router.lifespan_context(app):
            while not state.started:
                await asyncio.sleep(0.01)
            assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD

            async def answer() -> int:
                call = inference.InferenceCall(state, "affine", None, inference.RequestHeaders())
                try:
                    call.begin()
                    call.add(body)
                    return len(call.answer(await call.submit())[0])
                finally:
                    call.end()

            await answer()
            gc.collect()
            gc.disable()
            try:
                sizes = await asyncio.gather(*(answer() for _ in range(100)))
                cyclic = gc.collect()
            finally:
                gc.enable()
    finally:
        gc.set_threshold(*before)
    assert len(sizes) == 100 and min(sizes) > 0
    assert cyclic == 0, f"100 answered requests left {cyclic} objects in reference cycles"


def test_the_openapi_document_is_true_to_the_server(built_repository: Path) -> None:
    doc = create_app(Settings(repository=built_repository)).openapi()
    text = json.dumps(doc)
    refs = set(re.findall(r'"\$ref": "([^"]+)"', text))
    assert refs and refs <= {f"#/components/schemas/{name}" for name in doc["components"]["schemas"]}  # all resolve
    assert '"422"' not in text  # a request FastAPI cannot validate is answered 400
    good = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    for path in ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{model_version}/batchnorm"):
        operation = doc["paths"][path]["post"]
        content = operation["requestBody"]["content"]
        assert set(content) == {"application/json", "application/octet-stream"}
        validator = jsonschema.Draft202012Validator(
            content["application/json"]["schema"] | {"components": doc["components"]}
        )
        validator.validate(good)  # a fuzzer (or a client generator) can reach the body
        assert not validator.is_valid({"inputs": "not a list"})
        assert {"200", "400", "401", "404", "413", "415", "503", "504"} <= set(operation["responses"])
        assert operation["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorSchema")
    assert {"403", "415"} <= set(doc["paths"]["/v2/repository/models/{model_name}/unload"]["post"]["responses"])
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert {"/v2/health/ready", "/v2/repository/index", "/metrics"} <= set(doc["paths"])


def test_the_server_is_live_at_once_and_ready_only_when_every_model_is_warm(
    built_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    warmed = threading.Event()
    warm = Runtime.warm

    def slow_warm(self: Runtime, *args: Any, **kwargs: Any) -> dict[int, list[np.ndarray]]:
        warmed.wait(timeout=30)
        return warm(self, *args, **kwargs)

    monkeypatch.setattr(Runtime, "warm", slow_warm)
    server = RunningServer(Settings(repository=built_repository, port=free_port(), provider="cpu"))
    server.thread.start()
    try:
        while not server.server.started:
            time.sleep(0.01)
        assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
        ready = httpx.get(f"{server.url}/v2/health/ready")
        assert ready.status_code == 503 and "loading" in ready.json()["error"]
        index = httpx.post(f"{server.url}/v2/repository/index").json()
        assert {row["state"] for row in index} == {"LOADING"}
        early = httpx.post(f"{server.url}/v2/models/affine/infer", json=infer_json("x", np.ones((1, 4), np.float32)))
        assert early.status_code == 503 and "not ready" in early.json()["error"]
        warmed.set()
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "the server never turned ready"
            time.sleep(0.02)
        good = httpx.post(f"{server.url}/v2/models/affine/infer", json=infer_json("x", np.ones((1, 4), np.float32)))
        assert good.status_code == 200
    finally:
        warmed.set()
        server.__exit__()


def test_a_folder_that_is_not_a_model_name_is_skipped_and_the_rest_serve(serve: ServeFactory, repository: Path) -> None:
    (repository / "lost+found").mkdir()
    with serve(repository=repository) as server:
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
        names = {row["name"] for row in httpx.post(f"{server.url}/v2/repository/index").json()}
        assert names == {"affine", "tiny-cnn-bn"}
