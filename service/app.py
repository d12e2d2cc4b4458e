"""The app factory: ``create_app(Settings())`` gives the FastAPI app; ``python -m service`` serves it."""

from __future__ import annotations

import asyncio
import functools
import gc
import importlib.resources
import logging
import os
import signal
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from service import __version__, compiled
from service.access import Access, endpoint_group
from service.config import Settings
from service.errors import ServeError, render
from service.grpc_service import GrpcServer
from service.logs import CLIENT_TEXT_CHARS, client_text, left_out
from service.metrics import Metrics
from service.openapi import described
from service.peers import PEER_PREFIX, Peers
from service.peers import router as peer_router
from service.registry import Registry
from service.routes import ROUTERS
from service.routes.inference import InferenceCall, InferenceEndpoint, asgi_error, send_response
from service.state import ServiceState
from service.workers import HEARTBEAT_S, ReadinessBoard, Worker, served_models

__all__ = ["InferenceHere", "create_app"]

log = logging.getLogger(__name__)

# The young generation's collection threshold once serving (CPython's default: 700). The request path makes
# no reference cycles, so a collection there frees nothing; but past capacity a batch's requests in flight
# (about a thousand objects) outgrow 700 and set one off for every batch, whose survivors then fill the older
# generations and set those off too: 1.5-2 µs a request, none of it freeing anything. Cyclic garbage is
# still collected, 10,000 allocations later.
GC_YOUNG_THRESHOLD = 10_000


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _error_handler(request: Request, exc: Exception) -> Response:
    """ServeError and unexpected exceptions alike: errors.render decides what the client hears."""
    status, headers, body = render(exc)
    return Response(body, status_code=status, headers=headers, media_type="application/json")


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, HTTPException):
        raise exc
    if exc.status_code == 404:
        return _error(404, f"no route {request.method} {request.url.path}; the API is listed at /docs")
    return _error(exc.status_code, str(exc.detail), dict(exc.headers or {}))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):
        raise exc
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return _error(400, f"invalid request: {problems}")


def _closing(send: Send) -> Send:
    """``send``, with ``Connection: close`` on the response: while draining, each client is told to go."""

    async def closing(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
            message = {**message, "headers": [*headers, (b"connection", b"close")]}
        await send(message)

    return closing


class NormserveApp(FastAPI):
    """FastAPI, with inference requests handed straight to ``InferenceEndpoint``, and every HTTP request
    checked first by ``Access`` (API key, model control, cross-origin control requests).

    Everything else (health, metadata, the repository extension, metrics, the docs) goes through
    FastAPI as usual. Inference skips FastAPI's middleware and router, which would cost more than
    a small model's inference; errors on both paths go through the one mapping, errors.render.
    """

    inference: InferenceEndpoint
    access: Access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PEER_PREFIX):
            # A peer worker's call (service.peers): only over this worker's Unix socket (uvicorn gives its path
            # as the server's address); from any port it is a path like any other that does not exist.
            worker = self.state.normserve.worker
            if worker is not None and scope.get("server") == (str(worker.socket_path()), None):
                await super().__call__(scope, receive, send)
                return
            await _error(404, "no such route; the API is listed at /docs")(scope, receive, send)
            return
        if scope["type"] == "http":
            try:
                self.access.check(scope["method"], scope["path"], scope["headers"])
            except ServeError as e:
                if endpoint_group(scope["path"]) == "model_control" and (
                    (suppressed := self.state.normserve.refusal_log.allow()) is not None
                ):
                    client = "{}:{}".format(*scope["client"]) if scope.get("client") else "unknown client"
                    log.warning(
                        "model control: %s %s from %s refused: %d %s%s",
                        client_text(scope["method"], 20),
                        client_text(scope["path"]),
                        client,
                        e.status,
                        client_text(e.message, 2 * CLIENT_TEXT_CHARS),
                        left_out(suppressed),
                    )
                await send_response(send, *asgi_error(e))
                return
            if self.state.normserve.draining:
                send = _closing(send)
        found = self.inference.match(scope)
        if found is not None:
            await self.inference(scope, receive, send, *found)
        else:
            await super().__call__(scope, receive, send)


class InferenceHere:
    """The app's side of the inference requests a connection answers itself, without ASGI
    (``service.transport.Here``): the same access check as ``NormserveApp.__call__``, then the same call."""

    def __init__(self, app: NormserveApp) -> None:
        self.endpoint, self.access = app.inference, app.access

    def call(self, path: str, headers: list[tuple[bytes, bytes]]) -> InferenceCall | None:
        call = self.endpoint.call(path, headers)
        if call is not None:
            self.access.check("POST", path, headers)
        return call

    @property
    def draining(self) -> bool:
        return self.endpoint.state.draining


