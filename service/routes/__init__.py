"""HTTP routes: parse the request, call the registry, batcher and protocol, answer. Nothing else."""

from fastapi import APIRouter

from service.routes import batchnorm, demo, health, inference, metrics, repository_api, statistics

__all__ = ["ROUTERS"]

# Included one by one, each at the top level: nested routers cost a match per level on every request.
# statistics before health: /v2/models/stats is not the metadata of a model named "stats".
ROUTERS: list[APIRouter] = [
    statistics.router,
    health.router,
    inference.router,
    batchnorm.router,
    repository_api.router,
    metrics.router,
    demo.router,
]
