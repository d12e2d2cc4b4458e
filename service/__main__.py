"""Serve the model repository: ``python -m service`` (settings from NORMSERVE_* variables).

    NORMSERVE_REPOSITORY=model_repository NORMSERVE_HOST=0.0.0.0 python -m service

On SIGTERM or Ctrl-C the server drains, as load balancers expect: readiness turns 503 at once, and
for NORMSERVE_DRAIN_S requests are still served, each answer with ``Connection: close`` so that
clients reconnect elsewhere. Then the listener closes, every request already accepted finishes
(within NORMSERVE_SHUTDOWN_TIMEOUT_S), and the process exits with status 0. A second signal stops
at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import logging
import os
import signal
import socket
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from service.app import NormserveApp, create_app
from service.config import Settings
from service.logs import configure_logging
from service.transport import raise_file_limit, server_config
from service.workers import Supervisor, Worker, control_socket, listening_socket, worker_count

log = logging.getLogger("service")

# After the listener closes, how long connections accepted just before it may still send their request.
LISTENER_SETTLE_S = 0.5


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain phase between the first signal and the listener closing."""

    def __init__(self, config: uvicorn.Config, app: NormserveApp, drain_s: float) -> None:
        super().__init__(config)
        self.app, self.drain_s = app, drain_s
        self._accepting: set[asyncio.Task[Any]] = set()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler runs in whatever context the main thread is in when the signal comes: a request's,
        # whose id its log lines and the callbacks it schedules would carry. The server's own is empty.
        contextvars.Context().run(self._handle_exit, sig, frame)

    def _handle_exit(self, sig: int, frame: FrameType | None) -> None:
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
        send its request and hear the answer, where uvicorn's own shutdown would close it unanswered.

        Connections the kernel has completed but the loop has not yet accepted would be reset when their
        listener closes, after their client sent its request: each is accepted and served first, in the
        same step as the close, so that none is left in between."""
        log.info("drained: closing the listener and finishing the accepted requests")
        for server in self.servers:
            for listener in server.sockets:
                self._accept_waiting(loop, listener)
            server.close()
        loop.call_later(LISTENER_SETTLE_S, setattr, self, "should_exit", True)

    def _accept_waiting(self, loop: asyncio.AbstractEventLoop, listener: socket.socket) -> None:
        """Hand every connection waiting in ``listener``'s accept queue to a protocol of the server's own."""
        with socket.socket(fileno=os.dup(listener.fileno())) as queue:
            queue.setblocking(False)
            while True:
                try:
                    connection, _ = queue.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as e:  # out of files, say: what cannot be accepted is reset, as before
                    log.warning("could not accept a waiting connection before closing the listener: %s", e)
                    return
                connection.setblocking(False)
                task = loop.create_task(loop.connect_accepted_socket(self._protocol, connection))
                self._accepting.add(task)
                task.add_done_callback(self._accepted)

    def _accepted(self, task: asyncio.Task[Any]) -> None:
        self._accepting.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.warning("a connection accepted before closing the listener could not be served: %r", error)

    def _protocol(self) -> asyncio.Protocol:
        """What uvicorn's own listener makes for each connection."""
        protocol: asyncio.Protocol = self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state
        )
        return protocol


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m service", description="Serve the model repository.")
    # Set by the supervisor for its workers (service.workers), not by hand.
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--of", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    arguments = _arguments()
    settings = Settings()
    configure_logging(settings.log_level, settings.json_logs, arguments.worker)
    if arguments.worker is not None:
        serve_worker(settings, Worker(arguments.worker, arguments.of, arguments.run_dir))
        return
    _started(settings)
    workers = worker_count(settings)
    if workers > 1:
        raise SystemExit(Supervisor(settings, workers).run())
    app = create_app(settings)
    DrainingServer(server_config(app, settings), app, settings.drain_s).run()


def serve_worker(settings: Settings, worker: Worker) -> None:
    """One worker of several: the whole server, on its own SO_REUSEPORT socket of the ports and its Unix
    socket for its peers, both opened by uvicorn once the lifespan has loaded the models."""
    raise_file_limit()
    app = create_app(settings, worker)
    try:
        sockets = [listening_socket(settings.host, settings.port), control_socket(worker.socket_path())]
    except (RuntimeError, OSError) as e:
        log.error("%s", e)  # the supervisor stops the server: a worker that cannot listen never will
        raise SystemExit(1) from None
    DrainingServer(server_config(app, settings), app, settings.drain_s).run(sockets=sockets)


def _started(settings: Settings) -> None:
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


if __name__ == "__main__":
    main()