DOCS_ASSETS = Path(str(importlib.resources.files("fastapi_offline") / "static"))


def _api_docs(app: FastAPI) -> None:
    """Swagger UI at /docs and ReDoc at /redoc, their scripts and styles from the fastapi-offline package
    rather than a CDN, so the pages work offline and behind a firewall."""
    app.mount("/docs/assets", StaticFiles(directory=DOCS_ASSETS), name="api docs assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title}: API",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title}: API",
            redoc_js_url="/docs/assets/redoc.standalone.js",
            redoc_favicon_url="/docs/assets/favicon.png",
            with_google_fonts=False,
        )


async def _heartbeat(state: ServiceState, board: ReadinessBoard, index: int) -> None:
    """This worker's readiness on the shared board, every HEARTBEAT_S (a worker whose heartbeat stops, its
    loop held or its process gone, is not ready to the others). A worker whose supervisor is gone (killed:
    it had no time to pass a signal on) drains and stops as if it had been told to."""
    supervisor = os.getppid()
    try:
        while True:
            board.write(index, not state.own_not_ready_reasons())
            if os.getppid() != supervisor and not state.draining:
                log.error("the supervisor (pid %d) is gone: stopping", supervisor)
                os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(HEARTBEAT_S)
    finally:
        board.clear(index)


def create_app(settings: Settings, worker: Worker | None = None) -> NormserveApp:
    """Build the app. Models load and warm in its lifespan, in the background: the server is live at
    once and turns ready when every model that loaded is warm.

    ``worker``: this app is one of several worker processes (``service.workers``): its models load before
    its lifespan lets the ports open, it answers its peers under ``/_peer/`` on its Unix socket, and its
    readiness is every worker's."""
    metrics = Metrics(worker=worker.index if worker is not None else 0)
    state = ServiceState(settings, metrics, Registry(settings, metrics))
    if worker is not None:
        state.worker, state.peers = worker, Peers(worker)
        state.board = ReadinessBoard(worker.run_dir / "ready", worker.count)
    access = Access(settings)

    async def load() -> None:
        try:
            await state.registry.load_all(served_models(worker.run_dir) if worker is not None else None)
        except Exception as e:  # a bug: say so in readiness rather than load forever
            log.exception("loading the models failed")
            state.load_error = f"loading the models failed: {e}"
        # What start-up built (sessions, routes, schemas) lives as long as the process: freezing it
        # spares every later full collection a scan of it, which showed as a 30 ms tail under load.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        state.started = True
        served = sum(v.served is not None for e in state.registry.models.values() for v in e.versions.values())
        log.info("serving %d model versions from %s; %s", served, settings.repository, compiled.describe())
        for reason in state.own_not_ready_reasons():
            log.error("not ready: %s", reason)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        grpc_server = GrpcServer(state, access) if settings.grpc_port else None
        heartbeat = None
        if worker is None:
            # gRPC listens beside HTTP, on the same loop, before the models load: live at once, as HTTP.
            if grpc_server is not None:
                await grpc_server.start()
            # Load in the background: the server listens at once, live but not ready until every model is warm.
            loading = asyncio.create_task(load(), name="load models")
        else:
            # A worker takes no connection before it can answer: its ports open once its models are warm
            # (the other workers answer meanwhile).
            loading = asyncio.create_task(load(), name="load models")
            await loading
            if grpc_server is not None:
                await grpc_server.start()
            assert state.board is not None
            heartbeat = asyncio.create_task(_heartbeat(state, state.board, worker.index), name="heartbeat")
        try:
            yield
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
            state.shutting_down = True
            if grpc_server is not None:  # its calls in flight finish first, as HTTP's have by now
                await grpc_server.stop(settings.shutdown_timeout_s)
            if not loading.done():
                loading.cancel()
            try:
                await loading
            except asyncio.CancelledError:
                pass
            finally:
                await state.registry.close()  # every accepted request finishes first
                log.info("stopped")

    app = NormserveApp(
        title="normserve",
        version=__version__,
        summary="BatchNorm-folded ONNX models over the Open Inference Protocol (KServe v2)",
        lifespan=lifespan,
        docs_url=None,  # both served by _api_docs from packaged files, not a CDN
        redoc_url=None,
        # No redirect from a path with a trailing slash: Starlette would build its Location from the Host
        # header, which a client sets; such a path gets a plain 404.
        redirect_slashes=False,
    )
    app.state.normserve = state
    app.inference = InferenceEndpoint(state)
    app.access = access
    for router in ROUTERS:
        app.include_router(router)
    if worker is not None:
        app.include_router(peer_router)
    app.openapi = functools.partial(described, app)  # type: ignore[method-assign]
    _api_docs(app)
    app.add_exception_handler(ServeError, _error_handler)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _error_handler)
    return app
