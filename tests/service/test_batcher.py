"""The batcher on its own: rows, delays, limits, deadlines and draining, with a fake model."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.batcher import Batcher
from service.errors import BatchFailed, DeadlineExceeded, InvalidInput, NotReady, Overloaded
from service.metrics import Metrics

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeModel:
    """Doubles its input; records every batch it ran and the thread it ran on."""

    def __init__(self, cost_s: float = 0.0, fail: bool = False) -> None:
        self.batches: list[np.ndarray] = []
        self.threads: list[int] = []
        self.cost_s = cost_s
        self.fail = fail

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.batches.append(feeds["x"].copy())
        self.threads.append(threading.get_ident())
        if self.fail:
            raise RuntimeError("onnxruntime says no")
        return [feeds["x"] * 2]

    def estimate(self, rows: int) -> float:
        return self.cost_s


def make_batcher(model: FakeModel, **kwargs: float) -> Batcher:
    settings = {"max_batch_size": 4, "max_queue_delay_s": 0.0, "queue_limit": 100, "cores": 1} | kwargs
    return Batcher(
        "fake version 1",
        model.run,
        model.estimate,
        int(settings["max_batch_size"]),
        settings["max_queue_delay_s"],
        int(settings["queue_limit"]),
        Metrics().model("fake", "1"),
        int(settings["cores"]),
        idle_spin_s=settings.get("idle_spin_s", 0.0),
    )


def rows(start: int, n: int) -> dict[str, np.ndarray]:
    return {"x": np.arange(start, start + n, dtype=np.float32).reshape(n, 1)}


def later(seconds: float = 60.0) -> float:
    return time.monotonic() + seconds


async def test_each_caller_gets_exactly_its_own_rows_and_batches_count_rows() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=4, max_queue_delay_s=0.05)
    batcher.start()
    sizes = [1, 3, 2, 2, 4, 1]
    starts = np.cumsum([0, *sizes[:-1]]) * 10
    results = await asyncio.gather(
        *(batcher.submit(rows(s, n), n, later()) for s, n in zip(starts, sizes, strict=True))
    )
    await batcher.stop()
    for (out,), s, n in zip(results, starts, sizes, strict=True):
        np.testing.assert_array_equal(out, rows(s, n)["x"] * 2)
    # No batch ever passes 4 rows, no request is split, and every row ran exactly once.
    assert all(len(b) <= 4 for b in model.batches)
    assert sorted(np.concatenate(model.batches).ravel().tolist()) == sorted(
        np.concatenate([rows(s, n)["x"] for s, n in zip(starts, sizes, strict=True)]).ravel().tolist()
    )
    assert len(model.batches) < len(sizes)  # the delay let requests share batches


async def test_a_full_batch_does_not_wait_for_the_delay() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=2, max_queue_delay_s=30.0)
    batcher.start()
    both = asyncio.gather(batcher.submit(rows(0, 1), 1, later()), batcher.submit(rows(1, 1), 1, later()))
    await asyncio.wait_for(both, timeout=5)  # well before the 30 s delay
    assert [len(b) for b in model.batches] == [2]
    await batcher.stop()


async def test_the_delay_closes_a_batch_that_is_not_full() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=8, max_queue_delay_s=0.05)
    batcher.start()
    start = time.monotonic()
    (out,) = await batcher.submit(rows(5, 1), 1, later())
    assert time.monotonic() - start >= 0.05
    np.testing.assert_array_equal(out, [[10.0]])
    await batcher.stop()


async def test_a_full_queue_refuses_at_once_with_retry_after() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=8, max_queue_delay_s=0.2, queue_limit=2)
    batcher.start()
    accepted = [asyncio.ensure_future(batcher.submit(rows(i, 1), 1, later())) for i in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as refused:
        await batcher.submit(rows(9, 1), 1, later())
    assert refused.value.status == 503 and refused.value.headers["Retry-After"] == "1"
    assert "2 requests queued" in refused.value.message
    for i, (out,) in enumerate(await asyncio.gather(*accepted)):  # nothing accepted is lost
        np.testing.assert_array_equal(out, [[2.0 * i]])
    await batcher.stop()


async def test_a_request_that_would_miss_its_deadline_is_refused_before_it_is_queued() -> None:
    model = FakeModel(cost_s=0.04)  # 40 ms a batch of 4 rows: 10 ms a row
    batcher = make_batcher(model, max_batch_size=4, max_queue_delay_s=1.0)
    batcher.start()
    queued = [asyncio.ensure_future(batcher.submit(rows(i, 4), 4, later())) for i in range(2)]
    await asyncio.sleep(0)
    assert batcher.expected_latency_s(1) == pytest.approx(0.09)  # 8 rows ahead and its own, 10 ms each
    with pytest.raises(Overloaded) as refused:  # 50 ms is not enough: refused now, not 504 later
        await batcher.submit(rows(9, 1), 1, time.monotonic() + 0.05)
    assert refused.value.headers["Retry-After"] == "1"
    assert "ms left before its deadline" in refused.value.message
    assert "was not queued" in refused.value.message
    with pytest.raises(Overloaded):  # 95 ms would just do, but leaves no room for the answer's way back
        await batcher.submit(rows(9, 1), 1, time.monotonic() + 0.095)
    with pytest.raises(Overloaded, match="longest deadline a request may have"):  # before a body is read
        batcher.admit(longest_wait_s=0.05)
    with pytest.raises(Overloaded, match="longest deadline a request may have"):
        batcher.admit(longest_wait_s=0.095)
    batcher.admit(longest_wait_s=1.0)  # a longer deadline could be met: admitted
    for out in await asyncio.gather(*queued):  # nothing accepted is lost
        assert out[0].shape == (4, 1)
    await batcher.stop()


async def test_a_deadline_no_batch_could_meet_is_answered_504_without_retry_after() -> None:
    model = FakeModel(cost_s=0.04)  # 10 ms a row
    batcher = make_batcher(model, max_batch_size=4)
    batcher.start()
    with pytest.raises(DeadlineExceeded) as impossible:  # 4 rows take 40 ms even with nothing queued
        await batcher.submit(rows(1, 4), 4, time.monotonic() + 0.02)
    assert impossible.value.status == 504 and "Retry-After" not in impossible.value.headers
    assert "a retry would fail the same way, set a longer timeout" in impossible.value.message
    assert model.batches == []  # not run
    (out,) = await batcher.submit(rows(1, 1), 1, time.monotonic() + 0.5)  # one row fits its 500 ms
    np.testing.assert_array_equal(out, [[2.0]])
    await batcher.stop()


async def test_a_request_the_queue_would_refuse_after_its_body_is_read_is_refused_from_its_head() -> None:
    model = FakeModel(cost_s=0.04)  # 10 ms a row
    batcher = make_batcher(model, max_batch_size=4, max_queue_delay_s=1.0)
    batcher.start()
    queued = [asyncio.ensure_future(batcher.submit(rows(i, 4), 4, later())) for i in range(2)]
    await asyncio.sleep(0)
    # With a 120 ms deadline a one-row request would fit (90 ms of the 108 ms share), one of 4 rows not (120 ms).
    with pytest.raises(Overloaded):
        await batcher.submit(rows(9, 4), 4, time.monotonic() + 0.12)
    # The head does not say how many rows follow: it is judged as the largest, and refused before its body.
    refused = batcher.refusal(longest_wait_s=0.12)
    assert isinstance(refused, Overloaded) and "about 120 ms" in refused.message
    assert refused.headers["Retry-After"] == "1"
    assert batcher.refusal(longest_wait_s=1.0) is None
    for out in await asyncio.gather(*queued):  # nothing accepted is lost
        assert out[0].shape == (4, 1)
    await batcher.stop()


async def test_a_request_past_its_deadline_gets_504_and_is_not_run() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=8, max_queue_delay_s=0.3)
    batcher.start()
    patient = asyncio.ensure_future(batcher.submit(rows(1, 1), 1, later()))
    with pytest.raises(DeadlineExceeded) as late:
        await batcher.submit(rows(7, 1), 1, later(0.02))
    assert late.value.status == 504 and "not run" in late.value.message
    await patient
    assert 7.0 not in np.concatenate(model.batches)
    assert batcher.pending == 0
    await batcher.stop()


async def test_queued_requests_expire_each_at_its_own_deadline_in_any_order() -> None:
    """The queue's one expiry timer follows the earliest deadline queued, whatever order they came in."""
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=8, max_queue_delay_s=1.0)  # the batch waits a second for rows
    batcher.start()
    started = time.monotonic()
    failed_at: dict[str, float] = {}

    async def one(name: str, start: int, seconds: float) -> None:
        try:
            await batcher.submit(rows(start, 1), 1, started + seconds)
        except DeadlineExceeded:
            failed_at[name] = time.monotonic() - started

    await asyncio.gather(one("a", 1, 0.6), one("b", 2, 0.2), one("c", 3, 0.4), one("patient", 4, 60.0))
    assert sorted(failed_at, key=failed_at.__getitem__) == ["b", "c", "a"]
    for name, deadline in (("b", 0.2), ("c", 0.4), ("a", 0.6)):
        assert deadline - 0.005 <= failed_at[name] < deadline + 0.15, failed_at  # at its deadline, not later
    assert [b.ravel().tolist() for b in model.batches] == [[4.0]]  # only the patient one ran
    assert batcher.pending == 0
    await batcher.stop()


