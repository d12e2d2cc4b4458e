"""Logging: plain lines for a terminal, one JSON object per line for a log pipeline
(``NORMSERVE_JSON_LOGS=1``). Every record made while serving a request carries its request id.

What a client sent (a path, a model name, an error message that quotes them) goes into a line only
through ``client_text``: control characters escaped, so a ``%0a`` in a URL cannot start a forged line,
and cut to ``CLIENT_TEXT_CHARS``, so a 50 KB name cannot make a 50 KB line. Lines a client can make the
server write at will (refusals) go through a ``Throttle``: a burst, then one line with the count of
what was left out.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import threading
import time
from typing import Any

import orjson

__all__ = ["CLIENT_TEXT_CHARS", "Throttle", "client_text", "configure_logging", "left_out", "request_id"]

CLIENT_TEXT_CHARS = 200  # the most of a client's value that one log line quotes
# C0 and C1 controls, DEL, and the Unicode line and paragraph separators: anything a terminal or a log
# pipeline could take as the end of a line or as an escape sequence.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def client_text(value: object, limit: int = CLIENT_TEXT_CHARS) -> str:
    """``value`` as one log line may carry it: control characters as ``\\xNN`` escapes, cut to ``limit``
    characters with the length it had."""
    text = str(value)
    escaped = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)
    if len(escaped) <= limit:
        return escaped
    return f"{escaped[:limit]}... ({len(text)} characters)"


class Throttle:
    """At most ``burst`` lines every ``window_s`` seconds for one kind of event; the rest are counted.

    ``allow()`` is None for a line to leave out, else how many were left out since the last one that
    was written (to say in it).
    """

    def __init__(self, burst: int = 20, window_s: float = 10.0) -> None:
        self.burst, self.window_s = burst, window_s
        self._lock = threading.Lock()
        self._window_start = -float("inf")
        self._written = 0
        self._suppressed = 0

    def allow(self) -> int | None:
        with self._lock:
            now = time.monotonic()
            if now - self._window_start >= self.window_s:
                self._window_start, self._written = now, 0
            if self._written >= self.burst:
                self._suppressed += 1
                return None
            self._written += 1
            suppressed, self._suppressed = self._suppressed, 0
            return suppressed


def left_out(suppressed: int) -> str:
    """What a throttled line adds about the lines left out before it."""
    return f" ({suppressed} more like it not logged)" if suppressed else ""


request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_id"}


class _RequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class _Worker(logging.Filter):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def configure_logging(level: str, json_logs: bool, worker: int | None = None) -> None:
    """Route the service's and uvicorn's loggers to stderr, in one format; ``worker``: each line says which
    worker process wrote it (``service.workers``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestId())
    if worker is not None:
        handler.addFilter(_Worker(worker))
    if json_logs:
        handler.setFormatter(JsonFormatter())
    else:
        who = "" if worker is None else f"worker {worker} "
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)-7s {who}%(name)s [%(request_id)s] %(message)s")
        )
    for name in ("service", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
