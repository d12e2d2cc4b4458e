"""POST /v2/models/{m}[/versions/{v}]/infer: the hot path.

``InferenceEndpoint`` is a plain ASGI handler that the app calls ahead of FastAPI's middleware and
router (see ``service.app.NormserveApp``): for a small model those layers would cost more than the
inference itself. It reads the raw body, never a pydantic model: protocol.py checks every field by
hand. The FastAPI routes below document the same paths in OpenAPI and call the same ``infer``, so
they answer correctly wherever the fast path is not in front (an app mounted under a prefix).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import re
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from time import perf_counter

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from service.batcher import Waiter
from service.bodies import Reservation
from service.errors import (
    ClientDisconnected,
    InvalidInput,
    Overloaded,
    PayloadTooLarge,
    ServeError,
    UnsupportedMediaType,
    render,
)
from service.intake import Intake
from service.logs import request_id
from service.metrics import Metrics, ModelMetrics
from service.openapi import schema_ref
from service.protocol import (
    InferenceRequestSchema,
    InferenceResponseSchema,
    InferRequest,
    encode_infer_response,
    parse_infer_request,
)
from service.registry import ServedVersion
from service.state import ServiceState, service_state

__all__ = [
    "OPENAPI_REQUEST",
    "InferenceCall",
    "InferenceEndpoint",
    "RequestHeaders",
    "asgi_error",
    "count_failure",
    "infer",
    "read_request_body",
    "response_headers",
    "router",
    "send_response",
]

router = APIRouter(tags=["inference"])

_ACCEPTED_TYPES = ("application/json", "application/octet-stream")
_ACCEPTED_ENCODINGS = ("identity", "gzip", "deflate")
_TOO_LARGE_ADVICE = "send fewer rows per request, or binary data, which is about 4x smaller than JSON"
_ids = itertools.count(1)


class RequestHeaders:
    """The few request headers inference reads, taken from the ASGI scope in one pass. (A plain class:
    inference.pxd makes it an extension type when compiled, which a dataclass cannot be.)"""

    __slots__ = ("content_encoding", "content_length", "content_type", "header_length", "request_id")

    def __init__(
        self,
        content_type: str | None = None,
        content_length: str | None = None,
        content_encoding: str | None = None,
        header_length: str | None = None,  # Inference-Header-Content-Length
        request_id: str | None = None,
    ) -> None:
        self.content_type, self.content_length, self.content_encoding = content_type, content_length, content_encoding
        self.header_length, self.request_id = header_length, request_id

    @classmethod
    def from_raw(cls, raw: Iterable[tuple[bytes, bytes]]) -> RequestHeaders:
        # Compared name by name (compiled: a length test first, then the bytes), not looked up by name in a
        # table and set by name: each of a request's headers is tried here.
        content_type = content_length = content_encoding = header_length = request_id = None
        for key, value in raw:  # ASGI header names are lower-case
            if key == b"content-type":
                content_type = value.decode("latin-1")
            elif key == b"content-length":
                content_length = value.decode("latin-1")
            elif key == b"content-encoding":
                content_encoding = value.decode("latin-1")
            elif key == b"inference-header-content-length":
                header_length = value.decode("latin-1")
            elif key == b"x-request-id":
                request_id = value.decode("latin-1")
        return cls(content_type, content_length, content_encoding, header_length, request_id)


def _content_encoding(content_type: str | None, content_encoding: str | None) -> str:
    """The body's encoding, once the media type and encoding are known to be ones we read (415 otherwise)."""
    if content_type is not None:
        media = content_type.partition(";")[0].strip().lower()
        if media not in _ACCEPTED_TYPES:
            raise UnsupportedMediaType(
                f"Content-Type {content_type!r} is not supported; send application/json "
                "(or application/octet-stream with Inference-Header-Content-Length for binary data)"
            )
    encoding = (content_encoding or "identity").strip().lower()
    if encoding not in _ACCEPTED_ENCODINGS:
        raise UnsupportedMediaType(
            f"Content-Encoding {content_encoding!r} is not supported; send the body uncompressed, or as gzip or deflate"
        )
    return encoding


