"""What the routes share: the settings, the registry of served models, the metrics, readiness."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from service.bodies import BodyBudget
from service.config import Settings
from service.logs import Throttle
from service.metrics import Metrics
from service.registry import Registry

if TYPE_CHECKING:
    from service.peers import Peers
    from service.workers import ReadinessBoard, Worker

__all__ = ["ServiceState", "service_state"]


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    registry: Registry
    started: bool = False
    shutting_down: bool = False
    draining: bool = False  # a signal came: still serving, with Connection: close, until the listener closes
    load_error: str = ""
    # The lines a client can make the server write at will (refused and failed control requests): a
    # burst, then a count of what was left out.
    refusal_log: Throttle = field(default_factory=Throttle)
    bodies: BodyBudget = field(init=False)
    # With worker processes (service.workers): who this one is, every worker's readiness, and its peers.
    worker: Worker | None = None
    board: ReadinessBoard | None = None
    peers: Peers | None = None

    def __post_init__(self) -> None:
        self.bodies = BodyBudget(self.settings.max_bodies_bytes)

    def not_ready_reasons(self) -> list[str]:
        """Why the server is not ready: this process's reasons, and with worker processes any other worker
        that is not (the server is one to the outside: ready only when every worker is)."""
        reasons = self.own_not_ready_reasons()
        if self.board is not None and self.worker is not None:
            reasons += [
                f"{self.worker.name(i)} is not ready (starting, loading its models, draining or stopped)"
                for i in self.board.not_ready(self.worker.peers)
            ]
        return reasons

    def own_not_ready_reasons(self) -> list[str]:
        if self.shutting_down:
            return ["the server is shutting down"]
        if self.draining:
            return ["the server is draining before it stops: send new requests elsewhere"]
        if not self.started:
            return ["models are still loading and warming up"]
        if self.load_error:
            return [self.load_error]
        return self.registry.not_ready_reasons(self.settings.required_models)


def service_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.normserve
    return state