async def test_stop_runs_everything_accepted_then_refuses() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=2, max_queue_delay_s=10.0)
    batcher.start()
    accepted = [asyncio.ensure_future(batcher.submit(rows(i, 1), 1, later())) for i in range(5)]
    await asyncio.sleep(0.01)
    await asyncio.wait_for(batcher.stop(), timeout=5)  # drains without waiting out the delay
    assert [out[0][0, 0] for out in await asyncio.gather(*accepted)] == [0.0, 2.0, 4.0, 6.0, 8.0]
    with pytest.raises(NotReady):
        await batcher.submit(rows(0, 1), 1, later())


async def test_a_failing_batch_fails_its_requests_and_the_batcher_goes_on() -> None:
    model = FakeModel(fail=True)
    batcher = make_batcher(model)
    batcher.start()
    with pytest.raises(BatchFailed, match="onnxruntime says no"):
        await batcher.submit(rows(0, 1), 1, later())
    model.fail = False
    (out,) = await batcher.submit(rows(3, 1), 1, later())
    np.testing.assert_array_equal(out, [[6.0]])
    await batcher.stop()


async def test_a_request_whose_values_the_model_refuses_fails_alone() -> None:
    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        batches.append(feeds["x"].ravel().tolist())
        if (feeds["x"] < 0).any():
            raise InvalidInput("the model refused the inputs' values: a negative index")
        return [feeds["x"] * 2]

    batches: list[list[float]] = []
    batcher = Batcher("fake version 1", run, lambda rows: 0.0, 8, 0.05, 100, Metrics().model("fake", "1"))
    batcher.start()
    results = await asyncio.gather(
        *(batcher.submit(rows(start, 2), 2, later()) for start in (0, -5, 10)), return_exceptions=True
    )
    await batcher.stop()
    good, bad, other = results
    np.testing.assert_array_equal(good[0], rows(0, 2)["x"] * 2)  # type: ignore[index]
    np.testing.assert_array_equal(other[0], rows(10, 2)["x"] * 2)  # type: ignore[index]
    assert isinstance(bad, InvalidInput) and "a negative index" in bad.message  # its own error: a 400
    assert batches == [[0, 1, -5, -4, 10, 11], [0, 1], [-5, -4], [10, 11]]  # the batch, then each alone