@dataclass(frozen=True)
class BodyLimit:
    """How large a body may be, the setting that says so, and what to do instead."""

    bytes: int
    setting: str = "NORMSERVE_MAX_BODY_BYTES"
    advice: str = _TOO_LARGE_ADVICE


class BodyReader:
    """A request body as it arrives, refused with 413 as soon as it is known to exceed the limit: from its
    Content-Length before any of it is read (``request_body_reader``), or while it streams in (``add``). With a
    ``reservation``, its bytes are taken from the server's body budget first (503 past it)."""

    __slots__ = ("chunks", "limit", "reservation", "size")

    def __init__(self, limit: BodyLimit, reservation: Reservation | None = None) -> None:
        self.limit, self.reservation = limit, reservation
        self.chunks: list[bytes] = []
        self.size = 0

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        limit = self.limit
        if self.size > limit.bytes:
            raise PayloadTooLarge(
                f"the body passed {limit.bytes} bytes, the most this server accepts ({limit.setting}): {limit.advice}"
            )
        if self.reservation is not None and self.size > self.reservation.size:
            self.reservation.take(self.size - self.reservation.size)
        self.chunks.append(chunk)

    def body(self) -> bytes:
        chunks = self.chunks
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _decompress(body: bytes, encoding: str, limit: BodyLimit) -> bytes:
    """Inflate a gzip or deflate (zlib) body, refusing with 413 once it passes the limit."""
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # 32: detect the gzip or zlib header
    try:
        body = inflater.decompress(body, limit.bytes + 1)
    except zlib.error as e:
        raise InvalidInput(
            f"the body is not valid {encoding} data ({e}); expected what Content-Encoding says"
        ) from None
    if len(body) > limit.bytes:
        raise PayloadTooLarge(
            f"the body inflates past {limit.bytes} bytes, the most this server accepts ({limit.setting}): "
            f"{limit.advice}"
        )
    if not inflater.eof:
        raise InvalidInput(f"the {encoding} body is truncated; expected a complete {encoding} stream")
    if inflater.unused_data:
        raise InvalidInput(
            f"{len(inflater.unused_data)} bytes follow the end of the {encoding} stream; expected one stream"
        )
    return body


def _body_limit(max_body_bytes: int, max_json_bytes: int, binary: bool) -> BodyLimit:
    """A request with binary tensors may be NORMSERVE_MAX_BODY_BYTES; one all JSON only NORMSERVE_MAX_JSON_BYTES.

    The JSON parser runs on the event loop and holds it (and the GIL: a thread would not help) for
    about 20 ms a megabyte on one core, so one 60 MB JSON body would hold every other request, health
    checks included, for more than a second. Binary tensors are copied, not parsed.
    """
    if binary or max_json_bytes >= max_body_bytes:
        return BodyLimit(max_body_bytes)
    return BodyLimit(
        max_json_bytes,
        "NORMSERVE_MAX_JSON_BYTES, for a body that is all JSON",
        "send the tensors as binary data (Triton's binary data extension: a JSON header, "
        "Inference-Header-Content-Length, then the raw bytes), which is about 4x smaller and is not parsed, "
        "or fewer rows per request",
    )


