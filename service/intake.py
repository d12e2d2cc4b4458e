"""How many requests one model version takes in at once, and the connections held back until it takes more.

Past its capacity a server can only spend its core on the excess: even a 503 from the request's head alone
costs its read, its parse and its answer (tens of microseconds), and at ten times the capacity of a model
whose request costs a few hundred, the refusals alone fill the core and goodput collapses. So a model's
keep-alive connections are read only while it wants more requests: once ``limit`` of its requests are in
flight (read, and not yet answered), a connection whose answer has just gone out is *held*: the server
stops parsing it, and what its client sends next waits unparsed at no cost to the server (its first chunk
read and kept, as a rule the whole next request; anything more in the kernel's socket buffer: see
``service.transport.KEEP_BYTES``). Each answer releases the connection held longest, so held connections
are read in the order they were held, and keeps a slot for its next request until its head arrives. A
slot whose request has not come within EXPECT_S is given back, unless bytes of it wait unparsed (the loop
is behind): its client is idle. Nothing is read and then dropped, and nothing parsed is half-done: a
request is either not parsed at all, or read, queued and answered.

What is not held: a new connection's first request (nothing tells which model it is for), a request on a
connection that last asked something else, a connection whose client said ``Connection: close``. Those
arrive as before, and the model's queue limit still answers them 503 with Retry-After from their head.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import struct
import termios
from collections.abc import Callable
from time import monotonic
from typing import Protocol

__all__ = ["EXPECT_S", "Expectation", "Holdable", "Intake", "waiting_bytes"]

# How long a released connection's slot waits for its next request before the kernel is asked whether any
# of it has come (not yet read: the slot is kept) or none (its client is idle: the slot is given back).
EXPECT_S = 0.1


class Holdable(Protocol):
    """A connection that can be held back on an intake (``service.transport.LimitedHttpToolsProtocol``)."""

    def waiting(self) -> bool:
        """Whether its client has sent bytes the server has not parsed (False once it is closing)."""

    def released(self, expectation: Expectation | None) -> None:
        """Read it again; ``expectation``: the slot kept for its next request (None: the intake is retired)."""

    def lapsed(self, expectation: Expectation) -> None:
        """Nothing of its next request came within EXPECT_S of ``expectation``: it is idle."""


class Expectation:
    """The slot a released connection's next request takes when its head arrives (``met(arrived=True)``),
    or that it gives back if it closes first (``met()``) or sends nothing (it lapses)."""

    __slots__ = ("connection", "intake", "lapse_at", "open")

    def __init__(self, intake: Intake, connection: Holdable, lapse_at: float) -> None:
        self.intake, self.connection, self.lapse_at, self.open = intake, connection, lapse_at, True

    def met(self, arrived: bool = False) -> None:
        """``arrived``: its request did (the slot passes to it, and none is freed)."""
        if self.open:
            self.open = False
            self.intake.expected -= 1
            if not arrived:
                self.intake.release()


class Intake:
    """One model version's requests in flight and the connections held back for it.

    ``limit`` is how many requests may be in flight (read and not yet answered) before connections are
    held: its batcher sets it from its batch size and the rows its requests carry. 0 turns holding off.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # Told each time the number held changes, where a gauge must be set rather than read (worker processes).
        self.changed: Callable[[], None] | None = None
        self.in_flight = 0  # requests read and not yet answered
        self.expected = 0  # released connections whose request has not arrived yet (open expectations)
        self.held: collections.deque[Holdable] = collections.deque()
        self._expectations: collections.deque[Expectation] = collections.deque()  # by when they lapse
        self._lapse_timer: asyncio.TimerHandle | None = None
        self.closed = False

    @property
    def full(self) -> bool:
        """Whether a connection answered now should be held rather than read on: the model has its fill of
        requests in flight, or others are held already (they go first)."""
        if self.closed or self.limit <= 0:
            return False
        return bool(self.held) or self.in_flight + self.expected >= self.limit

    def arrived(self) -> None:
        self.in_flight += 1

    def answered(self) -> None:
        self.in_flight -= 1
        self.release()

    def hold(self, connection: Holdable) -> None:
        self.held.append(connection)
        if self.changed is not None:
            self.changed()

    def release(self) -> None:
        """Read held connections again, oldest first, while the model has room, each with a slot kept for
        its next request."""
        if not self.held:
            return
        held = len(self.held)
        self._release()
        if self.changed is not None and len(self.held) != held:
            self.changed()

    def _release(self) -> None:
        if self.closed:
            while self.held:
                self.held.popleft().released(None)
            return
        lapse_at = monotonic() + EXPECT_S
        while self.held and self.in_flight + self.expected < self.limit:
            connection = self.held.popleft()
            expectation = Expectation(self, connection, lapse_at)
            self._expectations.append(expectation)
            self.expected += 1
            connection.released(expectation)
        if self._expectations and self._lapse_timer is None:
            self._lapse_timer = asyncio.get_running_loop().call_later(EXPECT_S, self._lapse)

    def _lapse(self) -> None:
        """The intake's one timer: forget the expectations met, give back the slots of those whose
        connection sent nothing within EXPECT_S, keep those whose bytes wait unparsed (the loop is behind),
        and run again while any is left."""
        self._lapse_timer = None
        now = monotonic()
        expectations = self._expectations
        while expectations and (not expectations[0].open or expectations[0].lapse_at <= now):
            expectation = expectations.popleft()
            if not expectation.open:
                continue
            if not self.closed and expectation.connection.waiting():
                expectation.lapse_at = now + EXPECT_S
                expectations.append(expectation)
                continue
            expectation.open = False
            self.expected -= 1
            expectation.connection.lapsed(expectation)
        self.release()
        if expectations and self._lapse_timer is None:
            wait = max(0.0, expectations[0].lapse_at - monotonic())
            self._lapse_timer = asyncio.get_running_loop().call_later(wait, self._lapse)

    def close(self) -> None:
        """The model version is retired: every held connection is read again, and no slot is kept."""
        self.closed = True
        self.release()
        if self._lapse_timer is not None:
            self._lapse_timer.cancel()
            self._lapse_timer = None
        for expectation in self._expectations:
            expectation.open = False
        self._expectations.clear()
        self.expected = 0


def waiting_bytes(fd: int) -> int:
    """Bytes received on socket ``fd`` that nobody has read yet (FIONREAD): one system call."""
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])
