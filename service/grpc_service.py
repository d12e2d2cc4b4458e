"""The KServe v2 gRPC service as Triton extends it (``inference.GRPCInferenceService``), and gRPC health.

It runs in the HTTP server's process and event loop (grpc.aio), on NORMSERVE_GRPC_PORT (8001, as Triton;
0 turns it off), and calls what HTTP calls: the same registry, batchers and runtimes, the same checks of a
request (``service.protocol.check_infer_document``, after the request is put in the JSON protocol's form)
and the same messages, the same API key and model control rules. A ServeError becomes the status code of
its HTTP status (``CODES``) with the message HTTP would give; anything else is a bug, answered INTERNAL
with the request id, as HTTP's 500.

The messages and the servicer base class are those Triton's own client ships generated
(``tritonclient.grpc.service_pb2``, ``model_config_pb2``, ``service_pb2_grpc``): one copy of the protos in
the process, so a test may run ``tritonclient.grpc`` beside the server.

Outputs always go back as ``raw_output_contents``, in the order of the response's ``outputs``, as Triton
answers and as tritonclient decodes them; classification outputs as BYTES (4-byte length, then the
string). A request's deadline is the earliest of its gRPC deadline, its ``timeout`` parameter
(microseconds) and NORMSERVE_REQUEST_TIMEOUT_MS.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
import orjson
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import model_config_pb2, service_pb2_grpc
from tritonclient.grpc import service_pb2 as pb

from service import __version__
from service.access import Access
from service.config import EndpointGroup
from service.errors import InvalidInput, ServeError, render
from service.logs import request_id
from service.protocol import InferRequest, bytes_tensor, check_infer_document, top_classes
from service.registry import ServedVersion
from service.routes.health import EXTENSIONS, config_document, metadata_document
from service.routes.inference import count_failure
from service.routes.repository_api import index_rows, load_model, unload_model
from service.routes.statistics import server_statistics
from service.state import ServiceState

__all__ = ["CODES", "GrpcServer", "HealthServicer", "InferenceServicer", "grpc_document"]

log = logging.getLogger(__name__)

# The gRPC status of each HTTP status a ServeError carries (any other: INTERNAL).
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
SERVICE = "inference.GRPCInferenceService"
WATCH_EVERY_S = 1.0  # how often a health Watch looks for a change
_ids = itertools.count(1)

# Where each datatype's values are in InferTensorContents (FP16 and BF16 have none: raw only).
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def _parameter(value: Any) -> Any:
    """An InferParameter (or a ModelRepositoryParameter) as the JSON protocol has it: its one set field."""
    which = value.WhichOneof("parameter_choice")
    return None if which is None else getattr(value, which)


def _parameters(parameters: Any) -> dict[str, Any]:
    return {key: _parameter(value) for key, value in parameters.items()}


def grpc_document(request: pb.ModelInferRequest) -> tuple[dict[str, Any], memoryview]:
    """A ModelInferRequest in the JSON protocol's form: the document and the binary tensors after it, so that
    ``check_infer_document`` checks it as it checks an HTTP request. Raw inputs (``raw_input_contents``, one
    per input, in order) become binary tensors; typed ``contents`` become ``data``."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; expected one per input, "
            "in the order of inputs"
        )
    inputs = []
    for i, tensor in enumerate(request.inputs):
        document: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        parameters = _parameters(tensor.parameters)
        parameters.pop("binary_data_size", None)  # HTTP's; a raw input's size is its own
        has_contents = tensor.HasField("contents")
        if raw:
            if has_contents:
                raise InvalidInput(f"input '{tensor.name}' has both contents and raw_input_contents; send one")
            parameters["binary_data_size"] = len(raw[i])
        elif has_contents:
            field = _CONTENTS.get(tensor.datatype)
            document["data"] = list(getattr(tensor.contents, field)) if field else []
            if tensor.datatype in ("FP32", "FP64") and not all(map(math.isfinite, document["data"])):
                raise InvalidInput(f"input '{tensor.name}' holds NaN or Infinity values; expected finite numbers")
        else:
            raise InvalidInput(f"input '{tensor.name}' has neither contents nor raw_input_contents")
        if parameters:
            document["parameters"] = parameters
        inputs.append(document)
    doc: dict[str, Any] = {"inputs": inputs, "parameters": _parameters(request.parameters)}
    if request.id:
        doc["id"] = request.id
    if request.outputs:
        doc["outputs"] = [{"name": o.name, "parameters": _parameters(o.parameters)} for o in request.outputs]
    return doc, memoryview(b"".join(raw) if len(raw) != 1 else raw[0])