def _check_json_header(
    max_json_bytes: int, header_length: str | None, content_length: str | None, encoding: str
) -> None:
    """The JSON part of a request with binary tensors is held to NORMSERVE_MAX_JSON_BYTES too, from its head.

    Its length is in Inference-Header-Content-Length before any of the body is read. Without this check a
    request claiming its whole body as its "header" would have a body-sized JSON document parsed on the
    event loop, which the JSON limit exists to prevent.
    """
    value = header_length
    if value is None:
        return
    size = _count(value)
    if not (size is not None and size > 0):
        raise InvalidInput(
            f"Inference-Header-Content-Length is {value[:40]!r}; expected the length in bytes of the JSON header "
            "at the start of the body"
        )
    if size > max_json_bytes:
        raise PayloadTooLarge(
            f"the JSON header is {_shown(value)} bytes (Inference-Header-Content-Length); this server parses at most "
            f"{max_json_bytes} bytes of JSON (NORMSERVE_MAX_JSON_BYTES): send the tensors' values as the "
            "binary data after the header, not in it"
        )
    declared = content_length
    if encoding == "identity" and declared is not None and (declared_size := _count(declared)) is not None:
        if size > declared_size:
            raise InvalidInput(
                f"Inference-Header-Content-Length is {size}, more than the body's Content-Length of {declared}; "
                "expected the length of the JSON header at the start of the body"
            )


def _declared_size(limit: BodyLimit, declared: str | None) -> int | None:
    """The body's Content-Length (None: chunked, or none sent), refused with 413 past the limit."""
    if declared is None:
        return None
    size = _count(declared)
    if size is None:
        raise InvalidInput(f"Content-Length is {declared[:40]!r}; expected a number of bytes")
    if size > limit.bytes:
        raise PayloadTooLarge(
            f"the body is {_shown(declared)} bytes; this server accepts at most {limit.bytes} ({limit.setting}): "
            f"{limit.advice}"
        )
    return size


_COUNT_DIGITS = 18  # a count of more digits is past every limit (and Python refuses int() past 4,300 digits)


def _count(value: str) -> int | None:
    """A header's count of bytes (decimal digits only), or None where it is not one; a count longer than
    ``_COUNT_DIGITS`` digits reads as 10**18, past every limit, without converting it."""
    if not (value.isascii() and value.isdigit()):
        return None
    return int(value) if len(value) <= _COUNT_DIGITS else 10**_COUNT_DIGITS


def _shown(count: str) -> str:
    """A count the client sent, as an error message shows it: cut at 40 digits."""
    return count if len(count) <= 40 else f"{count[:40]}... ({len(count)} digits)"


_KEPT_HEAD_CHARS = 256  # Content-Type and Content-Encoding together, in a head whose checks are kept


@functools.lru_cache(maxsize=512)  # a refused head raises, and is not kept
def _head_checks(
    max_body_bytes: int,
    max_json_bytes: int,
    content_type: str | None,
    content_encoding: str | None,
    content_length: str | None,
    header_length: str | None,
) -> tuple[BodyLimit, str, int | None]:
    """What an inference request's head says of its body, checked: the body's limit, its encoding and its
    declared size. It depends on these four headers alone, which a client sends the same again and again
    (a body's length varies over a few hundred values at most): each combination is worked out once."""
    encoding = _content_encoding(content_type, content_encoding)
    _check_json_header(max_json_bytes, header_length, content_length, encoding)
    limit = _body_limit(max_body_bytes, max_json_bytes, header_length is not None)
    return limit, encoding, _declared_size(limit, content_length)


def request_body_reader(
    state: ServiceState, headers: RequestHeaders, reservation: Reservation | None
) -> tuple[BodyReader, str]:
    """From an inference request's head: the reader of its body, within the size limit, and its encoding.
    415 for a content type or encoding this server does not read, 413 or 400 for a Content-Length past
    the limit or a JSON header over NORMSERVE_MAX_JSON_BYTES or past the body; 503 for a body that would pass
    the server's budget of bodies held at once (``reservation``)."""
    settings = state.settings
    # Only heads of the usual size are kept: a client sending a new long Content-Type with each request would
    # otherwise have the cache hold 512 of them.
    short = len(headers.content_type or "") + len(headers.content_encoding or "") <= _KEPT_HEAD_CHARS
    limit, encoding, declared = (_head_checks if short else _head_checks.__wrapped__)(
        settings.max_body_bytes,
        settings.max_json_bytes,
        headers.content_type,
        headers.content_encoding,
        headers.content_length,
        headers.header_length,
    )
    if declared is not None and reservation is not None:
        reservation.take(declared, whole=True)
    return BodyReader(limit, reservation), encoding


