"""HTTP routes: parse the request, call the registry, batcher and protocol, answer. Nothing else."""

from fastapi import APIRouter

from service.routes import health, inference, metrics, repository

__all__ = ["router"]

router = APIRouter()
router.include_router(health.router)
router.include_router(inference.router)
router.include_router(repository.router)
router.include_router(metrics.router)