def _response(served: ServedVersion, request: InferRequest, outputs: dict[str, np.ndarray]) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=served.config.name, model_version=served.version.number)
    if request.id is not None:
        response.id = request.id
    datatypes = served.output_datatypes
    for requested in request.outputs:
        array = outputs[requested.name]
        if requested.classification:
            classes = top_classes(array, requested.classification, served.config.labels)
            response.outputs.add(
                name=requested.name, datatype="BYTES", shape=[array.shape[0], requested.classification]
            )
            response.raw_output_contents.append(bytes_tensor(classes))
        else:
            response.outputs.add(name=requested.name, datatype=datatypes[requested.name], shape=list(array.shape))
            response.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
    return response


async def infer(state: ServiceState, request: pb.ModelInferRequest, remaining_s: float | None) -> pb.ModelInferResponse:
    """``service.routes.inference.infer`` for a gRPC request: the same lookups, admission, checks, batcher and
    metrics. ``remaining_s``: the time left to its gRPC deadline (None: none set)."""
    started = time.perf_counter()
    request_id.set(request.id or f"g{next(_ids)}")
    model_name, version = request.model_name, request.model_version or None
    served: ServedVersion | None = None
    server_timeout_s = state.settings.request_timeout_ms / 1000
    try:
        served = state.registry.get(model_name, version)
        served.batcher.admit(server_timeout_s)
        doc, binary = grpc_document(request)
        parsed = check_infer_document(doc, binary, served.config, served.batching.max_batch_size)
        deadline = parsed.deadline(server_timeout_s)
        if remaining_s is not None:
            deadline = min(deadline, time.monotonic() + remaining_s)
        outputs = await served.batcher.submit(parsed.feeds, parsed.rows, deadline)
        response = _response(served, parsed, dict(zip(served.runtime.output_names, outputs, strict=True)))
    except ServeError as e:
        count_failure(state, served.metrics if served else None, model_name, e.reason, protocol="grpc")
        raise
    except Exception:
        count_failure(state, served.metrics if served else None, model_name, "internal", protocol="grpc")
        raise
    served.metrics.succeeded(started, "grpc")
    return response


def _metadata(context: grpc.aio.ServicerContext) -> list[tuple[bytes, bytes]]:
    """The call's metadata as HTTP headers are held (``service.access`` reads either)."""
    return [
        (key.encode("latin-1"), value if isinstance(value, bytes) else value.encode("latin-1"))
        for key, value in context.invocation_metadata() or ()
    ]


def _answer(exc: Exception) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """What a call that raised ``exc`` answers: the gRPC code of its HTTP status, HTTP's message, and its
    headers (Retry-After, WWW-Authenticate) as trailing metadata. ``render`` logs what is a bug."""
    status, headers, body = render(exc)
    trailers = tuple((k.lower(), v) for k, v in headers.items())
    return CODES.get(status, grpc.StatusCode.INTERNAL), orjson.loads(body)["error"], trailers


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    """End the call with ``exc``'s answer (``context.abort`` raises)."""
    code, message, trailers = _answer(exc)
    if trailers:
        context.set_trailing_metadata(trailers)
    await context.abort(code, message)