def inflated(reader: BodyReader, encoding: str) -> bytes:
    """The whole body ``reader`` read, inflated (within the limit and the budget) if it is compressed."""
    body = reader.body()
    if encoding != "identity":
        body = _decompress(body, encoding, reader.limit)
        if (reservation := reader.reservation) is not None:
            reservation.take(max(0, len(body) - reservation.size))
    return body


async def receive_body(receive: Receive, add: Callable[[bytes], None]) -> None:
    """Each chunk of the body from ASGI's ``receive`` to ``add``, to its end."""
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":  # not the end of the body: the rest will never come
            raise ClientDisconnected("the connection closed before the request body was complete")
        add(message.get("body", b""))
        more = message.get("more_body", False)


async def read_request_body(
    state: ServiceState, headers: RequestHeaders, receive: Receive, reservation: Reservation
) -> bytes:
    """The body of an inference request (``request_body_reader``'s checks), read from ASGI's ``receive``."""
    reader, encoding = request_body_reader(state, headers, reservation)
    await receive_body(receive, reader.add)
    return inflated(reader, encoding)


def count_failure(
    state: ServiceState,
    served: ModelMetrics | None,
    model_name: str,
    reason: str,
    family: Metrics | None = None,
    protocol: str = "http",
) -> None:
    """Label a failure with the version that served (its metric children ``served``), else with the model
    if it exists: never with a name the client made up, which would add a time series per typo.
    ``family`` is where the unlabelled failures go (the server's main metrics by default)."""
    if served is not None:
        served.failure(reason, protocol)
    else:
        name = model_name if model_name in state.registry.models else ""
        (family or state.metrics).failure(name, "", reason, protocol)


