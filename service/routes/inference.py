"""POST /v2/models/{m}[/versions/{v}]/infer: the hot path.

The endpoint takes the raw request rather than a pydantic body: parsing nested JSON lists into
models costs more than the inference of a small model. protocol.py checks every field by hand.
"""

from __future__ import annotations

import itertools
import time
import zlib

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.errors import InvalidInput, PayloadTooLarge, ServeError, UnsupportedMediaType
from service.logs import request_id
from service.protocol import (
    HEADER_LENGTH,
    InferenceRequestSchema,
    InferenceResponseSchema,
    encode_infer_response,
    parse_infer_request,
)
from service.registry import ServedVersion
from service.state import ServiceState, service_state

__all__ = ["read_body", "router"]

router = APIRouter(tags=["inference"])

_ACCEPTED_TYPES = ("application/json", "application/octet-stream")
_ACCEPTED_ENCODINGS = ("identity", "gzip", "deflate")
_ids = itertools.count(1)

_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": InferenceRequestSchema.model_json_schema()}},
    },
    "responses": {"200": {"content": {"application/json": {"schema": InferenceResponseSchema.model_json_schema()}}}},
}


def _check_content_type(request: Request) -> None:
    content_type = request.headers.get("content-type")
    if content_type is not None:
        media = content_type.partition(";")[0].strip().lower()
        if media not in _ACCEPTED_TYPES:
            raise UnsupportedMediaType(
                f"Content-Type {content_type!r} is not supported; send application/json "
                "(or application/octet-stream with Inference-Header-Content-Length for binary data)"
            )
    encoding = request.headers.get("content-encoding")
    if encoding is not None and encoding.strip().lower() not in _ACCEPTED_ENCODINGS:
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported; send the body uncompressed, or as gzip or deflate"
        )


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Inflate a gzip or deflate (zlib) body, refusing with 413 once it passes ``limit`` bytes."""
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # 32: detect the gzip or zlib header
    try:
        body = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise InvalidInput(
            f"the body is not valid {encoding} data ({e}); expected what Content-Encoding says"
        ) from None
    if len(body) > limit:
        raise PayloadTooLarge(
            f"the body inflates past {limit} bytes, the most this server accepts (NORMSERVE_MAX_BODY_BYTES)"
        )
    if not inflater.eof:
        raise InvalidInput(f"the {encoding} body is truncated; expected a complete {encoding} stream")
    return body


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    advice = "send fewer rows per request, or binary data, which is about 4x smaller than JSON"
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise InvalidInput(f"Content-Length is {declared!r}; expected a number of bytes")
        if int(declared) > limit:
            raise PayloadTooLarge(
                f"the body is {declared} bytes; this server accepts at most {limit} "
                f"(NORMSERVE_MAX_BODY_BYTES): {advice}"
            )
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(
                f"the body passed {limit} bytes, the most this server accepts (NORMSERVE_MAX_BODY_BYTES): {advice}"
            )
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _infer(state: ServiceState, request: Request, model_name: str, model_version: str | None) -> Response:
    request_id.set(request.headers.get("x-request-id") or f"r{next(_ids)}")
    served: ServedVersion | None = None
    try:
        _check_content_type(request)
        body = await read_body(request, state.settings.max_body_bytes)
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            body = _decompress(body, encoding, state.settings.max_body_bytes)
        # No await from here to submit: a reload cannot retire the version between lookup and queueing.
        served = state.registry.get(model_name, model_version)
        infer = parse_infer_request(
            body, request.headers.get(HEADER_LENGTH), served.config, served.batching.max_batch_size
        )
        timeout = infer.timeout_s if infer.timeout_s is not None else state.settings.request_timeout_ms / 1000
        outputs = await served.batcher.submit(infer.feeds, infer.rows, time.monotonic() + timeout)
    except ServeError as e:
        _count_failure(state, served, model_name, e.reason)
        raise
    except Exception:
        _count_failure(state, served, model_name, "internal")
        raise
    datatypes = {s.name: s.datatype for s in served.config.outputs}
    content, header_length = encode_infer_response(
        model_name,
        served.version.version,
        infer,
        dict(zip(served.runtime.output_names, outputs, strict=True)),
        datatypes,
    )
    served.metrics.success.inc()
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content, media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(header_length)}
    )


def _count_failure(state: ServiceState, served: ServedVersion | None, model_name: str, reason: str) -> None:
    """Label a failure with the version that served, else the model if it exists: never with a name the
    client made up, which would add a time series per typo."""
    if served is not None:
        served.metrics.failure(reason)
    else:
        state.metrics.failure(model_name if model_name in state.registry.models else "", "", reason)


@router.post("/v2/models/{model_name}/infer", summary="Infer with the newest ready version", openapi_extra=_OPENAPI)
async def infer(request: Request, model_name: str) -> Response:
    return await _infer(service_state(request), request, model_name, None)


@router.post(
    "/v2/models/{model_name}/versions/{model_version}/infer", summary="Infer with one version", openapi_extra=_OPENAPI
)
async def infer_version(request: Request, model_name: str, model_version: str) -> Response:
    return await _infer(service_state(request), request, model_name, model_version)
