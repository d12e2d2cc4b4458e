"""Dynamic batching: one queue and one worker per model version.

A batch closes when it holds ``max_batch_size`` rows or when its first request has waited
``max_queue_delay_s``, whichever comes first. With a delay of 0 the worker takes whatever queued
while the previous batch ran, so a lone request never waits and a loaded server batches by itself.
A request of several rows counts as that many rows and is never split across batches. Each caller
gets back exactly its own rows: BatchNorm's running statistics make a row's answer independent of
the rows it shared a batch with. A batch that fails runs again one request at a time, so that a
request whose values the model refuses fails alone. A graph whose answer does depend on its batch
(the batch-statistics graph of the batchnorm endpoint) gets a batcher with ``max_requests=1``: each
request is one batch.

Where a batch runs is decided from its cost, measured at warm-up, and from the cores the server
may use. With a second core, a batch that costs more than ``OVERLAP_BUDGET_S`` runs on the
batcher's own thread, so the loop parses the next requests on one core while onnxruntime computes
on another. On a single core nothing can overlap, and the thread hop only adds context switches:
batches run on the loop unless they would block it for more than ``LOOP_BLOCK_BUDGET_S``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import enum
import logging
import math
from collections.abc import Callable, Generator
from time import monotonic, perf_counter
from typing import Protocol, cast

import numpy as np

from service.errors import BatchFailed, DeadlineExceeded, NotReady, Overloaded, ServeError
from service.intake import Intake
from service.metrics import ModelMetrics

__all__ = ["LOOP_BLOCK_BUDGET_S", "OVERLAP_BUDGET_S", "Batcher"]

log = logging.getLogger(__name__)

OVERLAP_BUDGET_S = 0.5e-3  # with 2+ cores, a batch longer than this runs on a thread: compute overlaps parsing
_QUIET_PASSES = 2  # loop passes without a new request before a batch is taken (with no queue delay set)
_MAX_PASSES = 16  # however steadily requests trickle in, a batch is taken after this many passes
_DRAIN_WEIGHT = 0.2  # the weight of the newest batch in the drain rate's moving average
LOOP_BLOCK_BUDGET_S = 10e-3  # on any machine, a batch longer than this runs on a thread: the loop stays live
# A request is queued only when its answer is expected within this share of the time it has left: the rest
# is kept for the estimate's error and the answer's way back to the client, so that what is accepted
# arrives within its deadline at the tail too. A queue that deep still keeps the model busy.
DEADLINE_SHARE = 0.9
INTAKE_MIN = 4  # requests a model takes in at once at least, however many rows they carry
TIMER_SLACK_S = 1e-3  # the loop's timers keep time to the millisecond: one may fire that much early
_ROWS_WEIGHT = 0.05  # the weight of the newest request in the moving average of rows per request


Feeds = dict[str, np.ndarray]
Outputs = list[np.ndarray]


class _Phase(enum.Enum):
    QUEUED = 1
    RUNNING = 2
    EXPIRED = 3


class Waiter(Protocol):
    """Where a request's outputs (or its error) go: an asyncio future, or an object that answers at once when
    told (``service.transport.AnsweredHere``, which spares a request the future, its callback's scheduling and
    a loop pass). The batcher calls nothing else of it."""

    def done(self) -> bool: ...

    def set_result(self, result: Outputs, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


class _Request:
    """One queued request: its inputs and rows, the waiter its outputs go to, and the ``time.monotonic()``
    when it was queued and after which it must not run. (A plain class: batcher.pxd makes it an extension
    type when compiled, which a dataclass cannot be.)"""

    __slots__ = ("deadline", "enqueued", "feeds", "future", "phase", "rows")

    def __init__(self, feeds: Feeds, rows: int, future: Waiter, enqueued: float, deadline: float) -> None:
        self.feeds, self.rows, self.future, self.enqueued, self.deadline = feeds, rows, future, enqueued, deadline
        self.phase = _Phase.QUEUED


class Batcher:
    """Queue requests for one model version and run them in batches.

    Args:
        name: the model and version, for messages.
        run: runs one batch, returning the outputs in a fixed order.
        estimate: seconds a batch of n rows is expected to take (decides on the loop or on the thread).
        max_batch_size: rows per batch at most.
        max_queue_delay_s: how long the first request of a batch may wait for more.
        queue_limit: queued requests at most; past it, requests are refused with 503.
        metrics: this model version's metric children.
        cores: the cores the server may use (``service.machine.available_cores``).
        max_requests: requests per batch at most; 1 runs each request as its own batch, unmixed.
        intake_batches: how many full batches' worth of requests may be in flight before the model's
            connections are held back (``intake``, ``service.intake``); 0: never held; None: 1 on one core,
            where nothing overlaps, 2 on more, where one batch computes while the next is read and parsed.
        idle_spin_s: once the queue empties, how long the worker keeps the event loop polling for the next
            request before it sleeps (``_spin``), while requests come that close together; 0: it sleeps at once.
    """

    def __init__(
        self,
        name: str,
        run: Callable[[Feeds], Outputs],
        estimate: Callable[[int], float],
        max_batch_size: int,
        max_queue_delay_s: float,
        queue_limit: int,
        metrics: ModelMetrics,
        cores: int = 1,
        max_requests: int | None = None,
        limit_setting: str = "NORMSERVE_QUEUE_LIMIT",
        intake_batches: float | None = 0.0,
        idle_spin_s: float = 0.0,
    ) -> None:
        self.name = name
        self.limit_setting = limit_setting  # named when the queue refuses
        self.max_requests = max_requests
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.queue_limit = queue_limit
        self._run = run
        self._estimate = estimate
        self._loop_budget_s = OVERLAP_BUDGET_S if cores > 1 else LOOP_BLOCK_BUDGET_S
        self.idle_spin_s = idle_spin_s
        # Whether the last wait on an empty queue ended within idle_spin_s: only then does the next one spin (``_work``)
        self._spin_pays = True
        # Whether the worker waits on an empty queue (spinning or asleep), with no batch since it began to:
        # a lone request that comes then runs as it is queued (``_enqueue``)
        self._idle = False
        self._metrics = metrics
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued = 0  # requests in the queue that are still waiting (not expired)
        self._queued_rows = 0
        self._running_rows = 0  # of the batch being run now
        self._last_batch_rows = 0  # of the last batch run
        self._last_requests = 0  # in the last batch run
        self._arrivals = 0  # requests ever queued: tells the worker whether more are still coming in
        self._last_arrival = 0.0  # the ``time.monotonic()`` when the last of them was queued
        # The worker's, while it waits on an empty queue: the next request resolves it (an asyncio.Event's set()
        # is Python code, run for every request).
        self._waiting: asyncio.Future[None] | None = None
        self._full: asyncio.Future[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None  # the queue's one deadline timer (``_arm_expiry``)
        self._expiry_at = math.inf
        self._task: asyncio.Task[None] | None = None
        # The loop it serves on, from ``start``: asyncio.get_running_loop() asks the kernel for the process id
        # each time it is called (a system call a request).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._closing = False
        # Wall-clock seconds a row takes to drain from a backlogged queue (see ``expected_latency_s``).
        self._row_s = estimate(max_batch_size) / max_batch_size
        self._last_take = 0.0
        self._last_rows = 0  # rows of the last batch taken while others waited behind it (0: none did)
        self._mean_rows = 1.0  # rows per request, a moving average
        self.intake_batches = intake_batches if intake_batches is not None else (1.0 if cores == 1 else 2.0)
        self.intake = Intake(self.intake_limit())
        # The pending gauge: read at scrape time in one process (None here), else set each time it changes.
        self._pending_source = self._queued_now
        self._pending_changed = metrics.watch_pending(self._pending_source)
        if self.intake.limit > 0:
            self.intake.changed = metrics.watch_held(lambda: len(self.intake.held))

    def intake_limit(self) -> int:
        """Requests in flight (read and not yet answered) before the model's connections are held back:
        ``intake_batches`` full batches at the rows its requests have carried (within the queue limit); 0
        when holding is off."""
        if self.intake_batches <= 0:
            return 0
        wanted = math.ceil(self.intake_batches * self.max_batch_size / self._mean_rows)
        return min(max(INTAKE_MIN, wanted), self.queue_limit)

    @property
    def pending(self) -> int:
        return self._queued

    def _queued_now(self) -> int:
        return self._queued

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._work(), name=f"batcher {self.name}")

    async def stop(self) -> None:
        """Refuse new requests, run every request already accepted, then stop."""
        self._closing = True
        self.intake.close()
        self._wake_worker()
        if self._full is not None:
            _resolve(self._full)  # a batch waiting out its delay runs now
        if self._task is not None:
            await self._task
        if self._expiry is not None:  # every accepted request has run: nothing is left to expire
            self._expiry.cancel()
            self._expiry = None
        if self._thread is not None:
            self._thread.shutdown(wait=True)
        self._metrics.unwatch_pending(self._pending_source)

    async def submit(self, feeds: Feeds, rows: int, deadline: float) -> Outputs:
        """Queue one request of ``rows`` rows and wait for its own rows of every output (with
        ``max_requests=1``: every output whole, per-batch values included).

        Args:
            feeds: the request's validated inputs, each with ``rows`` rows.
            rows: its batch dimension, 1..max_batch_size.
            deadline: ``time.monotonic()`` by which it must be answered: past it, or once its batch
                could not end before it, it is not run (504).
        """
        return await self.enqueue(feeds, rows, deadline)

    def enqueue(self, feeds: Feeds, rows: int, deadline: float) -> asyncio.Future[Outputs]:
        """``submit`` without the wait: queued (or refused) before this returns, with no await in between,
        so that a caller can queue on two batchers before a reload can retire either. Cancelling the
        future takes the request out of its batch."""
        return cast("asyncio.Future[Outputs]", self._enqueue(feeds, rows, deadline, None))

    def enqueue_to(self, feeds: Feeds, rows: int, deadline: float, waiter: Waiter) -> None:
        """``enqueue``, with the outputs (or the error) handed to ``waiter`` rather than to a future."""
        self._enqueue(feeds, rows, deadline, waiter)

    def _enqueue(self, feeds: Feeds, rows: int, deadline: float, waiter: Waiter | None) -> Waiter:
        self.admit()
        now = monotonic()
        wait = self.expected_latency_s(rows)
        left = deadline - now
        if left * DEADLINE_SHARE < (alone := rows * self._row_s):
            # Not "overloaded, retry": with nothing queued it would not be met either, and a client that
            # retries on 503 would retry forever.
            raise DeadlineExceeded(
                f"the request's deadline leaves {max(0.0, left) * 1000:.3g} ms, and model {self.name} takes about "
                f"{alone * 1000:.3g} ms to run its {rows} row(s) with nothing queued ahead ({DEADLINE_SHARE:.0%} "
                "of the deadline at most, the rest kept for the answer's way back); it was not run: a retry "
                "would fail the same way, set a longer timeout"
            )
        if left * DEADLINE_SHARE < wait:
            raise Overloaded(
                f"model {self.name} would answer this request in about {wait * 1000:.0f} ms ({self._queued_rows} "
                f"rows queued ahead of it), past {DEADLINE_SHARE:.0%} of the {max(0.0, left) * 1000:.0f} ms left "
                "before its deadline (the rest is kept for the answer's way back); "
                "it was not queued: retry later, or set a longer timeout"
            )
        loop = self._loop
        assert loop is not None  # admit() refuses before start()
        request = _Request(feeds, rows, waiter if waiter is not None else loop.create_future(), now, deadline)
        if self._expiry is None or deadline < self._expiry_at:
            self._arm_expiry(deadline)
        self._queue.append(request)
        if rows != self._mean_rows:
            self._mean_rows += _ROWS_WEIGHT * (rows - self._mean_rows)
            self.intake.limit = self.intake_limit()
        self._arrivals += 1
        self._last_arrival = now
        self._queued += 1
        self._queued_rows += rows
        if self._pending_changed is not None:
            self._pending_changed()
        if self._idle and self._last_requests == 1 and self._queued == 1 and self._runs_now(rows):
            self._run_lone()
        self._wake_worker()
        if self._full is not None and self._queued_rows >= self.max_batch_size and not self._full.done():
            self._full.set_result(None)
        return request.future

    def _runs_now(self, rows: int) -> bool:
        """Whether a lone request of ``rows`` rows, queued while the worker waits on an empty queue after a
        batch of one request, runs as it is queued (``_run_lone``): with no queue delay, on the loop."""
        return self.max_queue_delay_s <= 0 and not self._closing and self._estimate(rows) <= self._loop_budget_s

    def _run_lone(self) -> None:
        """Run the one request queued, now, in its caller's step: the batch the worker would take at its next
        pass (``_work``: a lone request to an empty queue after a batch of one runs at once), without the pass.
        The load has been a request at a time; a request that comes before the worker's next pass queues as
        usual, and the worker takes it then, with any others, as it would have."""
        self._idle = False
        batch, waits = self._next_batch()
        if batch:
            rows = self._running_rows = self._last_batch_rows = batch[0].rows
            start = perf_counter()
            try:
                outputs = self._run(batch[0].feeds)
            except Exception as e:
                self._failed(batch, rows, e)
            else:
                self._hand_out(batch, rows, outputs, start, start)
            finally:
                self._running_rows = 0
        self._metrics.queued_all(waits)

    def admit(self, longest_wait_s: float | None = None) -> None:
        """Raise what ``refusal`` returns."""
        if (refused := self.refusal(longest_wait_s)) is not None:
            raise refused

    def refusal(self, longest_wait_s: float | None = None) -> ServeError | None:
        """What ``enqueue`` would refuse now whatever the request holds: 503 (``Overloaded``, with Retry-After)
        while the queue is full or would keep a request of ``max_batch_size`` rows waiting past
        ``DEADLINE_SHARE`` of ``longest_wait_s`` (the longest deadline a request may have), or ``NotReady``
        while the batcher is stopping; None to go on. Callers ask before they read or parse a body, so that
        a refusal under overload costs microseconds, not a parse.

        A request of the most rows is the one judged, since its rows are not known yet: one whose body would
        then be refused by ``enqueue`` is refused here, before its body is read. Refusing smaller requests a
        batch early costs one batch of the queue's depth, which still keeps the model busy.

        Returned, not raised: under overload refusals come by the thousand a second, and a raised exception's
        traceback holds its frames in a reference cycle that only the cyclic garbage collector frees.
        """
        if self._closing or self._loop is None:
            return NotReady(f"model {self.name} is unloading or the server is shutting down; retry on another replica")
        if self._queued >= self.queue_limit:
            return Overloaded(
                f"model {self.name} has {self._queued} requests queued, its limit ({self.limit_setting}); retry later"
            )
        if longest_wait_s is not None and (wait := self.expected_latency_s(self.max_batch_size)) > (
            longest_wait_s * DEADLINE_SHARE
        ):
            return Overloaded(
                f"model {self.name} would answer a request queued now in about {wait * 1000:.0f} ms, past "
                f"{DEADLINE_SHARE:.0%} of the longest deadline a request may have ({longest_wait_s * 1000:.0f} ms, "
                "NORMSERVE_REQUEST_TIMEOUT_MS); retry later"
            )
        return None

    def expected_latency_s(self, rows: int = 1) -> float:
        """How long a request of ``rows`` rows queued now should take to be answered: the batch running now
        (all of it: how much is left is not known), the rows queued ahead of it and its own, and as many
        again as the last batch ran, as slack (its answer is sent between batches, and the rate moves: a
        loaded batcher runs full batches, an idle one small ones), at the rate this batcher
        has drained its queue while it was backlogged (the batches and the loop's work between them), or
        at the warm-up's compute cost until it has been."""
        return (self._running_rows + self._queued_rows + rows + self._last_batch_rows) * self._row_s

    def _arm_expiry(self, deadline: float) -> None:
        """Let the queue's one expiry timer fire at ``deadline`` (monotonic). One timer for the queue, not one
        per request: requests come with later deadlines than those queued before them (the same timeout),
        so it is set again only when the queue was empty or a request with a shorter timeout arrives."""
        if self._expiry is not None:
            self._expiry.cancel()
        loop = self._loop
        assert loop is not None  # admit() refuses before start()
        self._expiry_at = deadline
        self._expiry = loop.call_at(loop.time() + (deadline - monotonic()), self._expire_due)

    def _expire_due(self) -> None:
        """The expiry timer: answer every queued request whose deadline has passed (504), and set the timer
        for the earliest deadline still queued. Requests taken into a batch since it was set are not there:
        it then finds nothing due, and sets itself for the next."""
        self._expiry = None
        now = monotonic() + TIMER_SLACK_S
        earliest = math.inf
        for request in self._queue:
            if request.phase is not _Phase.QUEUED:
                continue
            if request.deadline <= now:
                self._expire(request)
            else:
                earliest = min(earliest, request.deadline)
        if earliest < math.inf:
            self._arm_expiry(earliest)

    def _expire(self, request: _Request, why: str = "passed its deadline before it could run") -> None:
        if request.phase is not _Phase.QUEUED:
            return
        request.phase = _Phase.EXPIRED
        self._dequeued(request)
        if self._pending_changed is not None:
            self._pending_changed()
        waited = monotonic() - request.enqueued
        if not request.future.done():
            request.future.set_exception(
                DeadlineExceeded(
                    f"the request waited {waited * 1000:.1f} ms in model {self.name}'s queue and {why}; it was not run"
                )
            )

    def _dequeued(self, request: _Request) -> None:
        """Out of the queue's counts (its caller tells a pending gauge that is not read at scrape time: ``_take``
        once for a batch)."""
        self._queued -= 1
        self._queued_rows -= request.rows

    def _wake_worker(self) -> None:
        """The worker goes on if it waits on an empty queue."""
        if (waiting := self._waiting) is not None:
            self._waiting = None
            _resolve(waiting)

    async def _work(self) -> None:
        loop = self._loop
        assert loop is not None
        arrived = False  # whether the queue was empty before the request at its head came
        while True:
            while self._queue and self._queue[0].phase is not _Phase.QUEUED:
                self._queue.popleft()  # expired while queued: already answered
            if not self._queue:
                if self._closing:
                    return
                self._idle = True
                if self.idle_spin_s > 0 and self._spin_pays:
                    if await self._spin():
                        self._idle, arrived = False, True
                        continue
                    self._spin_pays = False  # nothing came within it: sleep, until requests come that close again
                self._waiting = loop.create_future()
                asleep = monotonic()
                await self._waiting
                # from the request that woke it: the worker's turn may come after that request ran (``_run_lone``)
                self._spin_pays = self._last_arrival - asleep <= self.idle_spin_s
                self._idle, arrived = False, True
                continue
            if self.max_queue_delay_s > 0 and not self._closing:
                await self._wait_for_rows(self._queue[0].enqueued + self.max_queue_delay_s)
            elif not (arrived and self._last_requests == 1 and self._queued == 1):
                # A lone request to an empty queue, after a batch of one request, runs at once: the load has
                # been a request at a time, and the passes would only delay it (a batch of more settles again).
                await self._settle()
            arrived = False
            batch, waits = self._next_batch()
            if batch:
                await self._execute(batch)
            # counted once the batch is answered: its answers go out first (a lone request's waits on this)
            self._metrics.queued_all(waits)

    async def _spin(self) -> bool:
        """Keep the event loop polling, a pass at a time, until a request arrives or ``idle_spin_s`` has
        passed; whether one arrived. Each pass asks the kernel what is ready without waiting, so a request that
        comes within it is read at once: a loop that sleeps instead is woken by the kernel, which on an idle core
        (of a virtual machine above all) costs tens of microseconds before its first instruction runs, and it
        then runs with cold caches. The price is the core's time while it polls: ``_work`` spins only while the
        last wait on an empty queue ended within the spin (a client that sends its next request as soon as it has
        its answer), and once a spin ends with nothing, sleeps until requests come that close again, so that a
        server whose requests come further apart spends nothing on it."""
        arrivals, until = self._arrivals, monotonic() + self.idle_spin_s
        while self._arrivals == arrivals and not self._closing:
            if monotonic() >= until:
                return False
            await _PASS
        return True

    def _next_batch(self) -> tuple[list[_Request], list[float]]:
        """``_take``, with the drain rate measured before it and the take's time and rows kept after it."""
        self._drained()
        batch, waits = self._take()
        self._taken(batch)
        return batch, waits

    def _drained(self) -> None:
        """Measure the drain rate, before the next take (which uses it): the time from one batch's take to
        now, per row of that batch, when it was taken with requests waiting behind it (this take then
        follows at once)."""
        if self._last_rows:
            row_s = (monotonic() - self._last_take) / self._last_rows
            self._row_s += _DRAIN_WEIGHT * (row_s - self._row_s)

    def _taken(self, batch: list[_Request]) -> None:
        self._last_take = monotonic()
        self._last_rows = sum(r.rows for r in batch) if batch and self._queued else 0

    async def _settle(self) -> None:
        """Yield to the loop until requests stop arriving (or a batch is full), at least once.

        Requests whose bytes have already reached the server are parsed by other tasks within a
        loop pass or two; letting them join makes the batch as large as the load allows, at the
        cost of a few loop passes for a lone request (``_work`` spares them a lone request that comes
        to an empty queue after a batch of one). It also lets timers, health checks and refusals run
        between batches that run on the loop.
        """
        quiet = passes = 0
        while quiet < _QUIET_PASSES and passes < _MAX_PASSES and self._queued_rows < self.max_batch_size:
            if self.max_requests == 1:
                break  # nothing can join the batch
            if self._closing:
                break
            arrivals = self._arrivals
            await _PASS
            passes += 1
            quiet = quiet + 1 if self._arrivals == arrivals else 0
        if passes == 0:
            await _PASS

    async def _wait_for_rows(self, until: float) -> None:
        """Sleep until the batch is full or ``until`` (monotonic) has come."""
        remaining = until - monotonic()
        if remaining <= 0 or self._queued_rows >= self.max_batch_size:
            return
        loop = asyncio.get_running_loop()
        self._full = loop.create_future()
        timer = loop.call_later(remaining, _resolve, self._full)
        try:
            await self._full
        finally:
            timer.cancel()
            self._full = None

    def _take(self) -> tuple[list[_Request], list[float]]:
        """The next batch, and how long each of its requests waited in the queue."""
        batch: list[_Request] = []
        rows = 0
        now = monotonic()
        waits: list[float] = []  # of the requests taken, counted in the metrics once for the batch, after it
        dequeued = 0
        while self._queue:
            request = self._queue[0]
            if request.phase is not _Phase.QUEUED:
                self._queue.popleft()
                continue
            if request.deadline <= now:  # its timer could not fire while the loop was busy
                self._expire(request)
                self._queue.popleft()
                continue
            if rows + request.rows > self.max_batch_size or len(batch) == self.max_requests:
                break
            # A request whose batch would end past its deadline is not run: its answer would come after
            # the client stopped waiting, and the rows are better spent on a request that can still make it.
            if (end := (rows + request.rows) * self._row_s) > request.deadline - now:
                why = f"its batch would end about {end * 1000:.0f} ms from now, past its deadline"
                self._expire(request, why)
                self._queue.popleft()
                continue
            self._queue.popleft()
            self._dequeued(request)
            dequeued += 1
            if request.future.done():  # the caller went away
                continue
            request.phase = _Phase.RUNNING
            waits.append(now - request.enqueued)
            batch.append(request)
            rows += request.rows
        if dequeued and self._pending_changed is not None:
            self._pending_changed()
        return batch, waits

    async def _execute(self, batch: list[_Request]) -> None:
        rows = self._running_rows = self._last_batch_rows = sum(r.rows for r in batch)
        self._last_requests = len(batch)
        try:
            await self._execute_rows(batch, rows)
        finally:
            self._running_rows = 0

    async def _execute_rows(self, batch: list[_Request], rows: int) -> None:
        start = perf_counter()
        try:
            feeds = _assemble(batch)
            put_together = perf_counter()
            if self._estimate(rows) <= self._loop_budget_s:
                outputs = self._run(feeds)
            else:
                if self._thread is None:
                    self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"run {self.name}")
                outputs = await asyncio.get_running_loop().run_in_executor(self._thread, self._run, feeds)
        except Exception as e:
            if len(batch) > 1:
                # One request's values may be what the model refused (an index out of its range): each request
                # runs again alone, so that only the one that failed fails.
                log.warning("model %s failed a batch of %d requests (%s); running each alone", self.name, len(batch), e)
                for request in batch:
                    if not request.future.done():
                        await self._execute_rows([request], request.rows)
                return
            self._failed(batch, rows, e)
            return
        self._hand_out(batch, rows, outputs, start, put_together)

    def _failed(self, batch: list[_Request], rows: int, e: Exception) -> None:
        """Each request of a batch that failed gets the error (called while ``e`` is handled)."""
        if isinstance(e, ServeError):  # the runtime says the model refused this request's values
            error: ServeError = e
        else:  # inputs the protocol layer validated were refused: a bug, but the worker goes on
            log.exception("model %s failed to run a batch of %d rows", self.name, rows)
            error = BatchFailed(f"model {self.name} failed to run a batch of {rows} rows: {e}")
        for request in batch:
            if not request.future.done():
                request.future.set_exception(error)

    def _hand_out(self, batch: list[_Request], rows: int, outputs: Outputs, start: float, put_together: float) -> None:
        """Each request of a batch that ran gets its outputs, then the batch is counted. ``start`` and
        ``put_together``: the ``perf_counter()`` when the batch began and when its inputs were put together."""
        ran = perf_counter()
        _split(batch, outputs)
        self._metrics.executed(rows, len(batch), put_together - start, ran - put_together, perf_counter() - ran)