class InferenceCall:
    """One inference request over HTTP, in the steps both of its drivers take: the ASGI endpoint (``infer``),
    which awaits, and the connection itself (``service.transport``), which calls back and runs no task.

    ``begin`` from the request's head (the model looked up and its queue asked, the head's checks made:
    refused before any of the body is read), ``add`` for each chunk of the body, ``submit`` once it is whole
    (queued: its batcher's future), ``answer`` with the outputs (the response body, and the length of its
    JSON header when binary tensors follow it); ``fail`` with what went wrong, and ``end`` however it ends.
    Each step raises ServeError for anything the client should hear about.
    """

    __slots__ = ("encoding", "headers", "model", "reader", "request", "reservation", "served", "started", "state",
                 "version")  # fmt: skip

    def __init__(self, state: ServiceState, model: str, version: str | None, headers: RequestHeaders) -> None:
        self.started = perf_counter()
        self.state, self.model, self.version, self.headers = state, model, version, headers
        self.served: ServedVersion | None = None
        self.request: InferRequest | None = None
        self.reservation = Reservation(state.bodies)

    def begin(self, admitted: ServedVersion | None = None) -> None:
        """``admitted``: the version ``InferenceEndpoint.admission`` looked up and admitted this request to, in
        the same step (nothing can have changed since): not asked again."""
        request_id.set(self.headers.request_id or f"r{next(_ids)}")
        state = self.state
        # Refused before the body is read or parsed: an unknown model, or a full queue under overload.
        if admitted is None:
            admitted = state.registry.get(self.model, self.version)
            admitted.batcher.admit(state.settings.request_timeout_ms / 1000)
        self.served = admitted
        self.reader, self.encoding = request_body_reader(state, self.headers, self.reservation)

    def add(self, chunk: bytes) -> None:
        self.reader.add(chunk)

    def submit(self) -> asyncio.Future[list[np.ndarray]]:
        """Parse the whole body and queue it: the future of its rows of every output."""
        served, request, deadline = self._parsed()
        return served.batcher.enqueue(request.feeds, request.rows, deadline)

    def submit_to(self, waiter: Waiter) -> None:
        """``submit``, with the outputs (or the error) handed to ``waiter`` (``Batcher.enqueue_to``)."""
        served, request, deadline = self._parsed()
        served.batcher.enqueue_to(request.feeds, request.rows, deadline, waiter)

    def _parsed(self) -> tuple[ServedVersion, InferRequest, float]:
        """The whole body parsed and checked: the version that serves it, the request and its deadline."""
        state = self.state
        body = inflated(self.reader, self.encoding)
        # Looked up again, and no await from here to the queue: a reload cannot retire the version between
        # lookup and queueing.
        served = self.served = state.registry.get(self.model, self.version)
        request = self.request = parse_infer_request(
            body, self.headers.header_length, served.config, served.batching.max_batch_size
        )
        return served, request, request.deadline(state.settings.request_timeout_ms / 1000)

    def answer(self, outputs: list[np.ndarray]) -> tuple[bytes, int | None]:
        """The response (``encode``), counted as a success."""
        response = self.encode(outputs)
        self.succeeded()
        return response

    def encode(self, outputs: list[np.ndarray]) -> tuple[bytes, int | None]:
        """The response body of ``outputs``, and the length of its JSON header when binary tensors follow it."""
        served, request = self.served, self.request
        assert served is not None and request is not None
        return encode_infer_response(
            self.model,
            served.version.number,
            request,
            dict(zip(served.runtime.output_names, outputs, strict=True)),
            served.output_datatypes,
            served.config.labels,
        )

    def succeeded(self) -> None:
        assert self.served is not None
        self.served.metrics.succeeded(self.started)

    def fail(self, error: BaseException) -> None:
        """Count it: a ServeError by its reason, any other exception as internal (a cancelled wait is not
        counted: the caller went away)."""
        if isinstance(error, Exception):
            reason = error.reason if isinstance(error, ServeError) else "internal"
            count_failure(self.state, self.served.metrics if self.served else None, self.model, reason)

    def end(self) -> None:
        self.reservation.release()


async def infer(
    state: ServiceState, model_name: str, model_version: str | None, headers: RequestHeaders, receive: Receive
) -> tuple[bytes, int | None]:
    """Answer one inference request read through ASGI: the response body, and the length of its JSON header
    when binary tensors follow it. Raises ServeError for anything the client should hear about."""
    call = InferenceCall(state, model_name, model_version, headers)
    try:
        call.begin()
        await receive_body(receive, call.add)
        return call.answer(await call.submit())
    except BaseException as e:
        call.fail(e)
        raise
    finally:
        call.end()


