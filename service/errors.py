"""One exception hierarchy for everything a request can fail with; one handler turns it into HTTP.

Domain code (protocol, batcher, registry) raises these and never an HTTPException. Every message
says what was wrong and what was expected; the client receives it as ``{"error": "<message>"}``.
"""

from __future__ import annotations

import logging

import orjson

from service.logs import request_id

__all__ = [
    "BatchFailed",
    "ClientDisconnected",
    "DeadlineExceeded",
    "Forbidden",
    "InvalidInput",
    "ModelNotFound",
    "NotReady",
    "Overloaded",
    "PayloadTooLarge",
    "ServeError",
    "Unauthorized",
    "UnsupportedMediaType",
    "render",
]

log = logging.getLogger(__name__)


class ServeError(Exception):
    """Base of every error a client can receive. ``reason`` labels the failure in metrics."""

    status: int = 500
    reason: str = "internal"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidInput(ServeError):
    """The request is malformed or does not match the model's declared inputs and outputs."""

    status = 400
    reason = "invalid_input"


class Unauthorized(ServeError):
    """The endpoint needs the API key, and the request did not carry it (or carried another)."""

    status = 401
    reason = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, {"WWW-Authenticate": 'Bearer realm="normserve"'})


class Forbidden(ServeError):
    """The server does not allow this, whoever asks: model control turned off, a cross-origin control request."""

    status = 403
    reason = "forbidden"


class ModelNotFound(ServeError):
    """No such model, or no such version of it, in the repository."""

    status = 404
    reason = "not_found"


class PayloadTooLarge(ServeError):
    status = 413
    reason = "too_large"


class UnsupportedMediaType(ServeError):
    status = 415
    reason = "unsupported_media_type"


class NotReady(ServeError):
    """The model (or the server) exists but cannot serve now: loading, failed to load, shutting down."""

    status = 503
    reason = "not_ready"


class Overloaded(ServeError):
    """The model's queue is full; the request was refused at once, never queued."""

    status = 503
    reason = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, {"Retry-After": str(retry_after_s)})


class ClientDisconnected(ServeError):
    """The client went (or the server closed its connection) before the request was read; nobody hears this."""

    status = 499  # nginx's "client closed request"
    reason = "disconnected"


class DeadlineExceeded(ServeError):
    """The request's deadline passed before it could run; it was not run."""

    status = 504
    reason = "deadline"


class BatchFailed(ServeError):
    """onnxruntime raised while running a batch of validated inputs: a bug, answered as 500."""


def render(exc: Exception) -> tuple[int, dict[str, str], bytes]:
    """The one mapping from an exception to what the client receives: status, headers, JSON body.

    A ServeError carries its status and message. Anything else is a bug: it is logged with its
    traceback and the client gets a 500 naming the request id, never the traceback.
    """
    if isinstance(exc, ServeError):
        log.log(logging.ERROR if exc.status == 500 else logging.DEBUG, "%d %s", exc.status, exc.message)
        return exc.status, exc.headers, orjson.dumps({"error": exc.message})
    log.error("unhandled error", exc_info=exc)
    message = f"internal server error (request id {request_id.get()}); the server log has the details"
    return 500, {}, orjson.dumps({"error": message})
