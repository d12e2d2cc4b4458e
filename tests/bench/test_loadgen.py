"""The load generator's own logic: percentiles, open-loop charging, the stability rule, error accounting.

The timing tests run against a fake server in the test's own event loop whose service time is
known, so the latencies the generator must report follow from arithmetic, not from this machine.
"""

from __future__ import annotations

import asyncio
import csv
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.loadgen.driver import Load, Target, encode_request
from bench.loadgen.run import RunConfig, run_level
from bench.loadgen.samples import ModelSignature, build_requests, digit_images
from bench.loadgen.stats import Window, is_stable, summarize
from models.data import load_splits
from repository import ModelConfig
from service.protocol import parse_infer_request
from tests.service.conftest import RunningServer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "docker"))
from deps import requirements  # noqa: E402  (docker/deps.py: what each dependency group installs)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- percentiles ----------------------------------------------------------------------------------


def test_percentiles_match_a_known_distribution_within_the_histograms_precision() -> None:
    latencies_s = np.random.default_rng(0).lognormal(mean=np.log(2e-3), sigma=0.8, size=50_000)
    window = Window(start=0.0, end=10.0)
    for value in latencies_s:
        window.record(200, float(value))
    summary = summarize([window])
    exact_ms = np.sort(np.floor(latencies_s * 1e6) / 1000)  # recorded in whole microseconds
    for name, q in [("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9)]:
        rank = round(q / 100 * len(exact_ms))  # the value with this many at or below it
        assert summary["latency_ms"][name] == pytest.approx(exact_ms[rank - 1], rel=1e-3), name
    assert summary["latency_ms"]["max"] == pytest.approx(exact_ms.max(), rel=1e-3)
    assert summary["throughput"] == 5000.0
    assert summary["ok"] == 50_000


def test_the_tail_is_kept_one_slow_request_in_a_hundred_thousand_is_the_max() -> None:
    window = Window(start=0.0, end=1.0)
    for _ in range(100_000):
        window.record(200, 0.001)
    window.record(200, 42.0)  # one 42 s stall
    latency = summarize([window])["latency_ms"]
    assert latency["p99.9"] == pytest.approx(1.0, rel=1e-3)
    assert latency["max"] == pytest.approx(42_000, rel=1e-3)


def test_windows_merge_and_the_answers_after_the_end_count_for_latency_not_throughput() -> None:
    first, second, drained = Window(0.0, 1.0), Window(1.0, 2.0), Window(2.0, 2.5)
    for _ in range(100):
        first.record(200, 0.001)
        second.record(200, 0.003)
    drained.record(200, 5.0)
    summary = summarize([first, second], drained)
    assert summary["throughput"] == 100.0
    assert summary["ok"] == 200
    assert summary["latency_ms"]["p50"] == pytest.approx(3.0, rel=1e-3)  # the 101st of 201
    assert summary["latency_ms"]["max"] == pytest.approx(5000, rel=1e-3)
    assert summary["answered_after_end"] == 1


def test_answers_carried_over_from_the_warm_up_count_for_throughput_not_latency() -> None:
    window = Window(0.0, 2.0)
    for _ in range(100):
        window.record(200, 0.001)
    window.carried = 50  # 200s to requests sent before the measurement began, answered in this window
    summary = summarize([window])
    assert summary["throughput"] == 75.0 and window.throughput == 75.0
    assert summary["ok"] == 100 and summary["carried"] == 50
    assert summary["latency_ms"]["max"] == pytest.approx(1.0, rel=1e-2)  # theirs are not in the histogram


# -- the stability rule ---------------------------------------------------------------------------


def _window(throughput: float, p50_ms: float) -> Window:
    window = Window(0.0, 1.0)
    for _ in range(int(throughput)):
        window.record(200, p50_ms / 1000)
    return window


@pytest.mark.parametrize(
    ("windows", "stable"),
    [
        ([(1000, 2.0), (1050, 2.1), (980, 1.95)], True),  # within 10 % of the mean
        ([(400, 9.0), (1000, 2.0), (1050, 2.1), (980, 1.95)], True),  # only the last 3 count
        ([(1000, 2.0), (1000, 2.0)], False),  # fewer than 3
        ([(1000, 2.0), (1300, 2.0), (1000, 2.0)], False),  # throughput 18 % over the mean
        ([(1000, 2.0), (1000, 2.6), (1000, 2.0)], False),  # median latency 18 % over the mean
        ([(1000, 2.0), (1000, 2.0), (0, 0.0)], False),  # a window with no answers
    ],
)
def test_stability_needs_the_last_three_windows_within_ten_percent(
    windows: list[tuple[float, float]], stable: bool
) -> None:
    assert is_stable([_window(t, p) for t, p in windows], tolerance=0.10) is stable


# -- fake servers ---------------------------------------------------------------------------------

# request index -> (status, body), or (status, body, True) to answer with Connection: close; None: never answer
Responder = Callable[[int], tuple[int, bytes] | tuple[int, bytes, bool] | None]


class FakeServer(asyncio.Protocol):
    """Answers requests one at a time across all connections, each after ``service_s``, like a
    server with one worker: a request that arrives while another is served waits its turn."""

    def __init__(self, shared: dict[str, Any]) -> None:
        self.shared = shared
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.shared["transports"].add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.shared["transports"].discard(self.transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            length = int(re.search(rb"Content-Length: (\d+)", bytes(self.buffer[:end])).group(1))  # type: ignore[union-attr]
            if len(self.buffer) < end + 4 + length:
                return
            del self.buffer[: end + 4 + length]
            self.shared["queue"].put_nowait(self)


async def serve_fake(service_s: float, responder: Responder) -> tuple[asyncio.Server, dict[str, Any]]:
    shared: dict[str, Any] = {"queue": asyncio.Queue(), "seen": 0, "transports": set()}

    async def worker() -> None:
        while True:
            connection: FakeServer = await shared["queue"].get()
            index = shared["seen"]
            shared["seen"] += 1
            await asyncio.sleep(service_s)
            answer = responder(index)
            if answer is None or connection.transport is None or connection.transport.is_closing():
                continue
            if getattr(connection, "closing", False):  # a request after "Connection: close": never answered
                continue
            status, body, *close = answer
            head = f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            if close:  # as a draining server or a proxy does: it closes a little later, not at once
                head += "connection: close\r\n"
                connection.closing = True  # type: ignore[attr-defined]
                asyncio.get_running_loop().call_later(0.05, connection.transport.close)
            connection.transport.write(head.encode() + b"\r\n" + body)

    server = await asyncio.get_running_loop().create_server(lambda: FakeServer(shared), "127.0.0.1", 0)
    shared["worker"] = asyncio.create_task(worker())
    return server, shared


def _target(server: asyncio.Server) -> Target:
    port = server.sockets[0].getsockname()[1]
    return Target("127.0.0.1", port, "/v2/models/m/infer")


def _requests(target: Target) -> list[bytes]:
    return [encode_request(target, b'{"inputs": []}', {"Content-Type": "application/json"})]


async def _measure(
    service_s: float, responder: Responder, mode: str, level: float, **config: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    server, shared = await serve_fake(service_s, responder)
    try:
        target = _target(server)
        options = {"warmup_s": 0.0, "window_s": 0.25, "progress": False} | config
        result = await run_level(target, _requests(target), mode, level, RunConfig(**options))
        return result.summary(), shared
    finally:
        await _stop_fake(server, shared)


async def _stop_fake(server: asyncio.Server, shared: dict[str, Any]) -> None:
    """Stop the fake server and close its side of every connection (an asyncio server's ``close`` leaves them
    open), its sockets closed before the test's loop may end: a socket left to the garbage collector warns
    (ResourceWarning), which fails whichever test is running when the collector comes by."""
    shared["worker"].cancel()
    server.close()
    for transport in list(shared["transports"]):
        transport.close()
    await server.wait_closed()
    await asyncio.sleep(0)


# -- open and closed loop -------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("connections", [64, 2])
async def test_open_loop_charges_a_slow_server_for_the_wait_from_each_due_time(connections: int) -> None:
    """Offered 100 req/s to a server that does 50 req/s: request k is due at 10k ms and answered at
    about 20(k+1) ms, so it waited about 10k + 20 ms. Whether it queued in the server (64
    connections) or in the generator for a free connection (2), the wait is charged."""
    summary, shared = await _measure(0.020, lambda _: (200, b"{}"), "rate", 100.0, requests=40, connections=connections)
    latency = summary["latency_ms"]
    assert summary["ok"] == 40 and shared["seen"] == 40
    assert latency["max"] >= 0.8 * (10 * 39 + 20)  # the last request waited about 410 ms
    assert latency["p50"] >= 0.8 * (10 * 20 + 20)
    assert summary["errors"] == {}


@pytest.mark.anyio
async def test_past_capacity_over_few_connections_the_wait_for_a_connection_is_told_apart_and_the_backlog_dropped() -> (
    None
):
    """Offered 200 req/s for 0.5 s over 2 connections to a server that does 50 req/s: about 25 are
    answered, each within 2 services (40 ms) of its send but far later from its due time, and the 75 or so
    still waiting for a connection at the end are dropped and counted, not sent (which would take 1.5 s)."""
    summary, shared = await _measure(
        0.020, lambda _: (200, b"{}"), "rate", 200.0, duration_s=0.5, connections=2, drop_backlog=True
    )
    assert summary["errors"] == {}
    assert summary["unsent"] >= 50
    assert summary["ok"] + summary["answered_after_end"] + summary["unsent"] == pytest.approx(100, abs=3)
    assert shared["seen"] <= 40  # what was dropped never reached the server
    assert summary["from_send_ms"]["p99"] <= 80  # one service, and the other connection's
    assert summary["latency_ms"]["p50"] >= 100  # from the due time: the wait for a connection counts


@pytest.mark.anyio
async def test_closed_loop_measures_from_the_send_and_hides_the_queue() -> None:
    """The same slow server, one closed-loop client: each request waits only for its own service."""
    summary, _ = await _measure(0.020, lambda _: (200, b"{}"), "concurrency", 1, requests=15)
    assert summary["ok"] == 15
    assert 15 <= summary["latency_ms"]["p50"] <= 60
    assert summary["latency_ms"]["max"] < 100


@pytest.mark.anyio
async def test_open_loop_keeps_its_schedule_when_the_server_keeps_up() -> None:
    summary, shared = await _measure(0.0, lambda _: (200, b"{}"), "rate", 400.0, duration_s=1.0)
    assert summary["throughput"] == pytest.approx(400, rel=0.1)
    assert summary["latency_ms"]["p50"] < 5


# -- error accounting -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_errors_are_counted_by_status_with_a_sample_of_what_the_server_said() -> None:
    def every_third_overloaded(index: int) -> tuple[int, bytes]:
        return (503, b'{"error": "queue full"}') if index % 3 == 2 else (200, b"{}")

    summary, shared = await _measure(0.0, every_third_overloaded, "concurrency", 4, requests=300)
    assert shared["seen"] == 300
    assert summary["ok"] == 200
    assert summary["errors"] == {"503": 100}
    assert summary["error_samples"]["503"] == '{"error": "queue full"}'
    assert summary["latency_ms"]["max"] is not None  # latency from the 200s only
    refused = summary["refused"]  # the 503s have their own latency, and this server sends no Retry-After
    assert refused["count"] == 100 and refused["p50_ms"] > 0 and refused["with_retry_after"] == 0.0


@pytest.mark.anyio
async def test_an_answer_with_connection_close_ends_its_connection_and_the_load_goes_on_over_a_new_one() -> None:
    def close_every_fifth(index: int) -> tuple[int, bytes, bool] | tuple[int, bytes]:
        return (200, b"{}", True) if index % 5 == 4 else (200, b"{}")

    summary, shared = await _measure(0.0, close_every_fifth, "concurrency", 2, requests=100)
    # nothing was sent on a connection after the server said it closes it, so nothing was lost
    assert summary["errors"] == {} and summary["ok"] == 100 and shared["seen"] == 100


@pytest.mark.anyio
async def test_a_request_never_answered_is_a_timeout_and_its_connection_is_replaced() -> None:
    def drop_the_fifth(index: int) -> tuple[int, bytes] | None:
        return None if index == 4 else (200, b"{}")

    summary, shared = await _measure(0.0, drop_the_fifth, "concurrency", 1, requests=10, timeout_s=0.3)
    assert summary["errors"] == {"timeout": 1}
    assert summary["ok"] == 9
    assert shared["seen"] == 10  # the load went on over a new connection


@pytest.mark.anyio
async def test_closing_the_load_gives_up_the_connection_being_opened_to_replace_a_lost_one() -> None:
    """A connection lost as the level ends is being replaced when the load closes: the replacement is given up,
    not opened after the close and left open (the last answer of a level that says "Connection: close" did it)."""
    server, shared = await serve_fake(0.05, lambda _: (200, b"{}"))
    try:
        target = _target(server)
        load = Load(target, _requests(target), concurrency=1)
        await load.connect()
        load.start()
        (connection,) = load.connections
        assert connection.transport is not None
        connection.transport.close()
        await asyncio.sleep(0)  # lost while sending: its replacement is on its way
        load.close()
        for _ in range(100):  # the server sees the lost connection's end; nothing else comes
            await asyncio.sleep(0.01)
            if not shared["transports"]:
                break
        assert shared["transports"] == set() and load.connections == set()
    finally:
        await _stop_fake(server, shared)


@pytest.mark.anyio
async def test_a_server_that_is_not_there_is_a_clear_error() -> None:
    server, shared = await serve_fake(0.0, lambda _: (200, b"{}"))
    target = _target(server)
    await _stop_fake(server, shared)
    load = Load(target, _requests(target), concurrency=1)
    with pytest.raises(ConnectionError, match=f"cannot connect to 127.0.0.1:{target.port}"):
        await load.connect()


# -- requests built from real samples -------------------------------------------------------------


def test_digits_are_scaled_up_by_nearest_neighbour_and_repeated_over_channels() -> None:
    images = digit_images(3, channels=3, height=224, width=224)
    digits = load_splits().x_test[:3, 0]
    assert images.shape == (3, 3, 224, 224) and images.dtype == np.float32
    np.testing.assert_array_equal(images[:, 1, ::28, ::28], digits)
    np.testing.assert_array_equal(images[:, 0], images[:, 2])


@pytest.mark.parametrize("encoding", ["json", "binary"])
def test_requests_parse_as_the_server_parses_them_into_real_digits(built_repository: Path, encoding: str) -> None:
    config = ModelConfig.model_validate_json((built_repository / "tiny-cnn-bn" / "config.json").read_text())
    signature = ModelSignature.from_metadata(config.model_dump())
    body, headers = build_requests(signature, encoding, batch=2, distinct=3)[1]
    header_length = headers.get("Inference-Header-Content-Length")
    request = parse_infer_request(body, header_length, config, config.max_batch_size)
    np.testing.assert_array_equal(request.feeds["input"], load_splits().x_test[2:4])


# -- the command line against a real server -------------------------------------------------------


@pytest.mark.parametrize("encoding", ["json", "binary"])
def test_the_cli_loads_a_real_server_and_writes_json_csv_and_a_plot(
    server: RunningServer, tmp_path: Path, encoding: str
) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "bench.loadgen", "--url", server.url, "--model", "tiny-cnn-bn"]
    command += ["--encoding", encoding, "--concurrency", "1", "4", "--warmup", "0.2", "--window", "0.3"]
    command += ["--max-windows", "4", "--out", str(out), "--quiet"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| tiny-cnn-bn " + encoding in done.stdout
    rows = list(csv.DictReader((tmp_path / "run.csv").read_text().splitlines()))
    assert [(r["mode"], r["level"]) for r in rows] == [("concurrency", "1"), ("concurrency", "4")]
    assert all(float(r["throughput"]) > 0 and r["errors"] == "0" for r in rows)
    report = json.loads((tmp_path / "run.json").read_text())
    levels = report["runs"][f"tiny-cnn-bn {encoding}"]
    assert [level["level"] for level in levels] == [1, 4]
    assert all(level["errors"] == {} and level["windows"] for level in levels)
    assert report["machine"]["cores"] >= 1
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_cli_says_which_model_it_could_not_read(server: RunningServer) -> None:
    command = [sys.executable, "-m", "bench.loadgen", "--url", server.url, "--model", "nope", "--quiet"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "cannot read the model's inputs" in done.stderr and "404" in done.stderr


# A load generator run with only the allowed distributions importable: any other is refused, as if not installed.
_A_RUN_WITH_ONLY = """
import importlib.abc, importlib.metadata as md, json, sys
from pathlib import Path
allowed = set(json.loads(sys.argv[3]))
owners = {m: {d.lower().replace("_", "-") for d in ds} for m, ds in md.packages_distributions().items()}

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in owners and not owners[top] & allowed:
            raise ModuleNotFoundError(f"No module named {top!r} (not installed with [bench])", name=top)
        return None

sys.meta_path.insert(0, NotInstalled())
import bench.loadgen.__main__
from bench.loadgen.report import plot
from bench.loadgen.samples import build_requests, read_signature
build_requests(read_signature(Path(sys.argv[1])), "binary", 4)
point = {"level": 1, "ok": 1, "throughput": 1.0, "latency_ms": {"p50": 1.0, "p99": 2.0}}
plot(Path(sys.argv[2]), {"run": [point]}, "t")
"""


def _closure(requirements: list[str]) -> set[str]:
    """The distributions those requirements install, with everything they require in turn."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        name = requirement.name.lower().replace("_", "-")
        if name in seen or (requirement.marker is not None and not requirement.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            todo += [Requirement(r) for r in md.requires(requirement.name) or []]
        except md.PackageNotFoundError:
            pass
    return seen


def test_the_bench_extra_alone_installs_what_the_load_generator_needs(built_repository: Path, tmp_path: Path) -> None:
    allowed = _closure(requirements(["bench"])) | {"normserve"}
    config = built_repository / "tiny-cnn-bn" / "config.json"
    done = subprocess.run(
        [sys.executable, "-c", _A_RUN_WITH_ONLY, str(config), str(tmp_path / "plot.png"), json.dumps(sorted(allowed))],
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
    )
    # Requests built from the held-out digits, and the plot drawn, with nothing but the service and [bench].
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "plot.png").stat().st_size > 0
