"""HTTP/1.1 with limits: how much a slow, broken or hostile client may hold, and for how long.

``server_config(app, settings)`` is the uvicorn configuration every server of this project runs with
(``python -m service``, the container, the tests). It uses uvicorn's own settings where uvicorn has
one: ``timeout_keep_alive`` closes idle connections (NORMSERVE_KEEP_ALIVE_S), ``timeout_graceful_shutdown``
bounds the shutdown. Where uvicorn 0.54's httptools protocol has none, ``LimitedHttpToolsProtocol`` adds it:

- **The request head's size** (request line and headers, NORMSERVE_MAX_HEADER_BYTES, 60 KiB as Envoy's
  default): httptools buffers a header of any length until it ends, so 8 unfinished 32 MB headers held
  288 MB. Past the limit the client gets 431 and the connection is closed. (``h11_max_incomplete_event_size``
  is uvicorn's limit for h11 only.)
- **The number of header fields** (NORMSERVE_MAX_HEADER_COUNT, 100 as Envoy's): 431.
- **A deadline for the head and one for the body** (NORMSERVE_HEADER_TIMEOUT_S, NORMSERVE_BODY_TIMEOUT_S),
  from the first byte of each: 408, then close. uvicorn arms its keep-alive timeout only after a response,
  so a connection that never sent a request, or sent a byte every few seconds (slowloris), or a body
  shorter than its Content-Length, was held forever. A new connection that sends nothing is closed once
  the head's timeout has passed.
- **A cap on open connections** (NORMSERVE_MAX_CONNECTIONS): a connection past it is answered 503 with
  Retry-After and closed, and the connections already open are served as before. uvicorn's
  ``limit_concurrency`` is not used because at its limit it refuses every request, on the connections
  already open too, and logs a line for each one.
- **Pipelining that never reads its answers**: past ``PIPELINE_PAUSE`` requests waiting on one connection,
  it is read no further until they are answered, and past ``PIPELINE_CLOSE`` it is closed.
- **A share of that cap per client address** (NORMSERVE_MAX_CONNECTIONS_PER_CLIENT, half of the cap by
  default): one source opening thousands of silent sockets is refused past its share, and the others
  still connect.
- **What is read past a model's capacity**: a keep-alive connection answered while its model has its
  fill of requests in flight is read no further until the model answers more (``service.intake``,
  NORMSERVE_INTAKE_BATCHES): its client's next request waits unparsed, at no cost to the server, so
  that past capacity the core serves instead of refusing.

Inference requests take a shorter way than the rest: the connection answers them itself
(``AnsweredHere``), driving the same ``InferenceCall`` as the ASGI endpoint from its parser's callbacks,
with no ASGI cycle or task, and writes each answer at once. Everything above holds for them too.

Every connection closed on a client is counted in ``normserve_connections_closed_total{reason}`` and
logged as a warning at most once per reason every ``NOTICE_EVERY_S`` seconds, with the count since the
last notice: a flood of bad clients does not become a flood of log lines.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import logging
import resource
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from time import monotonic
from typing import Any, ClassVar, Protocol

import httptools
import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.app import InferenceHere, NormserveApp
from service.config import Settings
from service.errors import ClientDisconnected, ServeError, render
from service.intake import Expectation, Intake, waiting_bytes
from service.routes.inference import InferenceCall, asgi_error, response_headers

__all__ = ["ConnectionGuard", "ConnectionLimits", "LimitedHttpToolsProtocol", "raise_file_limit", "server_config"]

log = logging.getLogger(__name__)

NOTICE_EVERY_S = 10.0
# After a refusal, how long the server reads and drops what the client still sends before it closes: a
# close with unread data resets the connection, and the client may lose the answer (nginx's lingering close).
LINGER_S = 1.0
# Descriptors kept for what is not a client connection (model files, the listener, logs, pipes).
RESERVED_FILES = 64
# The soft file limit asked for when the hard one is unlimited (Linux's default nr_open).
UNLIMITED_FILES = 1_048_576


@dataclass(frozen=True)
class ConnectionLimits:
    """What ``from_settings`` takes from the settings (whose defaults are the limits' defaults)."""

    max_head_bytes: int
    max_header_count: int
    head_timeout_s: float
    body_timeout_s: float
    max_connections: int
    max_connections_per_client: int  # one client address's share of max_connections

    @classmethod
    def from_settings(cls, settings: Settings, max_connections: int | None = None) -> ConnectionLimits:
        cap = max_connections or settings.max_connections
        per_client = settings.max_connections_per_client or max(1, cap // 2)
        return cls(
            max_head_bytes=settings.max_header_bytes,
            max_header_count=settings.max_header_count,
            head_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            max_connections=cap,
            max_connections_per_client=min(per_client, cap),
        )


@dataclass
class ConnectionGuard:
    """The limits every connection of one server is held to, and the record of what they closed.

    ``admission`` is asked, for each POST whose head has arrived, for its model's intake (None: not an
    inference request) and whether the server refuses it now (a full queue): the ServeError to answer from
    the head, or None to serve it as usual; and, where it let the request in, the model version it looked
    up and admitted, which the connection hands to the request it answers itself (``InferenceCall.begin``)
    so that it is not looked up and admitted again in the same step. ``refuse_early`` is False where
    inference needs an API key, whose check a refusal from the head would skip. ``here`` is the app's side of
    the inference requests the connection answers itself (``AnsweredHere``); None sends every request
    through ASGI.
    """

    limits: ConnectionLimits
    count: Callable[[str], None]  # normserve_connections_closed_total{reason}
    admission: Callable[[str], tuple[Intake | None, ServeError | None, Any]] | None
    refuse_early: bool = True
    here: Here | None = None
    _last_notice: dict[str, float] = field(default_factory=dict)
    _unnoticed: dict[str, int] = field(default_factory=dict)
    clients: Counter[str] = field(default_factory=Counter)  # open connections by client address

    def closed(self, reason: str, message: str) -> None:
        """One connection closed on its client; a warning at most once per reason every NOTICE_EVERY_S."""
        self.count(reason)
        self._unnoticed[reason] = self._unnoticed.get(reason, 0) + 1
        now = monotonic()
        if now - self._last_notice.get(reason, -NOTICE_EVERY_S) >= NOTICE_EVERY_S:
            log.warning("closed a connection: %s (%d such since the last notice)", message, self._unnoticed[reason])
            self._last_notice[reason], self._unnoticed[reason] = now, 0


class _Refusal(Exception):
    """Raised inside a parser callback to stop parsing: the connection is answered ``status`` and closed."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def _response(status: int, body: bytes, headers: Iterable[tuple[str, str]], close: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json"]
    lines += [f"{name.lower()}: {value}" for name, value in headers]
    lines += [f"content-length: {len(body)}", *(["connection: close"] if close else []), "", ""]
    return "\r\n".join(lines).encode("ascii") + body


def _closing_response(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    return _response(status, orjson.dumps({"error": message}), headers, close=True)


# Pipelined requests waiting on one connection: at PIPELINE_PAUSE the connection is read no further until
# they are answered (one read may bring a few hundred small requests at once); past PIPELINE_CLOSE, all from
# reads already made, it is closed. A client that sends without reading its answers holds at most that.
PIPELINE_PAUSE = 8
PIPELINE_CLOSE = 1024
# What a held connection's client sends is read as it comes and kept unparsed until the connection is
# released, while it is one chunk of at most this many bytes (its next request, as a rule); past that,
# reading stops and the rest waits in the kernel. Stopping on every hold cost a request past capacity two
# more trips into the kernel (the event loop takes the socket out of epoll when its bytes come unread, and
# puts it back when released).
KEEP_BYTES = 16 * 1024


# Where a connection is in its current request, for the deadlines.
_IDLE, _HEAD, _BODY = "idle", "head", "body"


class Here(Protocol):
    """What the app gives the connection for the inference requests it answers itself."""

    def call(self, path: str, headers: list[tuple[bytes, bytes]]) -> InferenceCall | None:
        """For a POST to ``path`` with these headers, once its head has arrived: its inference call, not begun
        (None: not an inference request; it goes through ASGI). Raises ServeError for a request refused from
        its head alone (the API key)."""
        ...

    @property
    def draining(self) -> bool:
        """Whether each answer now tells its client to go (``Connection: close``)."""
        ...


class AnsweredHere:
    """An inference request the connection answers itself, in the place of uvicorn's RequestResponseCycle.

    An inference request needs nothing of ASGI: its head, its body and one response. Through uvicorn it cost
    a scope, a cycle with its event, a task, the app's layers, a ``receive`` and two ``send`` calls, each
    response header checked against two patterns, and two writes; here the connection's parser callbacks
    drive its ``InferenceCall`` directly (``begin`` at the head, ``add`` per chunk, ``submit_to`` at the end),
    its batcher hands it the outputs as the batch is split (it is the request's waiter: no future), and the
    answer leaves in one write. What uvicorn and this module read of a cycle (``response_started``,
    ``response_complete``, ``keep_alive``, ``disconnected``, ``message_event``) it keeps under the same names,
    so shutdown, draining, pipelining, holding back and the limits treat it as any other request. Each request
    runs in a context of its own, as a task would: its request id stays its own in the log.
    """

    __slots__ = ("call", "context", "disconnected", "inside", "keep_alive", "protocol", "response_complete",
                 "response_started", "submitted", "waited")  # fmt: skip

    def __init__(self, protocol: LimitedHttpToolsProtocol, keep_alive: bool) -> None:
        self.protocol, self.keep_alive = protocol, keep_alive
        self.call: InferenceCall | None = None
        self.context = contextvars.copy_context()
        self.response_started = self.response_complete = self.disconnected = self.submitted = False
        self.waited = False  # the batcher has handed it its outputs or its error
        self.inside = False  # in its context now (``_submit``)

    @property
    def message_event(self) -> AnsweredHere:
        """uvicorn sets its cycle's event when the connection is lost: ``set`` is that news."""
        return self

    def set(self) -> None:
        if self.disconnected and not self.submitted and self.call is not None:  # the body will never be whole
            self._fail(ClientDisconnected("the connection closed before the request body was complete"))

    def begin(self, call: InferenceCall, admitted: Any = None) -> None:
        """``admitted``: the model version the connection's admission let this request in to, in this step."""
        self.call = call
        self.context.run(self._step, call.begin, admitted)

    def add(self, chunk: bytes) -> None:
        if self.call is not None and not self.response_started:
            self.context.run(self._step, self.call.add, chunk)

    def complete(self) -> None:
        """The body is whole: parse it and queue it."""
        if self.call is not None and not self.response_started:
            self.submitted = True
            self.context.run(self._submit, self.call)

    def _step(self, step: Callable[..., None], *args: Any) -> None:
        try:
            step(*args)
        except Exception as e:
            self._fail(e)

    def _submit(self, call: InferenceCall) -> None:
        self.inside = True
        try:
            call.submit_to(self)
        except Exception as e:
            self._fail(e)
        finally:
            self.inside = False

    # The batcher's waiter (``service.batcher.Waiter``): the outputs come straight from the batch, in the
    # request's own context, with no future, no callback to schedule and no loop pass between.
    def done(self) -> bool:
        return self.waited

    def set_result(self, outputs: list[Any]) -> None:
        self.waited = True
        self._guarded(self._answer, outputs)

    def set_exception(self, error: BaseException) -> None:
        self.waited = True
        self._guarded(self._fail, error)

    def _guarded(self, step: Callable[[Any], None], arg: Any) -> None:
        """Run an answer's step for the batcher, whose batch goes on whatever this one does: in the request's
        context, which it is in already when its batch ran as it was queued (``Batcher._run_lone``)."""
        try:
            if self.inside:
                step(arg)
            else:
                self.context.run(step, arg)
        except Exception:
            log.exception("answering an inference request failed")

    def _answer(self, outputs: list[Any]) -> None:
        call = self.call
        assert call is not None
        try:
            body, header_length = call.encode(outputs)
        except Exception as e:
            self._fail(e)
            return
        self.call = None
        try:
            self.respond(200, response_headers(body, header_length), body)
        finally:  # counted, and its body's budget given back, once the answer is on its way
            call.succeeded()
            call.end()

    def _fail(self, error: Exception) -> None:
        if self.call is not None:
            self.call.fail(error)
            self.call.end()
            self.call = None
        self.respond(*asgi_error(error))

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """The whole response in one write, then the connection's next request (or its close)."""
        if self.response_started:
            return
        self.response_started = self.response_complete = True
        protocol = self.protocol
        transport = protocol.transport
        if self.disconnected or transport.is_closing():
            return
        if self.keep_alive and protocol.guard.here is not None and protocol.guard.here.draining:
            self.keep_alive = False
        head = [STATUS_LINE[status], _default_headers(protocol.server_state.default_headers)]
        for name, value in headers:
            head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n" if self.keep_alive else b"connection: close\r\n\r\n")
        head.append(body)
        transport.write(b"".join(head))
        if not self.keep_alive:
            transport.close()
        protocol.on_response_complete()


_DEFAULT_HEADERS: list[Any] = [None, b""]  # uvicorn's default headers (its list) and their bytes


def _default_headers(headers: list[tuple[bytes, bytes]]) -> bytes:
    """uvicorn's default response headers (date, server) as bytes: made again only when uvicorn makes a new
    list of them (each second, for the date)."""
    if headers is not _DEFAULT_HEADERS[0]:
        _DEFAULT_HEADERS[:] = [headers, b"".join(b"%s: %s\r\n" % pair for pair in headers)]
    return _DEFAULT_HEADERS[1]  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=1024)  # clients send the same few URLs again and again
def _path(url: bytes) -> str | None:
    """The path of a request's URL, where it needs no decoding; None where it does."""
    # A plain origin-form path is its own; anything else (a query, an absolute URL) is parsed as uvicorn does.
    # find, not ``in``: bytes' ``in`` first tries its operand as an int, and pays for the TypeError it raises.
    plain = url[:1] == b"/" and url[:2] != b"//" and url.find(b"?") < 0 and url.find(b"#") < 0
    path = url if plain else httptools.parse_url(url).path
    if path.find(b"%") >= 0:  # uvicorn decodes it: the app routes what that gives, and answers it the usual way
        return None
    return path.decode("ascii")


_FRAMING = len(b"GET  HTTP/1.1\r\n\r\n")  # a head's bytes besides its method, URL and header fields


class HeadReader:
    """What httptools' parser calls back with a request's head: its URL and header fields, kept for the
    connection (under uvicorn's names: ``url``, ``headers``, ``expect_100_continue``) and counted against the
    head's limits as they come, each URL piece and header field. An extension type when compiled
    (transport.pxd): each header field of each request is counted in C struct fields rather than through the
    connection's dictionary. The parser's other callbacks are the connection's own methods, which the parser
    finds here under the same names."""

    __slots__ = ("expect_100_continue", "header_bytes", "headers", "max_head_bytes", "max_header_count", "on_body",
                 "on_headers_complete", "on_message_complete", "protocol", "url")  # fmt: skip

    def __init__(self, protocol: LimitedHttpToolsProtocol) -> None:
        self.protocol = protocol
        self.max_head_bytes, self.max_header_count = protocol._max_head_bytes, protocol._max_header_count
        self.on_headers_complete = protocol.on_headers_complete
        self.on_body = protocol.on_body
        self.on_message_complete = protocol.on_message_complete
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.expect_100_continue = False
        self.header_bytes = 0  # of the current head: its framing, its URL and its complete header fields

    def on_message_begin(self) -> None:
        # uvicorn's own, less the ASGI scope: a request answered here needs none (``_scope`` makes it for one
        # that goes the ASGI way, before uvicorn's on_headers_complete reads it)
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self.header_bytes = _FRAMING
        self.protocol._phase = _HEAD

    # The head's limits per URL piece and header field, and one running count of its bytes.
    def on_url(self, url: bytes) -> None:
        self.url += url  # uvicorn's own
        self.header_bytes += len(url)
        if self.header_bytes > self.max_head_bytes:
            raise self.protocol._head_too_large(self.header_bytes)

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= self.max_header_count:
            message = (
                f"the request has more than {self.max_header_count} header fields, the most this server "
                "accepts (NORMSERVE_MAX_HEADER_COUNT)"
            )
            raise _Refusal(431, "too_many_headers", message)
        self.header_bytes += len(name) + len(value) + 4  # ": " and CRLF
        if self.header_bytes > self.max_head_bytes:
            raise self.protocol._head_too_large(self.header_bytes)
        name = name.lower()
        if name == b"transfer-encoding" and [c.strip().lower() for c in value.split(b",")] != [b"chunked"]:
            # RFC 9112 6.1: a coding the server does not know gets 501; reading the body as if it were only
            # chunked would hand the application bytes that are still gzip, say.
            raise _Refusal(
                501,
                "transfer_coding",
                f"Transfer-Encoding {value.decode('latin-1')[:100]!r} is not supported; send the body as it is "
                "or chunked (a compressed body goes with Content-Encoding: gzip)",
            )
        if name == b"expect" and value.lower() == b"100-continue":  # uvicorn's own
            self.expect_100_continue = True
        self.headers.append((name, value))


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, held to ``guard.limits`` (the class attribute that ``with_guard`` sets)."""

    guard: ClassVar[ConnectionGuard]
    _max_head_bytes: ClassVar[int]  # two of guard.limits, as class attributes (``with_guard``)
    _max_header_count: ClassVar[int]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._head = HeadReader(self)  # first: uvicorn's __init__ sets the head's fields (the properties below)
        super().__init__(*args, **kwargs)
        # The parser calls the head reader back, not the connection: uvicorn's parser is replaced, as it was set up.
        self.parser = httptools.HttpRequestParser(self._head)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self._phase = _IDLE
        self._deadline: asyncio.TimerHandle | None = None
        self._heads = 0  # request heads completed on this connection
        self._head_bytes = 0  # of the current head, counted from the chunks fed while it was incomplete
        self._lingering = False
        self._skipping = False  # the body of a request answered early: read and dropped
        self._client = "unknown"  # the client's address, once connected
        # The intakes of the requests read and not yet answered, oldest first (None: not an inference request).
        self._intakes: collections.deque[Intake | None] = collections.deque()
        self._held_on: Intake | None = None  # held back for this intake: not read until it releases us
        self._expectation: Expectation | None = None  # the slot an intake that released us keeps for our next request
        self._fd = -1  # the socket's, to ask the kernel what it holds unread
        self._skipped_for: Intake | None = None  # the intake of the request answered early whose body is skipped
        self._here: AnsweredHere | None = None  # the request answered here whose body is being read
        self._kept: bytes | None = None  # read while held, parsed once released (``_keep``)
        # The keep-alive clock: since when the connection has been idle (None: busy), read by one timer that
        # outlives requests (``_keep_alive``); uvicorn sets and cancels a timer per request, 2 µs each time.
        self._idle_since: float | None = None
        self._lazy_timer = False  # timeout_keep_alive_task is that timer (not the new connection's head timer)

    # uvicorn's per-request head state, which the head reader keeps: what uvicorn's own code reads and sets of it
    @property
    def url(self) -> bytes:
        return self._head.url

    @url.setter
    def url(self, url: bytes) -> None:
        self._head.url = url

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return self._head.headers

    @headers.setter
    def headers(self, headers: list[tuple[bytes, bytes]]) -> None:
        self._head.headers = headers

    @property
    def expect_100_continue(self) -> bool:
        return self._head.expect_100_continue

    @expect_100_continue.setter
    def expect_100_continue(self, expect: bool) -> None:
        self._head.expect_100_continue = expect

    @classmethod
    def with_guard(cls, guard: ConnectionGuard) -> type[LimitedHttpToolsProtocol]:
        limits = guard.limits
        head = {"_max_head_bytes": limits.max_head_bytes, "_max_header_count": limits.max_header_count}
        return type(cls.__name__, (cls,), {"guard": guard, **head})

    # Connections
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self._client = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1
        self.guard.clients[self._client] += 1
        limits = self.guard.limits
        if len(self.connections) > limits.max_connections:
            message = (
                f"{len(self.connections) - 1} connections are open, the most this server takes "
                f"(NORMSERVE_MAX_CONNECTIONS={limits.max_connections}); retry shortly or on another replica"
            )
            self._refuse(_Refusal(503, "connection_cap", message), (("retry-after", "1"),))
            return
        if (held := self.guard.clients[self._client]) > limits.max_connections_per_client:
            # One address may not take every connection: the others keep theirs.
            message = (
                f"this client ({self._client}) has {held - 1} connections open, the most one client may hold "
                f"(NORMSERVE_MAX_CONNECTIONS_PER_CLIENT={limits.max_connections_per_client} of "
                f"{limits.max_connections}); reuse them, or retry shortly"
            )
            self._refuse(_Refusal(503, "client_connection_cap", message), (("retry-after", "1"),))
            return
        # uvicorn arms its keep-alive timeout only after a response: a new connection gets the head's
        # timeout to start its first request, and is closed, unanswered, if it sends nothing.
        limits = self.guard.limits
        self.timeout_keep_alive_task = self.loop.call_later(limits.head_timeout_s, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        self._kept = None
        self._unset_keepalive_if_required()  # uvicorn cancels it only on a clean close
        while self._intakes:  # what was read and will not be answered now frees its model's slots
            if (intake := self._intakes.popleft()) is not None:
                intake.answered()
        if self._expectation is not None:
            self._expectation.met()
        if (left := self.guard.clients[self._client] - 1) > 0:
            self.guard.clients[self._client] = left
        else:
            self.guard.clients.pop(self._client, None)
        super().connection_lost(exc)

    def timeout_keep_alive_handler(self) -> None:
        if self._heads == 0 and not self.transport.is_closing():
            waited = self.guard.limits.head_timeout_s
            self.guard.closed("silent", f"no request within {waited:g} s of connecting (NORMSERVE_HEADER_TIMEOUT_S)")
        super().timeout_keep_alive_handler()

    # Parsing
    def data_received(self, data: bytes) -> None:
        if self._lingering:  # refused: what comes now is dropped
            return
        if self._held_on is not None or self._kept is not None:  # held, or its kept bytes not yet parsed
            self._keep(data)
            return
        if self._lazy_timer:
            self._idle_since = None  # busy: the keep-alive timer, due later, finds it so
        else:
            self._unset_keepalive_if_required()
        if self._phase is _IDLE:  # any byte begins a head (llhttp skips blank lines before a request line)
            self._phase = _HEAD
        in_head, heads = self._phase is _HEAD, self._heads
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:  # a callback's _Refusal comes as its context
            if isinstance(exc.__context__, _Refusal):
                self._refuse(exc.__context__)
                return
            if self._skipping:  # refused from its head already: one response to a request, then the end
                self.transport.close()
                return
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._phase is _HEAD:
            # In the same head from the chunk's start to its end: every byte of it was head. A head that
            # began inside the chunk (after a body, or an earlier request) is not counted for this chunk,
            # so the limit holds to within one read.
            self._head_bytes += len(data) if in_head and heads == self._heads else 0
            if self._head_bytes > self.guard.limits.max_head_bytes:
                self._refuse(self._head_too_large(self._head_bytes))
                return
        if self._phase is not _IDLE and self._deadline is None:
            timeout = self.guard.limits.head_timeout_s if self._phase is _HEAD else self.guard.limits.body_timeout_s
            self._deadline = self.loop.call_later(timeout, self._deadline_passed)
        elif self._phase is _IDLE and self._answered():
            # Idle with every request answered (one answered early completes no response of uvicorn's).
            self._idle()
        self._hold_back()

    def on_response_complete(self) -> None:
        intake = self._intakes.popleft() if self._intakes else None
        if intake is not None:
            intake.answered()  # which may release the connection held longest for it
            if self._hold_for(intake):
                # uvicorn's own, less what a held connection skips: reading on, and the keep-alive timeout
                self.server_state.total_requests += 1
                return
        # uvicorn's own (HttpToolsProtocol.on_response_complete), with the keep-alive clock in place of a timer
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:  # the next pipelined request starts
            self._idle_since = None
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self._keep_alive()
        self._hold_back()

    def _unset_keepalive_if_required(self) -> None:
        super()._unset_keepalive_if_required()
        self._lazy_timer, self._idle_since = False, None

    def _keep_alive(self) -> None:
        """Idle from now: closed if nothing comes within ``timeout_keep_alive`` (NORMSERVE_KEEP_ALIVE_S). One
        timer for the connection, not one per request: due, it closes the connection if idle that long, else
        is set again for when it would have been (``_keep_alive_due``)."""
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is not None and not self._lazy_timer:  # a new connection's head timer
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self._keep_alive_due)
            self._lazy_timer = True

    def _keep_alive_due(self) -> None:
        self.timeout_keep_alive_task, self._lazy_timer = None, False
        if self._idle_since is None or self.transport.is_closing():
            return  # busy: its answer starts the clock again
        left = self._idle_since + self.timeout_keep_alive - self.loop.time()
        if left > 0:  # busy for a while since the timer was set, and idle again for less than the timeout
            self.timeout_keep_alive_task = self.loop.call_later(left, self._keep_alive_due)
            self._lazy_timer = True
            return
        self._idle_since = None
        self.timeout_keep_alive_handler()

    def _hold_back(self) -> None:
        """Read no further from a client whose pipelined requests pile up, and close one that piled up too
        many from the reads already made (uvicorn runs one at a time, but reads on while they wait, and a
        client that never reads its answers would have the server hold every request and answer)."""
        if self.transport.is_closing():
            return
        waiting = len(self.pipeline)
        if waiting > PIPELINE_CLOSE:
            message = (
                f"{waiting} pipelined requests waited on one connection, past the {PIPELINE_CLOSE} it may have; "
                "read the answers before sending more"
            )
            self._refuse(_Refusal(503, "pipeline", message), (("retry-after", "1"),))
        elif waiting >= PIPELINE_PAUSE:
            self.flow.pause_reading()

    def on_headers_complete(self) -> None:
        if (version := self.parser.get_http_version()) not in ("1.0", "1.1"):  # a request line with none is 0.9
            raise _Refusal(505, "http_version", f"HTTP version {version} is not supported; send HTTP/1.1")
        self._cancel_deadline()
        self._phase = _BODY
        self._heads += 1
        self._head_bytes = 0
        path = self._post_path()
        intake, refusal, admitted = self._admission(path)
        if intake is not None:
            intake.arrived()
        self._intakes.append(intake)
        if self._expectation is not None:  # after ``arrived``: the slot moves from expected to in flight
            expectation, self._expectation = self._expectation, None
            expectation.met(arrived=expectation.intake is intake)  # or is freed: the client asked another model
        if refusal is not None and self.guard.refuse_early and self._answered_early(refusal, intake, version):
            return
        if (
            path is not None
            and self.guard.here is not None
            and self._answer_here(self.guard.here, path, admitted, version)
        ):
            return
        self._scope()
        super().on_headers_complete()

    def _scope(self) -> None:
        """The request's ASGI scope, as uvicorn's on_message_begin makes it (its headers are the list that
        ``HeadReader.on_header`` fills)."""
        self.scope = {  # type: ignore[typeddict-item]
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,  # type: ignore[typeddict-item]
            "root_path": self.root_path,
            "headers": self._head.headers,
            "state": self.app_state.copy(),
        }

    def on_body(self, body: bytes) -> None:
        if self._here is not None:
            self._here.add(body)
        elif not self._skipping:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._cancel_deadline()
        self._phase = _IDLE
        if self._here is not None:
            here, self._here = self._here, None
            here.complete()
            return
        if self._skipping:
            self._skipping = False
            if self._skipped_for is not None:
                intake, self._skipped_for = self._skipped_for, None
                self._hold_for(intake)
            return
        super().on_message_complete()

    # Answering here
    def _answer_here(self, here: Here, path: str, admitted: Any, version: str) -> bool:
        """Answer this request on the connection itself, with no ASGI cycle (``AnsweredHere``), if it is an
        inference request with nothing else in flight on its connection and nothing of HTTP it needs ASGI for
        (Expect: 100-continue, an upgrade, a root path); whether it is. ``version``: its HTTP version, as the
        parser gave it to ``on_headers_complete`` (which the parser formats anew each time it is asked)."""
        head = self._head
        if head.expect_100_continue or self.root_path or self.parser.should_upgrade():
            return False
        if self.cycle is not None and not self.cycle.response_complete:  # pipelined: uvicorn queues it
            return False
        try:
            call = here.call(path, head.headers)
        except Exception as e:  # refused from its head (the API key; a 500 for a bug): its body is read and dropped
            self._take_here(version).respond(*asgi_error(e))
            return True
        if call is None:
            return False
        self._take_here(version).begin(call, admitted)
        return True

    def _take_here(self, version: str) -> AnsweredHere:
        """The request answered here, in the place of uvicorn's cycle: what uvicorn and this class read of a
        request's state, and what receives its body."""
        keep_alive = version != "1.0" and self.parser.should_keep_alive()
        answered = self._here = AnsweredHere(self, keep_alive)
        self.cycle = answered  # type: ignore[assignment]
        return answered

    # Answering early
    def _answered(self) -> bool:
        return not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete)

    def _post_path(self) -> str | None:
        """The path of a POST, where it needs no decoding; None for any other request. Clients send the same
        few URLs again and again: each is worked out once (``_path``)."""
        if self.parser.get_method() != b"POST":
            return None
        return _path(self._head.url)

    def _admission(self, path: str | None) -> tuple[Intake | None, ServeError | None, Any]:
        """The intake, the refusal from its head and the version admitted of a POST (``ConnectionGuard.admission``)."""
        if self.guard.admission is None or path is None:
            return None, None, None
        return self.guard.admission(path)

    def _answered_early(self, refusal: ServeError, intake: Intake | None, version: str) -> bool:
        """Answer ``refusal`` from the request's head alone, with no ASGI request cycle: under overload it
        then costs the parse of a head and one write. Its body is read and dropped, and the connection
        serves the next request. Only a plain keep-alive HTTP/1.1 POST with nothing else in flight on its
        connection is answered so; any other goes the usual way."""
        if self._head.expect_100_continue or not self._answered():
            return False
        if version != "1.1" or not self.parser.should_keep_alive():
            return False
        status, headers, body = render(refusal)
        self.transport.write(_response(status, body, headers.items(), close=False))
        self.server_state.total_requests += 1
        self._intakes.pop()  # this request's: answered
        if intake is not None:
            intake.answered()
        self._skipping, self._skipped_for = True, intake
        return True

    # Holding back
    def _hold_for(self, intake: Intake) -> bool:
        """Read this connection no further while ``intake`` (of the request just answered) has its fill of
        requests in flight: what its client sends next waits unparsed until the intake releases it (``_keep``).
        Only an idle keep-alive connection is held: nothing of its next request read, nothing waiting.
        Whether it was held."""
        if not intake.full or self.transport.is_closing() or self._phase is not _IDLE or self._intakes:
            return False
        if self.pipeline or self._lingering or self._held_on is not None or self._kept is not None:
            return False
        self._unset_keepalive_if_required()  # waiting on the server is not idling
        self._held_on = intake
        intake.hold(self)
        # Forget the request just answered, which uvicorn keeps until the next one's head: a held connection
        # waits a while, and a thousand of them each keeping their last request alive (its scope, headers,
        # body and ASGI cycle) made the garbage collector's middle generation take twice as long, and every
        # request about 4 % more CPU at three times the capacity.
        self.cycle = self.scope = None  # type: ignore[assignment]  # as uvicorn's own before a first request
        self._head.headers = []
        return True

    def _keep(self, data: bytes) -> None:
        """Keep what came while held, or after release before what was kept is parsed, in order. A held
        connection is read no further past one chunk of at most KEEP_BYTES."""
        kept = self._kept = data if self._kept is None else self._kept + data
        if self._held_on is not None and (len(kept) > KEEP_BYTES or kept is not data):
            self.flow.pause_reading()

    def _parse_kept(self) -> None:
        """Parse what was kept while held, as if it came now."""
        if (kept := self._kept) is not None and self._held_on is None and not self.transport.is_closing():
            self._kept = None
            self.data_received(kept)

    def waiting(self) -> bool:
        """Whether the client has sent what the server has not parsed (``service.intake.Holdable``)."""
        if self._fd < 0 or self.transport.is_closing():
            return False
        if self._kept is not None:
            return True
        try:
            return waiting_bytes(self._fd) > 0
        except OSError:
            return False

    def released(self, expectation: Expectation | None) -> None:
        """Read again (``service.intake.Holdable``), with ``expectation``, the slot kept for our next request
        (None: the intake was retired)."""
        self._held_on = None
        if self.transport.is_closing():
            if expectation is not None:
                expectation.met()
            return
        self._expectation = expectation
        if self._kept is not None:  # its next request came while held: parsed on the loop's next turn
            self.loop.call_soon(self._parse_kept)
        elif expectation is None:
            self._idle()
        self.flow.resume_reading()

    def lapsed(self, expectation: Expectation) -> None:
        """Nothing came within EXPECT_S of being released (``service.intake.Holdable``): idle."""
        if self._expectation is expectation:
            self._expectation = None
            if self._phase is _IDLE and not self._intakes and not self.transport.is_closing():
                self._idle()

    def _idle(self) -> None:
        """Start the keep-alive timeout of an idle connection."""
        if self._idle_since is None:
            self._keep_alive()

    # Refusing
    def _head_too_large(self, size: int) -> _Refusal:
        message = (
            f"the request line and headers passed {size} bytes; this server accepts at most {self._max_head_bytes} "
            "(NORMSERVE_MAX_HEADER_BYTES): send large data in the body"
        )
        return _Refusal(431, "head_too_large", message)

    def _deadline_passed(self) -> None:
        self._deadline = None
        limits = self.guard.limits
        if self._phase is _HEAD:
            message = f"the request head did not arrive within {limits.head_timeout_s:g} s (NORMSERVE_HEADER_TIMEOUT_S)"
            self._refuse(_Refusal(408, "head_timeout", message))
        elif self._phase is _BODY:
            message = f"the request body did not arrive within {limits.body_timeout_s:g} s (NORMSERVE_BODY_TIMEOUT_S)"
            self._refuse(_Refusal(408, "body_timeout", message))

    def _refuse(self, refusal: _Refusal, headers: tuple[tuple[str, str], ...] = ()) -> None:
        """Answer ``refusal`` where no other response is under way, and close the connection. A request
        whose body is still awaited hears ``http.disconnect``, and whatever it answers later is dropped.

        The server's side closes at once (the client reads the answer, then the end); what the client still
        sends is read and dropped for up to LINGER_S, so that it is not reset before it reads the answer.
        """
        self._cancel_deadline()
        self._unset_keepalive_if_required()
        # Done with, though it lingers a moment: it no longer counts against NORMSERVE_MAX_CONNECTIONS, or
        # a client refused past its share would still fill the cap for everyone while its sockets linger.
        self.connections.discard(self)
        cycle = self.cycle
        if not self._skipping and (cycle is None or cycle.response_complete or not cycle.response_started):
            self.transport.write(_closing_response(refusal.status, refusal.message, headers))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        self.guard.closed(refusal.reason, f"{refusal.status}: {refusal.message}")
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._lingering = True
            self.flow.resume_reading()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


def raise_file_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit; returns (before, after).

    Each connection is a file descriptor: at a soft limit of 1,024 (a common default) the 1,025th client
    is reset by the kernel with nothing in the server's log.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = UNLIMITED_FILES if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the soft limit on open files from %d to %d: %s", soft, wanted, exc)
            return soft, soft
        return soft, wanted
    return soft, soft


def server_config(app: NormserveApp, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration of a server of ``app``, held to the settings' connection limits.

    The connection cap is lowered to what the soft file limit leaves room for, with a warning.
    """
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    room = settings.max_connections if files == resource.RLIM_INFINITY else max(1, files - RESERVED_FILES)
    if room < settings.max_connections:
        log.warning(
            "NORMSERVE_MAX_CONNECTIONS=%d is more than the open-file limit (%d) leaves room for: capping "
            "connections at %d; raise the hard limit (ulimit -Hn, or the container's nofile) for more",
            settings.max_connections,
            files,
            room,
        )
    limits = ConnectionLimits.from_settings(settings, min(room, settings.max_connections))
    # Refusals from the head alone skip the API key check: only where inference needs no key.
    keyed = settings.api_key is not None and "inference" in settings.api_key_protects
    guard = ConnectionGuard(
        limits,
        app.state.normserve.metrics.connection_closed,
        app.inference.admission,
        refuse_early=not keyed,
        here=InferenceHere(app),
    )
    protocol = LimitedHttpToolsProtocol.with_guard(guard)
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop",
        "http": protocol,
        "log_config": None,
        "access_log": False,
        "timeout_keep_alive": settings.keep_alive_s,
        "timeout_graceful_shutdown": settings.shutdown_timeout_s,
    }
    return uvicorn.Config(app, **(options | overrides))