@pytest.mark.parametrize(
    ("cores", "cost_s", "on_loop"),
    [
        (2, 1e-5, True),  # a thread hop would cost more than the work
        (2, 5e-3, False),  # a second core computes while the loop parses the next requests
        (1, 5e-3, True),  # one core: nothing to overlap with, so no hop
        (1, 50e-3, False),  # but never block the loop for long
    ],
)
async def test_where_a_batch_runs_follows_its_cost_and_the_cores(cores: int, cost_s: float, on_loop: bool) -> None:
    model = FakeModel(cost_s=cost_s)
    batcher = make_batcher(model, cores=cores)
    batcher.start()
    await batcher.submit(rows(0, 1), 1, later())
    await batcher.stop()
    assert (model.threads[0] == threading.get_ident()) is on_loop


async def test_a_deadline_that_passes_while_the_loop_runs_batches_is_still_kept() -> None:
    model = FakeModel()
    slow = model.run

    def run_30ms(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        time.sleep(0.03)  # on the loop: no timer can fire meanwhile
        return slow(feeds)

    model.run = run_30ms  # type: ignore[method-assign]
    batcher = make_batcher(model, max_batch_size=1)
    batcher.start()
    results = await asyncio.gather(
        *(batcher.submit(rows(i, 1), 1, later(0.04)) for i in range(3)), return_exceptions=True
    )
    await batcher.stop()
    assert not isinstance(results[0], BaseException)  # ran at once
    assert isinstance(results[2], DeadlineExceeded)  # its turn came at 60 ms, past its 40 ms deadline
    assert 2.0 not in np.concatenate(model.batches)


async def test_a_request_whose_batch_would_end_past_its_deadline_gets_504_and_is_not_run() -> None:
    model = FakeModel(cost_s=0.01)  # the warm-up said 10 ms a batch; the model now takes 100
    slow = model.run

    def run_100ms(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        time.sleep(0.1)  # on the loop (10 ms is within its budget): no timer fires meanwhile
        return slow(feeds)

    model.run = run_100ms  # type: ignore[method-assign]
    batcher = make_batcher(model, max_batch_size=1)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit(rows(1, 1), 1, later()))
    await asyncio.sleep(0)
    # Due in about 20 ms by the estimate, so queued with its 120 ms; its turn comes at about 100 ms, when
    # the drain rate has moved towards the model's new pace (28 ms a row) and its batch could not end in time.
    with pytest.raises(DeadlineExceeded) as late:
        await batcher.submit(rows(2, 1), 1, time.monotonic() + 0.12)
    assert late.value.status == 504
    assert "ms from now, past its deadline" in late.value.message and "not run" in late.value.message
    await first
    await batcher.stop()
    assert 2.0 not in np.concatenate(model.batches)  # before, it ran and was answered at about 200 ms


async def test_with_no_delay_requests_arriving_meanwhile_still_share_the_batch() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=8, max_queue_delay_s=0.0)
    batcher.start()

    async def arrive(i: int) -> list[np.ndarray]:
        for _ in range(i):  # one loop pass apart, as requests whose handlers are still parsing
            await asyncio.sleep(0)
        return await batcher.submit(rows(i, 1), 1, later())

    results = await asyncio.gather(*(arrive(i) for i in range(6)))
    await batcher.stop()
    assert [len(b) for b in model.batches] == [6]
    assert [out[0][0, 0] for out in results] == [2.0 * i for i in range(6)]


