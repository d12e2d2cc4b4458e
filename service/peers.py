"""What one worker asks the others (``service.workers``): over each peer's Unix socket, HTTP/1.1.

A request that must reach every worker arrives at one of them (the kernel chose it): that worker does its
own part and asks its peers to do theirs, under ``/_peer/``, which only the Unix sockets serve:

- a model load in two phases: every worker builds and warms the model (``prepare``), and only when all
  have does any of them swap it in (``commit``); if one fails, every worker drops what it built
  (``abort``) and the error names the workers that failed, so that none is left half-changed;
- a model unload;
- the statistics, summed over the workers.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import quote

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.errors import ServeError, render
from service.workers import Worker

__all__ = ["PEER_PREFIX", "Peers", "router", "sum_statistics"]

log = logging.getLogger(__name__)

PEER_PREFIX = "/_peer/"
# A peer that does not answer within this long counts as failed (a load builds and warms sessions).
CONTROL_TIMEOUT_S = 300.0
READ_TIMEOUT_S = 10.0


class Peers:
    """The other workers of this one, reached over their Unix sockets."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def request(self, index: int, method: str, path: str, timeout_s: float) -> tuple[int, Any]:
        """One call to worker ``index``: its status and JSON body; status 0 where it could not be reached."""
        try:
            return await asyncio.wait_for(self._request(index, method, path), timeout_s)
        except (OSError, TimeoutError, ValueError) as e:
            return 0, {"error": f"{self.worker.name(index)} did not answer ({type(e).__name__}: {e})"}

    async def _request(self, index: int, method: str, path: str) -> tuple[int, Any]:
        reader, writer = await asyncio.open_unix_connection(str(self.worker.socket_path(index)))
        try:
            head = f"{method} {path} HTTP/1.1\r\nhost: peer\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            writer.write(head.encode("latin-1"))
            data = await reader.read()  # to the end: the peer closes after its answer
        finally:
            writer.close()
        head_bytes, _, body = data.partition(b"\r\n\r\n")
        status = int(head_bytes.split(b" ", 2)[1])
        return status, orjson.loads(body) if body else None

    async def each(self, method: str, path: str, timeout_s: float = CONTROL_TIMEOUT_S) -> dict[int, tuple[int, Any]]:
        """The same call to every peer at once; their answers by worker index."""
        peers = self.worker.peers
        answers = await asyncio.gather(*(self.request(i, method, path, timeout_s) for i in peers))
        return dict(zip(peers, answers, strict=True))

    def failures(self, answers: dict[int, tuple[int, Any]]) -> dict[int, str]:
        return {
            i: body.get("error", f"status {status}") if isinstance(body, dict) else f"status {status}"
            for i, (status, body) in answers.items()
            if status != 200
        }

    @staticmethod
    def model_path(name: str, action: str) -> str:
        return f"{PEER_PREFIX}models/{quote(name, safe='')}/{action}"


def _sum_durations(into: dict[str, int], other: dict[str, int]) -> None:
    into["count"] += other["count"]
    into["ns"] += other["ns"]


def sum_statistics(mine: list[dict[str, Any]], theirs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """This worker's ``model_stats`` entries, each with the same entry of every peer added: counts and times
    summed, the last inference the latest, batch sizes merged."""
    for entries in theirs:
        by_key = {(e["name"], e["version"]): e for e in entries}
        for entry in mine:
            other = by_key.get((entry["name"], entry["version"]))
            if other is None:
                continue
            entry["last_inference"] = max(entry["last_inference"], other["last_inference"])
            entry["inference_count"] += other["inference_count"]
            entry["execution_count"] += other["execution_count"]
            for key, duration in entry["inference_stats"].items():
                _sum_durations(duration, other["inference_stats"][key])
            sizes = {b["batch_size"]: b for b in entry["batch_stats"]}
            for batch in other["batch_stats"]:
                held = sizes.get(batch["batch_size"])
                if held is None:
                    sizes[batch["batch_size"]] = batch
                else:
                    for key in ("compute_input", "compute_infer", "compute_output"):
                        _sum_durations(held[key], batch[key])
            entry["batch_stats"] = [sizes[size] for size in sorted(sizes)]
    return mine


# -- what a peer answers (its Unix socket only; service.app routes /_peer/ there) --

router = APIRouter(include_in_schema=False)


def _error(exc: Exception) -> JSONResponse:
    status, _, body = render(exc)
    return JSONResponse(orjson.loads(body), status_code=status)


# What each action calls on the registry (``prepare`` answers more: whether the build served).
_ACTIONS = {"prepare": "prepare", "commit": "commit", "abort": "discard", "unload": "unload"}


@router.post(PEER_PREFIX + "models/{model_name}/{action}")
async def model_action(request: Request, model_name: str, action: str) -> JSONResponse:
    registry = request.app.state.normserve.registry
    if action not in _ACTIONS:
        return JSONResponse({"error": f"no action {action!r}"}, status_code=404)
    try:
        done = await getattr(registry, _ACTIONS[action])(model_name)
    except ServeError as e:
        return _error(e)
    if action == "prepare" and done.latest_ready() is None:
        # held all the same: if every worker failed, each commits its failure, as one server keeps it
        return JSONResponse({"error": registry.reason(done)}, status_code=503)
    return JSONResponse({action: model_name})


@router.get(PEER_PREFIX + "stats")
async def statistics(request: Request) -> JSONResponse:
    from service.routes.statistics import model_statistics  # here: that module imports this one

    return JSONResponse(model_statistics(request.app.state.normserve.registry, None, None))
