"""The two ways to load a server, over keep-alive HTTP/1.1 connections that carry one request at a time.

- **Closed loop** (``concurrency=N``): N clients, each sending its next request the moment its
  last answer arrives. Latency runs from the send. This is how wrk, hey and perf_analyzer's
  concurrency mode load a server; a slow server is sent less, so it also hides part of its queue.
- **Open loop** (``rate=R``): requests are due on a fixed schedule (evenly spaced, or Poisson)
  whatever the server does. A due request goes out on a free connection, or waits for one, and
  its latency runs from the time it was *due*, so a stalled server is charged for every request
  that queued behind it (what wrk2 calls correcting coordinated omission).

The HTTP client is a small asyncio protocol with the requests' bytes built in advance: the
generator has to outrun the server it measures on a core of its own.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

from bench.loadgen.stats import Window

__all__ = ["Target", "Load", "encode_request"]

clock = time.perf_counter
# The open loop wakes at most this often (libuv counts timers in whole milliseconds) and sends every request
# due since: at tens of thousands of
# requests a second, a timer per request would take the generator's whole core. A request's latency still
# runs from its due time, so the wake-up's delay is charged, not hidden.
TICK_S = 1e-3


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str, path: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"url is {url!r}; expected http://HOST:PORT")
        return cls(parts.hostname, parts.port or 80, path)


def encode_request(target: Target, body: bytes, headers: dict[str, str]) -> bytes:
    """A complete HTTP/1.1 POST, ready to write."""
    lines = [f"POST {target.path} HTTP/1.1", f"Host: {target.host}:{target.port}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Connection(asyncio.Protocol):
    """One keep-alive connection. ``origin`` is the time a request's latency is measured from."""

    def __init__(self, load: Load) -> None:
        self.load = load
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.busy = False
        self.origin = 0.0
        self.sent = 0.0
        self.status = 0
        self.body_start = -1  # where the body starts in the buffer, once the head is in
        self.length = 0
        self.retry_after = False
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport

    def send(self, request: bytes, origin: float) -> None:
        assert self.transport is not None
        self.busy, self.origin, self.sent = True, origin, clock()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if self.body_start < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end]).lower() + b"\r\n"
            at = head.find(b"\r\ncontent-length:")
            if not head.startswith(b"http/1.1 ") or at < 0:
                self.broken("a response without Content-Length (normserve, Triton and uvicorn always send it)")
                return
            self.status = int(head[9:12])
            self.retry_after = b"\r\nretry-after:" in head
            # The server (a draining one, a proxy) closes after this answer: no request may follow on it.
            self.closing = b"\r\nconnection: close" in head
            self.length = int(head[at + 17 : head.find(b"\r\n", at + 2)])
            self.body_start = end + 4
        if len(buffer) < self.body_start + self.length:
            return
        done = clock()
        stop = self.body_start + self.length
        body = bytes(buffer[self.body_start : stop]) if self.status >= 300 else b""
        del buffer[:stop]
        self.body_start = -1
        self.busy = False
        self.load.answered(
            self, self.status, done - self.origin, body, done - self.sent, self.retry_after, reusable=not self.closing
        )

    def broken(self, reason: str) -> None:
        if self.busy:
            self.busy = False
            self.load.failed(self, reason)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.busy:
            self.busy = False
            self.load.failed(self, f"connection lost: {exc or 'closed by the server'}")
        self.load.lost(self)


