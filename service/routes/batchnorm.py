"""POST /v2/models/{m}[/versions/{v}]/batchnorm: one batch with running and with batch statistics.

The request is an inference request, as ``infer`` takes it (JSON or binary tensors, every input of
the model), checked as ``infer`` checks it; what it asks of the outputs (binary data, classification)
does not apply: the answer is always JSON. The batch runs twice: through the served graph, with the
running statistics (dynamically batched with other requests, which cannot change its answer), and
through the batch-statistics graph, alone (its answer is a property of exactly this batch). The
answer is ``service.batchnorm.compare``'s, as JSON. What it compares is the 2-D output that the
model's ``bn_stats.json`` names (``logits_output``), row by row; a model without a batch dimension
(max_batch_size 0) gives the statistics of its one fixed-size batch.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from service.batcher import Feeds, Outputs
from service.batchnorm import compare, no_batch_stats_reason
from service.bodies import Reservation
from service.errors import InvalidInput, ServeError
from service.logs import request_id
from service.openapi import schema_ref
from service.protocol import parse_infer_request
from service.registry import BatchStatsGraph, ServedVersion
from service.routes.inference import OPENAPI_REQUEST, RequestHeaders, count_failure, read_request_body
from service.state import ServiceState, service_state

__all__ = ["batchnorm", "router"]

router = APIRouter(tags=["batchnorm"])
_ids = itertools.count(1)


def batch_stats_graph(served: ServedVersion) -> BatchStatsGraph:
    """The version's batch-statistics graph; 400 for a version without one, saying why (the reason its
    report gives, or its norm layers)."""
    if served.batch_stats is not None:
        return served.batch_stats
    raise InvalidInput(no_batch_stats_reason(served.version))


async def _run_both(graph: BatchStatsGraph, feeds: Feeds, rows: int, deadline: float) -> tuple[Outputs, Outputs]:
    """Run the batch through both graphs, each on a queue of the endpoint's own. Both are queued before the
    first await (a reload cannot retire one in between, as infer's lookup-to-queue path has no await
    either); if one half fails, the other is taken out of its queue, so that an answered error leaves no
    work behind."""
    running = graph.running.enqueue(feeds, rows, deadline)
    try:
        batch = graph.batcher.enqueue(feeds, rows, deadline)
    except ServeError:
        running.cancel()
        raise
    try:
        return await running, await batch
    finally:
        for future in (running, batch):
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # the failure that was not raised counts as seen, not as never retrieved


async def batchnorm(
    state: ServiceState, model_name: str, model_version: str | None, headers: RequestHeaders, request: Request
) -> bytes:
    """Answer one batchnorm request as JSON; raises ServeError for anything the client should hear about."""
    started = time.perf_counter()
    request_id.set(headers.request_id or f"bn{next(_ids)}")
    graph: BatchStatsGraph | None = None
    reservation = Reservation(state.bodies)
    try:
        # Refused from its head, before the body is read: an unknown model, one without the graph, or a full
        # queue of the endpoint's own (never infer's: a flood of this endpoint leaves inference alone).
        graph = batch_stats_graph(state.registry.get(model_name, model_version))
        for batcher in (graph.running, graph.batcher):
            batcher.admit(state.settings.request_timeout_ms / 1000)
        body = await read_request_body(state, headers, request.receive, reservation)
        served = state.registry.get(model_name, model_version)  # again: a reload may have come meanwhile
        graph = batch_stats_graph(served)
        parsed = parse_infer_request(body, headers.header_length, served.config, served.batching.max_batch_size)
        deadline = parsed.deadline(state.settings.request_timeout_ms / 1000)
        running, batch = await _run_both(graph, parsed.feeds, parsed.rows, deadline)
        logits = running[served.runtime.output_names.index(graph.stats.logits_output)]
        answer = compare(
            logits, dict(zip(graph.runtime.output_names, batch, strict=True)), graph.stats, served.config.labels
        )
        head: dict[str, Any] = {"model_name": model_name, "model_version": served.version.number}
        if parsed.id is not None:
            head["id"] = parsed.id
        response = orjson.dumps(head | answer, option=orjson.OPT_SERIALIZE_NUMPY)
    except ServeError as e:
        count_failure(state, graph.metrics if graph else None, model_name, e.reason, state.metrics.batchnorm)
        raise
    except Exception:
        count_failure(state, graph.metrics if graph else None, model_name, "internal", state.metrics.batchnorm)
        raise
    finally:
        reservation.release()
    graph.metrics.succeeded(started)
    return response


class _Side(BaseModel):
    logits: list[list[float]] = Field(description="the compared output, (N, classes): the model's scores")
    probabilities: list[list[float]] = Field(
        description="softmax of the logits, (N, classes); meaningful where the output holds class scores"
    )
    predictions: list[int] = Field(description="the predicted class (argmax) of each sample")


class _Layer(BaseModel):
    name: str = Field(examples=["stem.0.1"])
    type: str = Field(examples=["BatchNorm2d"])
    channels: int
    reduced_over: str = Field(examples=["N, H, W"], description="the axes one channel's statistics are taken over")
    values_per_channel: int = Field(description="how many values each channel's batch statistics pool")
    running_mean: list[float]
    running_var: list[float]
    batch_mean: list[float]
    batch_var: list[float] = Field(description="biased, as train() mode normalizes with")
    distance: float = Field(description="see the response's 'distance' field")


class BatchNormResponseSchema(BaseModel):
    """Documentation only: what the batchnorm endpoint answers."""

    model_name: str
    model_version: str
    id: str | None = None
    batch_size: int = Field(description="the rows of the compared output")
    output: str = Field(description="the compared output (bn_stats.json's logits_output)")
    labels: list[str]
    running: _Side = Field(description="the served graph: running statistics, as /infer answers")
    batch: _Side = Field(description="the batch-statistics graph: this batch's own statistics, as train() mode")
    changed: list[bool] = Field(description="per sample: the two predicted classes differ")
    layers: list[_Layer]
    distance: str = Field(description="how each layer's distance is defined")
    note: str | None = Field(default=None, description="present for a batch of one: what its statistics do")


_OPENAPI = {
    "requestBody": OPENAPI_REQUEST,
    "responses": {
        "200": {
            "description": "both answers, per sample and per BatchNorm layer",
            "content": {"application/json": {"schema": schema_ref(BatchNormResponseSchema)}},
        }
    },
}
_DESCRIPTION = (
    "Run one batch with BatchNorm's running statistics (the served graph, as infer) and with the batch's own "
    "statistics (as train() mode; never batched with other requests), and compare them per sample and per layer. "
    "400 for a model without a batch-statistics graph, saying why."
)


async def _answer(request: Request, model_name: str, model_version: str | None) -> Response:
    headers = RequestHeaders.from_raw(request.scope["headers"])
    body = await batchnorm(service_state(request), model_name, model_version, headers, request)
    return Response(body, media_type="application/json")


@router.post(
    "/v2/models/{model_name}/batchnorm",
    summary="Running vs batch statistics, newest ready version",
    description=_DESCRIPTION,
    openapi_extra=_OPENAPI,
)
async def batchnorm_latest(request: Request, model_name: str) -> Response:
    return await _answer(request, model_name, None)


@router.post(
    "/v2/models/{model_name}/versions/{model_version}/batchnorm",
    summary="Running vs batch statistics, one version",
    description=_DESCRIPTION,
    openapi_extra=_OPENAPI,
)
async def batchnorm_version(request: Request, model_name: str, model_version: str) -> Response:
    return await _answer(request, model_name, model_version)