class _Pass:
    """Awaited, yields to the event loop for one pass, as ``asyncio.sleep(0)`` does, without the coroutine and
    the generator that sleep makes (and runs as Python code) each time: a batch waits a few passes."""

    __slots__ = ()

    def __await__(self) -> Generator[None, None, None]:
        return iter(_ONE_PASS)  # type: ignore[return-value]  # any iterator will do: await only calls next()


_ONE_PASS = (None,)  # a bare yield: asyncio's task runs the awaiting coroutine again at the loop's next pass
_PASS = _Pass()


def _assemble(batch: list[_Request]) -> Feeds:
    """The batch's inputs: each request's rows, one after the other."""
    if len(batch) == 1:
        return batch[0].feeds
    return {name: np.concatenate([r.feeds[name] for r in batch]) for name in batch[0].feeds}


def _split(batch: list[_Request], outputs: Outputs) -> None:
    """Each request of the batch gets its own rows of every output (a view: nothing is copied); a batch of one
    request, the outputs as they are (with ``max_requests=1``, each batch: a graph whose outputs hold per-batch
    values, statistics, keeps them whole)."""
    if len(batch) == 1:
        if not batch[0].future.done():
            batch[0].future.set_result(outputs)
        return
    offset = 0
    for request in batch:
        end = offset + request.rows
        if not request.future.done():
            request.future.set_result([out[offset:end] for out in outputs])
        offset = end


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
