"""Health, server metadata and model metadata (KServe v2)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from repository import ModelConfig, TensorSpec
from service import __version__
from service.batchnorm import no_batch_stats_reason
from service.errors import NotReady
from service.registry import ModelEntry, ServedVersion
from service.state import service_state

__all__ = ["EXTENSIONS", "config_document", "metadata_document", "provider_fields", "router"]

router = APIRouter(tags=["health and metadata"])

# Triton's names for the protocol extensions this server implements, then normserve's own.
EXTENSIONS = [
    "binary_tensor_data",
    "classification",
    "model_repository",
    "model_configuration",
    "statistics",
    "batchnorm",
]


@router.get("/v2/health/live", summary="Is the process up")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready", summary="Is every loaded model warm (and on the GPU, if required)")
async def ready(request: Request) -> JSONResponse:
    """Always open, for probes: the status and ``ready``. The models, their providers and the reasons (which
    may quote a CUDA error) only to a client that may read metadata, where the API key guards it."""
    state = service_state(request)
    reasons = state.not_ready_reasons()
    status = 503 if reasons else 200
    if not request.app.access.may_read("metadata", request.scope["headers"]):
        return JSONResponse({"ready": not reasons}, status_code=status)
    models = [
        {"name": entry.name, "version": v.version, "state": v.readiness, "reason": v.reason} | provider_fields(v.served)
        for entry in state.registry.models.values()
        for v in entry.versions.values()
    ]
    body: dict[str, Any] = {"ready": not reasons, "models": models}
    if reasons:
        body["error"] = "not ready: " + "; ".join(reasons)
    return JSONResponse(body, status_code=status)


@router.get("/v2", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": "normserve", "version": __version__, "extensions": EXTENSIONS}


def provider_fields(served: ServedVersion | None) -> dict[str, Any]:
    if served is None:
        return {}
    status = served.runtime.provider
    return {"provider": status.active, "provider_requested": status.requested, "provider_fallback": status.fallback}


def _config_and_version(entry: ModelEntry, version: str | None) -> tuple[ModelConfig, ServedVersion | None]:
    """The model's config and the version that serves for ``version`` (None: the newest ready one)."""
    if entry.config is None:
        raise NotReady(f"model {entry.name!r} is not available: {entry.reason}")
    served = entry.version(version).served if version is not None else entry.latest_ready()
    return entry.config, served


def metadata_document(entry: ModelEntry, version: str | None) -> dict[str, Any]:
    """Model (version) metadata, KServe v2's fields then normserve's own: over HTTP as it is, over gRPC
    the protocol's fields."""
    config, served = _config_and_version(entry, version)
    return {
        "name": config.name,
        "versions": [version] if version is not None else sorted(entry.versions, key=int),
        "platform": config.platform,
        "inputs": [spec.model_dump() for spec in config.inputs],
        "outputs": [spec.model_dump() for spec in config.outputs],
        # normserve's own fields: what the model is and where it really runs
        "description": config.description,
        "input_description": config.input_description,
        "labels": config.labels,
        "norm_layers": config.norm_layers,
        "max_batch_size": served.batching.max_batch_size if served else config.max_batch_size,
        **provider_fields(served),
        **_batch_statistics(served),
    }


def _batch_statistics(served: ServedVersion | None) -> dict[str, Any]:
    """Whether the batchnorm endpoint serves the version, and if not, why (its 400's message)."""
    if served is None:
        return {}
    if served.batch_stats is not None:
        return {"batch_statistics": {"available": True}}
    return {"batch_statistics": {"available": False, "reason": no_batch_stats_reason(served.version)}}


@router.get("/v2/models/{model_name}", summary="Model metadata")
async def model_metadata(request: Request, model_name: str) -> dict[str, Any]:
    return metadata_document(service_state(request).registry.entry(model_name), None)


@router.get("/v2/models/{model_name}/versions/{model_version}", summary="Model version metadata")
async def model_version_metadata(request: Request, model_name: str, model_version: str) -> dict[str, Any]:
    return metadata_document(service_state(request).registry.entry(model_name), model_version)


@router.get("/v2/models/{model_name}/ready", summary="Can the model serve")
async def model_ready(request: Request, model_name: str) -> dict[str, Any]:
    served = service_state(request).registry.get(model_name)
    return {"name": model_name, "version": served.version.number, "ready": True, **provider_fields(served)}


@router.get("/v2/models/{model_name}/versions/{model_version}/ready", summary="Can the model version serve")
async def model_version_ready(request: Request, model_name: str, model_version: str) -> dict[str, Any]:
    served = service_state(request).registry.get(model_name, model_version)
    return {"name": model_name, "version": model_version, "ready": True, **provider_fields(served)}


def _triton_tensor(spec: TensorSpec, batched: bool) -> dict[str, Any]:
    """A tensor as Triton's model_config.proto has it: the batch dimension (of a model with max_batch_size
    >= 1) is implied by max_batch_size, not among the dims; a model without one lists every dimension."""
    return {"name": spec.name, "data_type": f"TYPE_{spec.datatype}", "dims": spec.shape[1:] if batched else spec.shape}


def config_document(entry: ModelEntry, version: str | None) -> dict[str, Any]:
    """The model configuration, in Triton's model_config schema with normserve's own fields beside it (which
    the gRPC service, whose ModelConfig message has no room for them, leaves out)."""
    model, served = _config_and_version(entry, version)
    config: dict[str, Any] = model.model_dump()
    config |= {
        "backend": "onnxruntime",
        "input": [_triton_tensor(s, model.batched) for s in model.inputs],
        "output": [_triton_tensor(s, model.batched) for s in model.outputs],
    }
    if served is not None and model.batched:  # as Triton: no dynamic batching without a batch dimension
        config["max_batch_size"] = served.batching.max_batch_size
        config["dynamic_batching"] = {
            "max_queue_delay_microseconds": round(served.batching.max_queue_delay_s * 1e6),
            "default_queue_policy": {"max_queue_size": served.batching.queue_limit},
        }
    return config


@router.get("/v2/models/{model_name}/config", summary="Model configuration, as served")
async def model_config(request: Request, model_name: str) -> dict[str, Any]:
    return config_document(service_state(request).registry.entry(model_name), None)


@router.get("/v2/models/{model_name}/versions/{model_version}/config", summary="Model version configuration")
async def model_version_config(request: Request, model_name: str, model_version: str) -> dict[str, Any]:
    return config_document(service_state(request).registry.entry(model_name), model_version)