def response_headers(body: bytes, header_length: int | None) -> list[tuple[bytes, bytes]]:
    """An inference response's headers: its content type and length, and its JSON header's length."""
    if header_length is None:
        return [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    return [
        (b"content-type", b"application/octet-stream"),
        (b"content-length", b"%d" % len(body)),
        (b"inference-header-content-length", b"%d" % header_length),
    ]


def asgi_error(exc: Exception) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """``errors.render`` for raw ASGI: the status, the headers as ASGI sends them, and the JSON body."""
    status, extra, body = render(exc)
    return status, response_headers(body, None) + [(k.lower().encode(), v.encode()) for k, v in extra.items()], body


async def send_response(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class InferenceEndpoint:
    """The ASGI handler for inference requests, called by the app before FastAPI's stack."""

    PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
    ROUTES_KEPT = 1024  # paths whose match is remembered (the models' few, unless clients make up more)

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self._routes: dict[str, tuple[str, str | None] | None] = {}

    def route(self, path: str) -> tuple[str, str | None] | None:
        """The model and version (None: the newest) an inference path names; None for any other path. The
        same few paths come again and again: each is matched once."""
        try:
            return self._routes[path]
        except KeyError:
            pass
        found = self.PATH.fullmatch(path)
        if len(self._routes) >= self.ROUTES_KEPT:
            self._routes.clear()
        route = self._routes[path] = (found[1], found[2]) if found else None
        return route

    def match(self, scope: Scope) -> tuple[str, str | None] | None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return None
        return self.route(scope["path"])

    def admission(self, path: str) -> tuple[Intake | None, ServeError | None, ServedVersion | None]:
        """For an inference request to ``path``, from its head alone, before its body is read: its model's
        intake (``service.intake``: its requests in flight, and the connections held back for it), the 503
        it gets now if its model's queue is full or would keep any request past ``DEADLINE_SHARE`` of the
        longest deadline, and the version it is admitted to (``InferenceCall.begin``'s lookup and admission,
        made: None where it is refused or not looked up). (None, None, None) for any other path, an unknown
        model or a draining server: the request goes the usual way, which also answers every other error."""
        found = self.route(path)
        if found is None or self.state.draining:
            return None, None, None
        try:
            served = self.state.registry.get(*found)
        except ServeError:
            return None, None, None
        refused = served.batcher.refusal(self.state.settings.request_timeout_ms / 1000)
        if refused is None:
            return served.batcher.intake, None, served
        if not isinstance(refused, Overloaded):
            return served.batcher.intake, None, None
        served.metrics.failure(refused.reason)
        return served.batcher.intake, refused, None

    def call(self, path: str, headers: list[tuple[bytes, bytes]]) -> InferenceCall | None:
        """The inference call of a POST to ``path`` (not begun), for a connection that answers it itself
        (``service.transport.AnsweredHere``); None for any other path."""
        found = self.route(path)
        return InferenceCall(self.state, *found, RequestHeaders.from_raw(headers)) if found else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send, model: str, version: str | None) -> None:
        try:
            body, header_length = await infer(
                self.state, model, version, RequestHeaders.from_raw(scope["headers"]), receive
            )
            status, headers = 200, response_headers(body, header_length)
        except Exception as e:
            status, headers, body = asgi_error(e)
        await send_response(send, status, headers, body)


OPENAPI_REQUEST = {
    "required": True,
    "description": "A KServe v2 inference request as JSON, or (Triton's binary data extension) its JSON header "
    "followed by the raw tensor bytes, with the header's length in Inference-Header-Content-Length. Either may be "
    "gzip or deflate encoded (Content-Encoding).",
    "content": {
        "application/json": {"schema": schema_ref(InferenceRequestSchema)},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}
_OPENAPI = {
    "requestBody": OPENAPI_REQUEST,
    "responses": {
        "200": {
            "description": "the outputs, as JSON (or a JSON header and binary outputs when asked for)",
            "content": {
                "application/json": {"schema": schema_ref(InferenceResponseSchema)},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
}


async def _infer_through_fastapi(request: Request, model_name: str, model_version: str | None) -> Response:
    headers = RequestHeaders.from_raw(request.scope["headers"])
    body, header_length = await infer(service_state(request), model_name, model_version, headers, request.receive)
    raw = response_headers(body, header_length)
    return Response(body, headers={k.decode(): v.decode() for k, v in raw if k != b"content-length"})


@router.post("/v2/models/{model_name}/infer", summary="Infer with the newest ready version", openapi_extra=_OPENAPI)
async def infer_latest(request: Request, model_name: str) -> Response:
    return await _infer_through_fastapi(request, model_name, None)


@router.post(
    "/v2/models/{model_name}/versions/{model_version}/infer", summary="Infer with one version", openapi_extra=_OPENAPI
)
async def infer_version(request: Request, model_name: str, model_version: str) -> Response:
    return await _infer_through_fastapi(request, model_name, model_version)