async def test_an_idle_spin_serves_what_comes_within_it_then_lets_the_core_sleep() -> None:
    model = FakeModel()
    batcher = make_batcher(model, idle_spin_s=0.2)  # long enough that no stall of a loaded machine outlasts it
    batcher.start()
    for i in range(3):  # each next request comes while the worker still polls after the last batch
        (out,) = await batcher.submit(rows(i, 1), 1, later())
        np.testing.assert_array_equal(out, [[2.0 * i]])
        assert batcher._waiting is None  # polling: not asleep on the queue, as it would be at once without a spin
    await asyncio.sleep(0.5)  # past the spin: the worker sleeps on the queue, as without one
    assert batcher._waiting is not None
    cpu = time.process_time()
    await asyncio.sleep(0.4)
    assert time.process_time() - cpu < 0.2  # asleep, not polling (polling would take the whole 0.4 s)
    (out,) = await batcher.submit(rows(7, 1), 1, later())  # and the next request wakes it
    np.testing.assert_array_equal(out, [[14.0]])
    await asyncio.wait_for(batcher.stop(), timeout=5)  # a spinning worker stops too


async def test_an_idle_spin_is_spent_only_while_requests_come_within_it() -> None:
    # A server whose requests come further apart than the spin spends no core on it: once a spin ends with nothing,
    # the worker sleeps at once after each batch, until a request comes within the spin again.
    model = FakeModel()
    batcher = make_batcher(model, idle_spin_s=0.2)
    batcher.start()
    await batcher.submit(rows(1, 1), 1, later())
    await asyncio.sleep(0.5)  # the spin after it ends with nothing
    cpu = time.process_time()
    for i in range(3):  # requests 0.5 s apart: after each, asleep at once
        (out,) = await batcher.submit(rows(i, 1), 1, later())
        np.testing.assert_array_equal(out, [[2.0 * i]])
        await asyncio.sleep(0)  # the worker's turn after the answer
        assert batcher._waiting is not None
        await asyncio.sleep(0.5)
    assert time.process_time() - cpu < 0.5  # a spin after each would have polled for 0.6 s of the 1.5 s
    for i in range(3):  # requests back to back: from the second on, each comes within the spin of the wait before it
        await batcher.submit(rows(i, 1), 1, later())
    await asyncio.sleep(0)
    assert batcher._waiting is None  # polling again
    await asyncio.wait_for(batcher.stop(), timeout=5)