def _call(group: EndpointGroup | None, control: bool = False) -> Callable[[Handler], Handler]:
    """A method of the service: the access check of its endpoint group first (``control``: a load or unload,
    which model control's mode must allow), and every error answered as ``_answer`` says."""

    def wrap(method: Handler) -> Handler:
        @functools.wraps(method)
        async def run(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                self.access.check_call(group, method.__name__, _metadata(context), control)
                return await method(self, request, context)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                await _abort(context, e)

        return run  # type: ignore[return-value]

    return wrap


def _tensors(specs: list[dict[str, Any]]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [
        pb.ModelMetadataResponse.TensorMetadata(name=s["name"], datatype=s["datatype"], shape=s["shape"]) for s in specs
    ]


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]  # generated, untyped
    """``inference.GRPCInferenceService``; what it does not implement answers UNIMPLEMENTED (the base's)."""

    def __init__(self, state: ServiceState, access: Access) -> None:
        self.state, self.access = state, access

    @_call(None)
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_call(None)
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=not self.state.not_ready_reasons())

    @_call("metadata")
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        try:
            self.state.registry.get(request.name, request.version or None)
        except ServeError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=not self.state.draining)

    @_call("metadata")
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="normserve", version=__version__, extensions=EXTENSIONS)

    @_call("metadata")
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        doc = metadata_document(self.state.registry.entry(request.name), request.version or None)
        return pb.ModelMetadataResponse(
            name=doc["name"],
            versions=doc["versions"],
            platform=doc["platform"],
            inputs=_tensors(doc["inputs"]),
            outputs=_tensors(doc["outputs"]),
        )

    @_call("metadata")
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        doc = config_document(self.state.registry.entry(request.name), request.version or None)
        config = json_format.ParseDict(doc, model_config_pb2.ModelConfig(), ignore_unknown_fields=True)
        return pb.ModelConfigResponse(config=config)

    @_call("metadata")
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        stats = await server_statistics(self.state, request.name or None, request.version or None)
        return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

    @_call("inference")
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        return await infer(self.state, request, context.time_remaining())

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton's streaming inference: each request on the stream is served as it comes (so requests of one
        stream batch together), and each answer goes back when it is ready, named by its request's ``id``. A
        request that fails gets a message with its ``error_message`` (HTTP's message) and the stream goes on;
        the access check comes once, when the stream opens."""
        try:
            self.access.check_call("inference", "ModelStreamInfer", _metadata(context))
        except ServeError as e:
            await _abort(context, e)
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def serve(request: pb.ModelInferRequest) -> None:
            try:
                response = await infer(self.state, request, context.time_remaining())
                await answers.put(pb.ModelStreamInferResponse(infer_response=response))
            except Exception as e:
                failed = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                await answers.put(pb.ModelStreamInferResponse(error_message=_answer(e)[1], infer_response=failed))

        async def read() -> None:
            async for request in requests:
                task = asyncio.create_task(serve(request))
                running.add(task)
                task.add_done_callback(running.discard)
            while running:  # the client is done sending: the answers still owed go out first
                await asyncio.wait(set(running))
            await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
        finally:
            reader.cancel()
            for task in running:
                task.cancel()

    @_call("model_control")
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        rows = index_rows(self.state.registry)
        if request.ready:
            rows = [row for row in rows if row["state"] == "READY"]
        models = [
            pb.RepositoryIndexResponse.ModelIndex(
                name=row["name"], version=row.get("version", ""), state=str(row["state"]), reason=row["reason"] or ""
            )
            for row in rows
        ]
        return pb.RepositoryIndexResponse(models=models)

    @_call("model_control", control=True)
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        await load_model(self.state, request.model_name, context.peer())
        return pb.RepositoryModelLoadResponse()

    @_call("model_control", control=True)
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        await unload_model(self.state, request.model_name, context.peer())
        return pb.RepositoryModelUnloadResponse()


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # generated, untyped
    """``grpc.health.v1.Health``, as Kubernetes' gRPC probes ask it: the server ("" or the inference
    service's name) serves when it is ready, as /v2/health/ready says; a model's name serves when a version
    of it is ready. Both turn NOT_SERVING when the server drains."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state

    def status(self, service: str) -> int | None:
        """The service's status, None for a name that is neither the server's nor a model's."""
        serving, not_serving = (
            int(health_pb2.HealthCheckResponse.SERVING),
            int(health_pb2.HealthCheckResponse.NOT_SERVING),
        )
        if service in ("", SERVICE):
            return not_serving if self.state.not_ready_reasons() else serving
        entry = self.state.registry.models.get(service)
        if entry is None:
            return None
        return serving if entry.latest_ready() is not None and not self.state.draining else not_serving

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> health_pb2.HealthCheckResponse:
        status = self.status(request.service)
        if status is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no service {request.service[:100]!r}; ask for '' or {SERVICE!r} (the server) or a model's name",
            )
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            status = self.status(request.service)
            status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN if status is None else status
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(WATCH_EVERY_S)


class GrpcServer:
    """The gRPC server of one app, started and stopped in its lifespan."""

    def __init__(self, state: ServiceState, access: Access) -> None:
        self.state, self.access = state, access
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        settings = self.state.settings
        limit = settings.grpc_max_message_bytes or settings.max_body_bytes
        options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
        # Worker processes share the port (the kernel spreads connections); a lone server does not, so that
        # one started on a port another server holds fails instead of sharing it.
        options.append(("grpc.so_reuseport", 1 if self.state.worker is not None else 0))
        if settings.grpc_max_connection_age_s is not None:
            # A connection past its age is sent GOAWAY; its calls in flight get the shutdown timeout to finish.
            options.append(("grpc.max_connection_age_ms", round(settings.grpc_max_connection_age_s * 1000)))
            options.append(("grpc.max_connection_age_grace_ms", round(settings.shutdown_timeout_s * 1000)))
        server = grpc.aio.server(options=options)
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.state, self.access), server)
        health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(self.state), server)
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        address = f"{host}:{settings.grpc_port}"
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as e:
            raise RuntimeError(
                f"could not listen for gRPC on {address} ({e}): is another server on it? Set NORMSERVE_GRPC_PORT "
                "to another port, or to 0 to serve HTTP only"
            ) from None
        await server.start()
        self.server = server
        log.info("gRPC (KServe v2, grpc.health.v1) on %s, messages up to %d bytes", address, limit)

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, let those in flight finish within ``grace_s``, then stop."""
        if self.server is not None:
            await self.server.stop(grace_s)
            self.server = None
