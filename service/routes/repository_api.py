"""HTTP routes of the model repository extension: list, load (or reload) and unload models at run time."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request

from service.errors import NotReady, ServeError
from service.logs import CLIENT_TEXT_CHARS, client_text, left_out
from service.registry import ModelEntry, Registry
from service.state import ServiceState, service_state
from service.workers import write_served_models

__all__ = ["index_rows", "load_model", "router", "unload_model"]

log = logging.getLogger(__name__)


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown client"


def _refused(state: ServiceState, client: str, action: str, model_name: str, error: ServeError) -> None:
    """One line for a failed control request, its client's values escaped and cut, throttled: a client can
    send these at will."""
    suppressed = state.refusal_log.allow()
    if suppressed is not None:
        log.warning(
            "model control: %s '%s' from %s failed: %d %s%s",
            action,
            client_text(model_name),
            client,
            error.status,
            client_text(error.message, 2 * CLIENT_TEXT_CHARS),
            left_out(suppressed),
        )


def index_rows(registry: Registry) -> list[dict[str, Any]]:
    """Every model in the repository, each version with its state (HTTP and gRPC alike)."""
    rows: list[dict[str, Any]] = []
    for name in registry.repository_names():
        entry = registry.models.get(name)
        if entry is None:
            rows.append({"name": name, "state": "UNAVAILABLE", "reason": "unloaded"})  # as Triton says it
        elif not entry.versions:
            rows.append({"name": name, "state": entry.readiness, "reason": entry.reason})
        else:
            rows.extend(
                {"name": name, "version": v.version, "state": v.readiness, "reason": v.reason}
                for v in sorted(entry.versions.values(), key=lambda v: int(v.version))
            )
    return rows


async def load_model(state: ServiceState, model_name: str, client: str) -> ModelEntry:
    """Load or reload ``model_name`` for ``client`` (its address, for the log); NotReady if no version of it
    loaded. Logged either way. With worker processes, on every worker or none."""
    registry = state.registry
    try:
        entry = await (registry.load(model_name) if state.peers is None else _load_everywhere(state, model_name))
        if entry.latest_ready() is None:
            kept = registry.models.get(model_name) is not entry
            raise NotReady(
                f"model {model_name!r} failed to load: {registry.reason(entry)}"
                + ("; the versions loaded before keep serving" if kept else "")
            )
    except ServeError as e:
        _refused(state, client, "load", model_name, e)
        raise
    log.info(
        "model control: load '%s' from %s: loaded versions %s", client_text(model_name), client, sorted(entry.versions)
    )
    return entry


async def _load_everywhere(state: ServiceState, model_name: str) -> ModelEntry:
    """``Registry.load`` on every worker: each builds and warms the model, and only when all have does any
    swap it in. If some fail, none swaps, and the error names the workers that failed; if all fail, each
    takes the failed load as one server does (a model not served shows why; one served keeps serving)."""
    registry, peers, worker = state.registry, state.peers, state.worker
    assert peers is not None and worker is not None
    entry = await registry.prepare(model_name)  # a name or folder the repository lacks raises here, for all
    answers = await peers.each("POST", peers.model_path(model_name, "prepare"))
    failed = peers.failures(answers)
    if entry.latest_ready() is None:
        failed[worker.index] = registry.reason(entry)
    if failed and len(failed) < worker.count:
        await registry.discard(model_name)
        await peers.each("POST", peers.model_path(model_name, "abort"))
        where = "; ".join(f"{worker.name(i)}: {why}" for i, why in sorted(failed.items()))
        raise NotReady(
            f"model {model_name!r} failed to load on {len(failed)} of {worker.count} workers ({where}); "
            "no worker changed what it serves"
        )
    entry = await registry.commit(model_name)
    for i, why in peers.failures(await peers.each("POST", peers.model_path(model_name, "commit"))).items():
        log.error("model control: %s built %s but did not swap it in: %s", worker.name(i), model_name, why)
    write_served_models(worker.run_dir, list(registry.models))
    return entry


async def unload_model(state: ServiceState, model_name: str, client: str) -> None:
    try:
        await state.registry.unload(model_name)
        if state.peers is not None and state.worker is not None:
            # Every worker serves what this one did: one that has it no more (a concurrent unload) is no error.
            answers = await state.peers.each("POST", state.peers.model_path(model_name, "unload"))
            for i, (status, body) in answers.items():
                if status not in (200, 404):
                    log.error("model control: %s did not unload %s: %s", state.worker.name(i), model_name, body)
            write_served_models(state.worker.run_dir, list(state.registry.models))
    except ServeError as e:
        _refused(state, client, "unload", model_name, e)
        raise
    log.info("model control: unload '%s' from %s: unloaded", client_text(model_name), client)


router = APIRouter(tags=["model repository"])


@router.post("/v2/repository/index", summary="Every model in the repository, with its state")
async def index(request: Request) -> list[dict[str, Any]]:
    return index_rows(service_state(request).registry)


@router.post("/v2/repository/models/{model_name}/load", summary="Load or reload a model, swapping it in when warm")
async def load(request: Request, model_name: str) -> dict[str, Any]:
    entry = await load_model(service_state(request), model_name, _client(request))
    versions = {v.version: {"state": v.readiness, "reason": v.reason} for v in entry.versions.values()}
    return {"name": model_name, "versions": versions}


@router.post("/v2/repository/models/{model_name}/unload", summary="Stop serving a model, finishing what it accepted")
async def unload(request: Request, model_name: str) -> dict[str, Any]:
    await unload_model(service_state(request), model_name, _client(request))
    return {"name": model_name, "state": "UNAVAILABLE", "reason": "unloaded"}
