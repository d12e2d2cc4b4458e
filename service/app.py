"""The app factory: ``create_app(Settings())`` gives the FastAPI app; ``python -m service`` serves it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service import __version__
from service.config import Settings
from service.errors import ServeError
from service.logs import request_id
from service.metrics import Metrics
from service.registry import Registry
from service.routes import router
from service.state import ServiceState

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _serve_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, ServeError):  # registered for ServeError only
        raise exc
    if exc.status >= 500 and exc.reason == "internal":
        log.error("%s", exc.message)
    else:
        log.debug("%d %s", exc.status, exc.message)
    return _error(exc.status, exc.message, exc.headers)


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


async def _bug(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error in %s %s", request.method, request.url.path)
    return _error(500, f"internal server error (request id {request_id.get()}); the server log has the details")


def create_app(settings: Settings) -> FastAPI:
    """Build the app; models load and warm in its lifespan, before readiness turns true."""
    metrics = Metrics()
    state = ServiceState(settings, metrics, Registry(settings, metrics))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.registry.load_all()
        state.started = True
        served = sum(v.served is not None for e in state.registry.models.values() for v in e.versions.values())
        log.info("serving %d model versions from %s", served, settings.repository)
        for reason in state.not_ready_reasons():
            log.error("not ready: %s", reason)
        try:
            yield
        finally:
            state.shutting_down = True
            await state.registry.close()  # every accepted request finishes first
            log.info("stopped")

    app = FastAPI(
        title="normserve",
        version=__version__,
        summary="BatchNorm-folded ONNX models over the Open Inference Protocol (KServe v2)",
        lifespan=lifespan,
    )
    app.state.normserve = state
    app.include_router(router)
    app.add_exception_handler(ServeError, _serve_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _bug)
    return app
