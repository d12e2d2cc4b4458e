"""Serve the model repository: ``python -m service`` (settings from NORMSERVE_* variables).

    NORMSERVE_REPOSITORY=model_repository NORMSERVE_HOST=0.0.0.0 python -m service

On SIGTERM or Ctrl-C the server drains, as load balancers expect: readiness turns 503 at once, and
for NORMSERVE_DRAIN_S requests are still served, each answer with ``Connection: close`` so that
clients reconnect elsewhere. Then the listener closes, every request already accepted finishes
(within NORMSERVE_SHUTDOWN_TIMEOUT_S), and the process exits with status 0. A second signal stops
at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn

from service.app import NormserveApp, create_app
from service.config import Settings
from service.logs import configure_logging
from service.transport import raise_file_limit, server_config

log = logging.getLogger("service")

# After the listener closes, how long connections accepted just before it may still send their request.
LISTENER_SETTLE_S = 0.5


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain phase between the first signal and the listener closing."""

    def __init__(self, config: uvicorn.Config, app: NormserveApp, drain_s: float) -> None:
        super().__init__(config)
        self.app, self.drain_s = app, drain_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = self.app.state.normserve
        if state.draining:  # a second signal: stop now (uvicorn re-raises it once stopped)
            super().handle_exit(sig, frame)
            return
        # Not captured for re-raising: a clean, drained shutdown exits with status 0.
        state.draining = True
        name = signal.Signals(sig).name
        if self.drain_s <= 0:
            log.info("%s: stopping (NORMSERVE_DRAIN_S=0)", name)
            self.should_exit = True
            return
        log.info(
            "%s: draining for %g s: readiness answers 503, requests are still served with Connection: close",
            name,
            self.drain_s,
        )
        loop = asyncio.get_event_loop()  # the serving loop: signal handlers run on its thread
        loop.call_soon_threadsafe(loop.call_later, self.drain_s, self._close_listeners, loop)

    def _close_listeners(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stop accepting connections first, and only then stop: a connection accepted just before gets to
        send its request and hear the answer, where uvicorn's own shutdown would close it unanswered."""
        log.info("drained: closing the listener and finishing the accepted requests")
        for server in self.servers:
            server.close()
        loop.call_later(LISTENER_SETTLE_S, setattr, self, "should_exit", True)


def main() -> None:
    settings = Settings()
    configure_logging(settings.log_level, settings.json_logs)
    app = create_app(settings)
    shown = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{shown}:{settings.port}"
    log.info(
        "starting on %s: inference %s/v2, readiness %s/v2/health/ready, docs %s/docs, metrics %s/metrics, "
        "demo page %s/demo",
        url,
        url,
        url,
        url,
        url,
        url,
    )
    before, after = raise_file_limit()
    if after > before:
        log.info("raised the soft limit on open files from %d to %d, the hard limit", before, after)
    else:
        log.info("open-file limit: %d", after)
    DrainingServer(server_config(app, settings), app, settings.drain_s).run()


if __name__ == "__main__":
    main()
