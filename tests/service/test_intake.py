"""A model's intake (service/intake.py): how many of its requests are read at once, and which of its held
connections is read next. The connections here are stand-ins that record what the intake told them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from service import intake as intake_module
from service.batcher import Batcher
from service.intake import Expectation, Intake
from service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass(eq=False)
class Connection:
    name: str
    sent: bool = False  # whether bytes of its next request wait unread in the kernel
    released_with: list[Expectation | None] = field(default_factory=list)
    idle: int = 0

    def waiting(self) -> bool:
        return self.sent

    def released(self, expectation: Expectation | None) -> None:
        self.released_with.append(expectation)

    def lapsed(self, expectation: Expectation) -> None:
        self.idle += 1


def a_held_behind_b(a: Connection, b: Connection) -> Intake:
    """An intake of one slot whose request is in flight, with ``a`` and then ``b`` held behind it."""
    intake = Intake(limit=1)
    intake.arrived()
    intake.hold(a)
    intake.hold(b)
    return intake


def answered_and_held(intake: Intake, connection: Connection) -> None:
    """What the transport does when a request of ``connection`` is answered: count it out, hold the
    connection if the model has its fill."""
    intake.answered()
    if intake.full:
        intake.hold(connection)


@pytest.mark.anyio
async def test_held_connections_are_read_again_oldest_first_each_with_a_slot_for_its_next_request() -> None:
    intake = Intake(limit=2)
    a, b, c, d = (Connection(n) for n in "abcd")
    for _ in range(4):  # four requests read: two past the limit (connections not held yet arrive as they come)
        intake.arrived()
    for connection in (a, b, c):
        answered_and_held(intake, connection)
    # After three answers one request is in flight, below the limit of two: one held connection was read
    # again, the oldest, with a slot kept for its next request; the other two wait behind it.
    assert [len(x.released_with) for x in (a, b, c)] == [1, 0, 0]
    assert intake.in_flight == 1 and intake.expected == 1 and list(intake.held) == [b, c]
    assert intake.full  # a connection answered now would be held behind b and c
    expectation = a.released_with[0]
    assert expectation is not None
    intake.arrived()  # a's next request: the slot passes to it, and none is freed
    expectation.met(arrived=True)
    assert intake.in_flight == 2 and intake.expected == 0 and not b.released_with
    answered_and_held(intake, d)
    assert len(b.released_with) == 1 and not c.released_with and list(intake.held) == [c, d]


@pytest.mark.anyio
async def test_a_released_connection_that_sends_nothing_gives_its_slot_back_and_is_told_it_is_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(intake_module, "EXPECT_S", 0.02)
    a, b = Connection("a"), Connection("b", sent=True)
    intake = a_held_behind_b(a, b)
    intake.answered()  # room for one: a is read again
    assert len(a.released_with) == 1 and not b.released_with and intake.expected == 1
    await asyncio.sleep(0.1)  # a's client sends nothing
    assert a.idle == 1
    assert len(b.released_with) == 1 and intake.expected == 1  # the slot a gave back went to the next in line


@pytest.mark.anyio
async def test_a_slot_whose_request_waits_unread_is_kept_however_long_the_server_takes_to_read_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(intake_module, "EXPECT_S", 0.02)
    a, b = Connection("a", sent=True), Connection("b", sent=True)
    intake = a_held_behind_b(a, b)
    intake.answered()
    await asyncio.sleep(0.1)  # a's request is in the kernel: the loop is behind, the client is not idle
    assert a.idle == 0 and intake.expected == 1 and not b.released_with


@pytest.mark.anyio
async def test_a_connection_closed_before_its_request_arrived_gives_its_slot_to_the_next() -> None:
    a, b = Connection("a"), Connection("b")
    intake = a_held_behind_b(a, b)
    intake.answered()
    expectation = a.released_with[0]
    assert expectation is not None and not b.released_with
    expectation.met()  # a closed
    assert len(b.released_with) == 1 and intake.expected == 1


def test_a_retired_intake_reads_every_held_connection_again_without_slots() -> None:
    intake = Intake(limit=1)
    held = [Connection(str(i)) for i in range(3)]
    intake.arrived()
    for connection in held:
        intake.hold(connection)
    intake.close()
    assert [c.released_with for c in held] == [[None]] * 3
    assert not intake.full  # nothing is held on a retired model's intake


def test_holding_is_off_at_a_limit_of_0() -> None:
    intake = Intake(limit=0)
    for _ in range(1000):
        intake.arrived()
    assert not intake.full


def batcher(cores: int, batches: float | None, max_batch_size: int = 64, queue_limit: int = 512) -> Batcher:
    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [feeds["x"]]

    metrics = Metrics().model("m", "1")
    estimate = lambda rows: 1e-6  # noqa: E731
    return Batcher("m", run, estimate, max_batch_size, 0.0, queue_limit, metrics, cores, intake_batches=batches)


def test_a_model_takes_one_batch_in_at_once_on_one_core_and_two_on_more() -> None:
    # On one core nothing overlaps: one batch in flight keeps it busy. On more, one batch computes on the
    # batcher's thread while the next is read and parsed on the loop.
    assert batcher(cores=1, batches=None).intake.limit == 64
    assert batcher(cores=4, batches=None).intake.limit == 128
    assert batcher(cores=4, batches=0).intake.limit == 0  # NORMSERVE_INTAKE_BATCHES=0: never held
    assert batcher(cores=1, batches=8, queue_limit=100).intake.limit == 100  # within the queue limit


@pytest.mark.anyio
async def test_the_limit_follows_the_rows_requests_carry() -> None:
    b = batcher(cores=1, batches=None)
    b.start()
    try:
        for _ in range(100):  # requests of 64 rows: a batch is one request, and at least 4 are taken in
            await b.submit({"x": np.zeros((64, 1), np.float32)}, 64, deadline=time.monotonic() + 10)
        assert b.intake.limit == 4
        for _ in range(300):  # then of one row again (a moving average: the old rows fade)
            await b.submit({"x": np.zeros((1, 1), np.float32)}, 1, deadline=time.monotonic() + 10)
        assert b.intake.limit == 64
    finally:
        await b.stop()


def test_the_held_count_is_told_at_each_change_for_a_gauge_that_cannot_be_read_at_scrape() -> None:
    """With worker processes the held-connections gauge lives in a shared file: the intake tells it each
    change, holding and releasing alike."""
    counts: list[int] = []
    intake = Intake(limit=1)
    intake.changed = lambda: counts.append(len(intake.held))
    intake.arrived()
    a, b = Connection("a"), Connection("b")
    intake.hold(a)
    intake.hold(b)
    intake.close()  # the version retired: both read again
    assert counts == [1, 2, 0]


def test_with_worker_processes_the_held_connections_gauge_is_set_in_the_shared_files(tmp_path: Path) -> None:
    """prometheus_client's multiprocess mode reads gauges from each process's files, where a function read
    at scrape time writes nothing: there the gauge is set at each change, and /metrics shows it."""
    script = """
from prometheus_client import generate_latest
from service.metrics import Metrics
metrics = Metrics(worker=1)
model = metrics.model("m", "1")
held = [3]
changed = model.watch_held(lambda: held[0])
assert changed is not None
changed()
print(generate_latest(metrics.exposition()).decode())
"""
    env = os.environ | {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert 'normserve_held_connections{model="m",version="1"} 3.0' in done.stdout
    # and in one process the same gauge is read at scrape time, with nothing to call
    assert Metrics().model("m", "1").watch_held(lambda: 0) is None
