"""Serve the model repository: ``python -m service`` (settings from NORMSERVE_* variables).

    NORMSERVE_REPOSITORY=model_repository NORMSERVE_HOST=0.0.0.0 python -m service

On SIGTERM or Ctrl-C the server stops accepting connections, finishes every request it accepted
(within NORMSERVE_SHUTDOWN_TIMEOUT_S), then exits.
"""

from __future__ import annotations

import logging

import uvicorn

from service.app import create_app
from service.config import Settings
from service.logs import configure_logging

log = logging.getLogger("service")


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
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )


if __name__ == "__main__":
    main()
