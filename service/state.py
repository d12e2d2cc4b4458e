"""What the routes share: the settings, the registry of served models, the metrics, readiness."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from service.bodies import BodyBudget
from service.config import Settings
from service.logs import Throttle
from service.metrics import Metrics
from service.registry import Registry

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

    def __post_init__(self) -> None:
        self.bodies = BodyBudget(self.settings.max_bodies_bytes)

    def not_ready_reasons(self) -> list[str]:
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