async def passes_to_answer(batcher: Batcher, start: int) -> int:
    """How many passes of the event loop a lone request takes from its submission to its answer."""
    loop, passes, answered = asyncio.get_running_loop(), [0], False

    def count() -> None:
        if not answered:
            passes[0] += 1
            loop.call_soon(count)

    loop.call_soon(count)
    (out,) = await batcher.submit(rows(start, 1), 1, later())
    answered = True
    np.testing.assert_array_equal(out, [[2.0 * start]])
    return passes[0]


@pytest.mark.parametrize("idle_spin_s", [0.0, 0.2])
async def test_a_lone_request_after_a_batch_of_one_runs_without_waiting_for_others(idle_spin_s: float) -> None:
    # A client at a time: its request comes to an empty queue after a batch of one, and runs as it is queued,
    # with no loop pass, rather than after passes for others to join. Requests that come with it make the next
    # batch together, and a burst after a batch of several makes one batch.
    model = FakeModel()
    batcher = make_batcher(model, idle_spin_s=idle_spin_s)
    batcher.start()
    await asyncio.gather(*(batcher.submit(rows(i, 1), 1, later()) for i in range(2)))  # a batch of two
    after_two = await passes_to_answer(batcher, 5)  # settles: others could be on their way
    assert after_two > 0
    await asyncio.sleep(0)  # the worker's turn after the answer: it waits on the empty queue again
    assert await passes_to_answer(batcher, 6) == 0
    model.batches.clear()
    await asyncio.sleep(0)
    for burst in range(2):
        outs = await asyncio.gather(*(batcher.submit(rows(10 * burst + i, 1), 1, later()) for i in range(4)))
        assert [out[0][0, 0] for out in outs] == [2.0 * (10 * burst + i) for i in range(4)]
    assert [len(b) for b in model.batches] == [1, 3, 4]
    await asyncio.wait_for(batcher.stop(), timeout=5)


async def test_the_pending_gauge_counts_every_queue_of_a_model_version() -> None:
    """The batchnorm endpoint's running-statistics queue counts in its model version's infer metrics: two
    batchers share one ``normserve_pending_requests`` series, which is the sum of what both hold queued."""
    metrics = Metrics()
    infer, running = FakeModel(), FakeModel()

    def batcher(model: FakeModel) -> Batcher:
        return Batcher("fake version 1", model.run, model.estimate, 4, 10.0, 100, metrics.model("fake", "1"))

    queues = [batcher(infer), batcher(running)]  # max_queue_delay 10 s: what is queued stays queued
    for queue in queues:
        queue.start()
    futures = [queues[0].enqueue(rows(0, 1), 1, later()), queues[1].enqueue(rows(1, 1), 1, later())]
    futures.append(queues[0].enqueue(rows(2, 1), 1, later()))
    await asyncio.sleep(0)
    assert metrics.registry.get_sample_value("normserve_pending_requests", {"model": "fake", "version": "1"}) == 3
    for queue in queues:
        await queue.stop()
    await asyncio.gather(*futures)
    assert metrics.registry.get_sample_value("normserve_pending_requests", {"model": "fake", "version": "1"}) == 0
