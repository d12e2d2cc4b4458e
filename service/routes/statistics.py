"""Triton's statistics extension: ``GET /v2/models/stats``, ``/v2/models/{m}/stats``,
``/v2/models/{m}/versions/{v}/stats`` (and gRPC's ModelStatistics, from the same ``model_statistics``).

Each served version has an entry under its model's name; a BatchNorm model's batch-statistics graph (the
batchnorm endpoint's) has its own, named ``<model>/batchnorm``. What each count means is in
``service.metrics.Statistics``; requests over HTTP and gRPC count alike.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from service.peers import PEER_PREFIX, READ_TIMEOUT_S, sum_statistics
from service.registry import Registry
from service.state import ServiceState, service_state

__all__ = ["BATCHNORM_SUFFIX", "model_statistics", "router", "server_statistics"]

BATCHNORM_SUFFIX = "/batchnorm"

router = APIRouter(tags=["health and metadata"])


def model_statistics(registry: Registry, name: str | None, version: str | None) -> list[dict[str, Any]]:
    """The ``model_stats`` entries of every served version (``name`` None), of one model, or of one version;
    404 for a model or version the repository does not have."""
    entries = [registry.entry(name)] if name else [registry.models[n] for n in sorted(registry.models)]
    stats = []
    for entry in entries:
        held = [entry.version(version)] if version else sorted(entry.versions.values(), key=lambda v: int(v.version))
        for v in held:
            if v.served is None:
                continue
            stats.append(v.served.metrics.statistics.document(entry.name, v.version))
            if v.served.batch_stats is not None:
                graph = v.served.batch_stats.metrics.statistics
                stats.append(graph.document(entry.name + BATCHNORM_SUFFIX, v.version))
    return stats


async def server_statistics(state: ServiceState, name: str | None, version: str | None) -> list[dict[str, Any]]:
    """``model_statistics``, with worker processes summed over every worker (HTTP and gRPC alike)."""
    mine = model_statistics(state.registry, name, version)
    if state.peers is None:
        return mine
    answers = await state.peers.each("GET", PEER_PREFIX + "stats", timeout_s=READ_TIMEOUT_S)
    # A worker that does not answer (restarting) adds nothing: its counts went with it.
    return sum_statistics(mine, [body for status, body in answers.values() if status == 200])


@router.get("/v2/models/stats", summary="Statistics of every served model version (Triton's statistics extension)")
async def all_statistics(request: Request) -> dict[str, Any]:
    return {"model_stats": await server_statistics(service_state(request), None, None)}


@router.get("/v2/models/{model_name}/stats", summary="Statistics of a model's served versions")
async def statistics(request: Request, model_name: str) -> dict[str, Any]:
    return {"model_stats": await server_statistics(service_state(request), model_name, None)}


@router.get("/v2/models/{model_name}/versions/{model_version}/stats", summary="Statistics of one model version")
async def version_statistics(request: Request, model_name: str, model_version: str) -> dict[str, Any]:
    return {"model_stats": await server_statistics(service_state(request), model_name, model_version)}