class Load:
    """Drives one level of load (a concurrency or a rate), recording every answer into ``self.window``.

    The caller calls ``connect`` and ``start``, then ``measure`` once the warm-up is over, swaps
    windows with ``swap``, and ends with ``stop``, ``drain`` and ``close``.
    """

    def __init__(
        self,
        target: Target,
        requests: list[bytes],
        *,
        concurrency: int = 0,
        rate: float = 0.0,
        connections: int = 64,
        poisson: bool = False,
        timeout_s: float = 30.0,
        seed: int = 0,
    ) -> None:
        if (concurrency > 0) == (rate > 0):
            raise ValueError("give a concurrency (closed loop) or a rate (open loop), not both")
        self.target, self.requests = target, requests
        self.open_loop = rate > 0
        self.size = connections if self.open_loop else concurrency
        self.rate, self.poisson, self.timeout_s = rate, poisson, timeout_s
        self.random = random.Random(seed)
        self.window = Window(start=clock())
        self.connections: set[Connection] = set()
        self.free: list[Connection] = []
        self.backlog: deque[float] = deque()  # due times of open-loop requests waiting for a connection
        self.max_backlog = 0
        self.sending = False
        self.sent = 0  # requests sent (open loop: come due) since ``sent`` was last reset
        self.limit: int | None = None
        self.measure_from = 0.0  # answers to requests sent or due before this are not recorded
        self.due = 0.0  # when the next open-loop request is due
        self._next = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._ticker: asyncio.TimerHandle | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    # -- connections ------------------------------------------------------------------------------

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            transport, connection = await loop.create_connection(
                lambda: Connection(self), self.target.host, self.target.port
            )
        except OSError as exc:
            raise ConnectionError(f"cannot connect to {self.target.host}:{self.target.port}: {exc}") from exc
        connection.transport = transport  # uvloop calls connection_made a loop pass later
        self.connections.add(connection)
        return connection

    async def connect(self) -> None:
        self.free = list(await asyncio.gather(*(self._connect() for _ in range(self.size))))

    def lost(self, connection: Connection) -> None:
        """A connection closed: replace it while there is work for it."""
        if connection not in self.connections:
            return
        self.connections.discard(connection)
        if connection in self.free:
            self.free.remove(connection)
        if self.sending or self.backlog:
            task = asyncio.get_running_loop().create_task(self._replace())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _replace(self) -> None:
        while True:
            try:
                connection = await self._connect()
            except ConnectionError as exc:
                self.window.fail("connection", str(exc))
                if not self.sending:
                    return
                await asyncio.sleep(0.1)
                continue
            self._next_for(connection)
            return

    # -- sending ----------------------------------------------------------------------------------

    def _body(self) -> bytes:
        self._next += 1
        return self.requests[self._next % len(self.requests)]

    def _may_send(self) -> bool:
        return self.sending and (self.limit is None or self.sent < self.limit)

    def _next_for(self, connection: Connection) -> None:
        """Give a connection that just became free its next request, or park it."""
        if self.backlog:
            connection.send(self._body(), self.backlog.popleft())
        elif not self.open_loop and self._may_send():
            self.sent += 1
            connection.send(self._body(), clock())
        else:
            self.free.append(connection)

    def start(self) -> None:
        self.sending = True
        if self.open_loop:
            self.due = clock()
            self._tick()
        else:
            free, self.free = self.free, []
            for connection in free:
                self._next_for(connection)
        self._sweep()

    def _gap(self) -> float:
        return self.random.expovariate(self.rate) if self.poisson else 1.0 / self.rate

    def _tick(self) -> None:
        """Send every open-loop request now due, whatever the answers to earlier ones are doing."""
        now = clock()
        while self.due <= now and self._may_send():
            self.sent += 1
            if self.free:
                self.free.pop().send(self._body(), self.due)
            else:  # it goes out as soon as a connection frees up, and its wait counts
                self.backlog.append(self.due)
                self.max_backlog = max(self.max_backlog, len(self.backlog))
            self.due += self._gap()
        if self._may_send():
            wait = max(self.due - clock(), TICK_S)
            self._ticker = asyncio.get_running_loop().call_later(wait, self._tick)

    def _sweep(self) -> None:
        """Fail requests that have waited past the timeout; their connections are replaced."""
        now = clock()
        for connection in list(self.connections):
            if connection.busy and now - connection.sent > self.timeout_s:
                connection.broken("timeout")
        self._sweeper = asyncio.get_running_loop().call_later(0.1, self._sweep)

    # -- answers ----------------------------------------------------------------------------------

    def answered(
        self,
        connection: Connection,
        status: int,
        latency_s: float,
        body: bytes,
        response_s: float = 0.0,
        retry_after: bool = False,
        reusable: bool = True,
    ) -> None:
        """One answer: ``latency_s`` from its origin (the send, or the due time), ``response_s`` from the send.
        A connection the answer closed (``reusable`` False, ``Connection: close``) is closed here, and replaced
        as any lost one is, instead of being given the next request."""
        if connection.origin >= self.measure_from:
            self.window.record(status, latency_s, body, response_s)
            if status == 503:
                self.window.refused(response_s, retry_after)
        elif 200 <= status < 300 and self.measure_from:
            self.window.carry(response_s)
        if reusable:
            self._next_for(connection)
        elif connection.transport is not None:
            connection.transport.close()

    def failed(self, connection: Connection, reason: str) -> None:
        if connection.origin >= self.measure_from:
            self.window.fail("timeout" if reason == "timeout" else "connection", reason)

    def measure(self, limit: int | None = None) -> None:
        """Record only requests sent (or due) from now on, and send at most ``limit`` of them."""
        self.measure_from = clock()
        self.swap(self.measure_from)
        self.sent, self.limit = 0, limit

    # -- windows and stopping ---------------------------------------------------------------------

    def swap(self, now: float | None = None) -> Window:
        """Close the current window at ``now`` and open the next; returns the closed one."""
        now = clock() if now is None else now
        closed, self.window = self.window, Window(start=now)
        closed.end = now
        return closed

    @property
    def outstanding(self) -> int:
        """Requests sent or due and not yet answered."""
        return sum(c.busy for c in self.connections) + len(self.backlog)

    @property
    def finished(self) -> bool:
        """With a ``limit``: every request it allowed has been sent and answered."""
        return self.limit is not None and self.sent >= self.limit and self.outstanding == 0

    def stop(self) -> None:
        """Send nothing new; requests already due (the open loop's backlog) still go out."""
        self.sending = False
        if self._ticker is not None:
            self._ticker.cancel()

    def drop_backlog(self) -> int:
        """Forget the open loop's requests still waiting for a free connection (never sent); returns how many."""
        dropped = len(self.backlog)
        self.backlog.clear()
        return dropped

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every request sent or due is answered; False if some were still out at the timeout."""
        deadline = clock() + timeout_s
        while self.outstanding and clock() < deadline:
            await asyncio.sleep(0.005)
        return self.outstanding == 0

    def close(self) -> None:
        """Close every connection, and give up those still being opened to replace lost ones. The sockets close on
        the loop's next pass (``run_level`` gives it one)."""
        self.stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in self._tasks:
            task.cancel()
        connections, self.connections = self.connections, set()
        for connection in connections:
            if connection.transport is not None:
                connection.transport.close()
