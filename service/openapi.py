"""The OpenAPI document as the server really behaves: resolvable schemas, the real error statuses, both bodies.

FastAPI documents what it validates. The inference and batchnorm routes read their bodies themselves
(JSON or Triton's binary data), so their schemas are given as ``openapi_extra``; pydantic writes a
model's nested models under ``$defs``, which does not resolve once the schema sits inside the
document. ``described`` fixes the document once, when it is first asked for:

- every schema given by ``schema_ref`` goes into ``components/schemas``, nested models included;
- FastAPI's 422 goes (a request FastAPI cannot validate is answered 400), and each operation lists
  the statuses its group can answer, with the ``{"error": ...}`` body;
- ``/metrics`` is Prometheus text, not JSON.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from service.access import endpoint_group

__all__ = ["ERROR_STATUSES", "described", "schema_ref"]

_REF = "#/components/schemas/{model}"
_SCHEMAS: dict[str, dict[str, Any]] = {}

ERROR_STATUSES = {
    "400": "malformed input, or input that does not match the model (the message says what was expected)",
    "401": "the endpoint needs the API key (NORMSERVE_API_KEY), and the request did not carry it",
    "403": "not allowed: model control is off, or a control request came from another origin",
    "404": "no such model, version or route",
    "413": "the body is larger than NORMSERVE_MAX_BODY_BYTES",
    "415": "unsupported content type or encoding",
    "503": "not ready, or the model's queue is full (with Retry-After)",
    "504": "the request's deadline passed before it could run; it was not run",
}
_BY_GROUP = {
    "inference": ["400", "401", "404", "413", "415", "503", "504"],
    "model_control": ["401", "403", "404", "415", "503"],
    "metadata": ["401", "404", "503"],
    "metrics": ["401"],
    None: ["503"],
}


class ErrorSchema(BaseModel):
    error: str


def schema_ref(model: type[BaseModel]) -> dict[str, str]:
    """A ``$ref`` to ``model`` under ``components/schemas``, where ``described`` will put it."""
    schema = model.model_json_schema(ref_template=_REF)
    for name, nested in schema.pop("$defs", {}).items():
        _SCHEMAS[name] = nested
    _SCHEMAS[model.__name__] = schema
    return {"$ref": _REF.format(model=model.__name__)}


def described(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document, made true (see the module docstring); cached on the app."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    error = schema_ref(ErrorSchema)
    doc = get_openapi(
        title=app.title, version=app.version, summary=app.summary, routes=app.routes, description=app.description
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(_SCHEMAS)
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for path, operations in doc.get("paths", {}).items():
        group = endpoint_group(path)
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for status in _BY_GROUP[group]:
                responses.setdefault(
                    status,
                    {"description": ERROR_STATUSES[status], "content": {"application/json": {"schema": error}}},
                )
    metrics = doc["paths"].get("/metrics", {}).get("get")
    if metrics is not None:
        metrics["responses"]["200"] = {
            "description": "Prometheus text exposition format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    app.openapi_schema = doc
    return doc
