"""Connection limits against a real ``python -m service`` (service/transport.py): header floods, slowloris,
silent connections, slow bodies and the connection cap, while a normal client keeps being answered.

The server runs with short timeouts (1 s) so that each attack is over in seconds. A normal client asks
for readiness and runs an inference throughout each attack; the median of its answers must stay under
50 ms, the attackers' connections must be closed within their timeout (plus a second of slack for a
busy machine), and the server's memory must not grow with what the attackers send.
"""

from __future__ import annotations

import contextlib
import select
import selectors
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from service.transport import KEEP_BYTES
from tests.service.conftest import infer_json, metric, start_service

TIMEOUT_S = 1.0
SLACK_S = 1.0
FILE_LIMIT = 1024  # the server starts with this soft limit, and must raise it to take more clients


@dataclass
class Service:
    process: subprocess.Popen[str]
    url: str
    log: Path

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").split(":")
        return host, int(port)

    def rss_mb(self) -> float:
        return float(psutil.Process(self.process.pid).memory_info().rss) / 2**20

    def connect(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=5)


@contextlib.contextmanager
def running(repository: Path, tmp_path: Path, **env: str) -> Iterator[Service]:
    log = tmp_path / "service.log"
    settings = {
        "NORMSERVE_HEADER_TIMEOUT_S": str(TIMEOUT_S),
        "NORMSERVE_BODY_TIMEOUT_S": str(TIMEOUT_S),
        "NORMSERVE_DRAIN_S": "0",
    }
    with log.open("w") as stderr:
        process, url = start_service(repository, stderr=stderr, files=FILE_LIMIT, **(settings | env))
        try:
            yield Service(process, url, log)
        finally:
            process.terminate()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def service(built_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running(built_repository, tmp_path_factory.mktemp("transport")) as started:
        yield started


@dataclass
class NormalClient:
    """Asks for readiness and runs a one-row inference, one after the other, on one keep-alive connection."""

    url: str
    latencies_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        body = infer_json("x", np.ones((1, 4), dtype=np.float32))
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._stop.is_set():
                for send in (
                    lambda: client.get("/v2/health/ready"),
                    lambda: client.post("/v2/models/affine/infer", json=body),
                ):
                    started = time.perf_counter()
                    try:
                        status = send().status_code
                    except httpx.HTTPError as exc:
                        self.failures.append(repr(exc))
                        continue
                    self.latencies_s.append(time.perf_counter() - started)
                    if status != 200:
                        self.failures.append(f"status {status}")
                time.sleep(0.01)

    @contextlib.contextmanager
    def alongside(self) -> Iterator[NormalClient]:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not self.latencies_s and time.monotonic() < deadline:  # connected and answered once
            time.sleep(0.01)
        try:
            yield self
        finally:
            while len(self.latencies_s) < 10 and time.monotonic() < deadline:  # a short attack: a few more
                time.sleep(0.01)
            self._stop.set()
            thread.join(timeout=30)
        assert not self.failures, f"the normal client failed during the attack: {self.failures[:5]}"
        assert len(self.latencies_s) >= 10, f"the normal client got only {len(self.latencies_s)} answers"
        median_ms = statistics.median(self.latencies_s) * 1000
        assert median_ms < 50, f"the normal client's median answer took {median_ms:.1f} ms during the attack"


def closed_within(sockets: list[socket.socket], seconds: float, drip: bytes = b"", every_s: float = 0.3) -> dict:
    """Wait for the server to close each socket, sending ``drip`` on each every ``every_s`` while it is open.
    Returns, per socket that was closed, what the server sent before closing and when it closed."""
    selector = selectors.DefaultSelector()
    for sock in sockets:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    started = time.monotonic()
    received: dict[socket.socket, bytes] = {sock: b"" for sock in sockets}
    closed: dict[socket.socket, tuple[bytes, float]] = {}
    next_drip = started + every_s
    while len(closed) < len(sockets) and time.monotonic() - started < seconds:
        for key, _ in selector.select(timeout=0.05):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                chunk = sock.recv(65536)
            except ConnectionError:
                chunk = b""
            if chunk:
                received[sock] += chunk
                continue
            closed[sock] = (received[sock], time.monotonic() - started)
            selector.unregister(sock)
        if drip and time.monotonic() >= next_drip:
            next_drip += every_s
            for sock in sockets:
                if sock not in closed:
                    with contextlib.suppress(OSError):
                        sock.send(drip)
    selector.close()
    for sock in sockets:
        sock.close()
    return closed


def head(path: str = "/v2/health/ready", method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: normserve\r\n".encode()


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), f"not an HTTP answer: {answer[:80]!r}"
    return int(answer.split(b" ", 2)[1])


def test_the_soft_file_limit_is_raised_at_start_up_and_said_in_the_log(service: Service) -> None:
    hard = int(Path(f"/proc/{service.process.pid}/limits").read_text().split("Max open files")[1].split()[1])
    soft = int(Path(f"/proc/{service.process.pid}/limits").read_text().split("Max open files")[1].split()[0])
    assert soft == hard > FILE_LIMIT or hard == FILE_LIMIT
    assert f"raised the soft limit on open files from {FILE_LIMIT} to {soft}" in service.log.read_text()


def test_silent_connections_past_the_old_file_limit_are_taken_then_closed_within_the_header_timeout(
    service: Service,
) -> None:
    with NormalClient(service.url).alongside():
        silent = [service.connect() for _ in range(FILE_LIMIT + 100)]
        closed = closed_within(silent, TIMEOUT_S + SLACK_S + 2)
    assert len(closed) == len(silent), f"{len(silent) - len(closed)} silent connections were still open"
    late = [t for _, t in closed.values() if t > TIMEOUT_S + SLACK_S]
    assert len(late) < len(silent) // 20, f"{len(late)} silent connections outlived the timeout by over {SLACK_S} s"
    assert metric(service.url, "normserve_connections_closed_total", reason="silent") >= len(silent)


def test_an_idle_keep_alive_connection_outlives_the_header_timeout(service: Service) -> None:
    with httpx.Client(base_url=service.url, timeout=10) as client:
        first = client.get("/v2/health/live")
        time.sleep(TIMEOUT_S + 0.5)  # idle between requests: NORMSERVE_KEEP_ALIVE_S (75 s) applies, not the head's
        second = client.get("/v2/health/live")
    assert first.status_code == second.status_code == 200
    assert first.extensions["network_stream"] is second.extensions["network_stream"]  # the same connection


def test_slowloris_heads_get_408_and_are_closed_within_the_header_timeout(service: Service) -> None:
    with NormalClient(service.url).alongside():
        dripping = [service.connect() for _ in range(300)]
        for sock in dripping:
            sock.send(head())
        closed = closed_within(dripping, TIMEOUT_S + SLACK_S + 2, drip=b"x")
    assert len(closed) == len(dripping), f"{len(dripping) - len(closed)} slowloris connections were still open"
    for answer, seconds in closed.values():
        assert status_of(answer) == 408 and b"NORMSERVE_HEADER_TIMEOUT_S" in answer
        assert seconds < TIMEOUT_S + SLACK_S, f"a slowloris connection was closed after {seconds:.2f} s"


def test_a_body_shorter_than_its_content_length_gets_408_within_the_body_timeout(service: Service) -> None:
    declared = (
        head("/v2/models/affine/infer", "POST") + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    with NormalClient(service.url).alongside():
        short = [service.connect() for _ in range(50)]
        for sock in short:
            sock.send(declared + b'{"inputs": [')
        trickling = [service.connect() for _ in range(50)]
        for sock in trickling:
            sock.send(declared)
        closed = closed_within(short, TIMEOUT_S + SLACK_S + 2) | closed_within(trickling, TIMEOUT_S + SLACK_S + 2, b" ")
    assert len(closed) == 100
    for answer, seconds in closed.values():
        assert status_of(answer) == 408 and b"NORMSERVE_BODY_TIMEOUT_S" in answer
        assert seconds < TIMEOUT_S + SLACK_S, f"a slow body's connection was closed after {seconds:.2f} s"
    assert (
        metric(
            service.url,
            "normserve_request_failure_total",
            model="affine",
            version="1",
            protocol="http",
            reason="disconnected",
        )
        >= 100
    )


def flood(service: Service, send: Callable[[socket.socket], None], connections: int) -> list[bytes]:
    """Open ``connections`` sockets, run ``send`` on each, and collect each one's answer until it closes."""
    answers = []
    for _ in range(connections):
        with service.connect() as sock:
            with contextlib.suppress(ConnectionError):
                send(sock)
            received = b""
            with contextlib.suppress(ConnectionError, TimeoutError):
                while chunk := sock.recv(65536):
                    received += chunk
            answers.append(received)
    return answers


def test_an_endless_header_gets_431_and_holds_no_memory(service: Service) -> None:
    def endless_header(sock: socket.socket) -> None:
        sock.send(head() + b"X-Flood: ")
        for _ in range(32 * 2**20 // 2**16):  # up to 32 MB, until the server answers
            sock.send(b"a" * 2**16)
            if select.select([sock], [], [], 0.02)[0]:
                return
        raise AssertionError("the server read 32 MB of one header without answering")

    before = service.rss_mb()
    with NormalClient(service.url).alongside():
        answers = flood(service, endless_header, 8)
    grown = service.rss_mb() - before
    for answer in answers:
        assert status_of(answer) == 431 and b"NORMSERVE_MAX_HEADER_BYTES" in answer, answer[:200]
    assert grown < 30, f"8 endless headers left the server {grown:.0f} MB larger"


def test_too_many_header_fields_get_431_and_a_normal_head_still_passes(service: Service) -> None:
    many = head() + b"".join(b"X-%d: 1\r\n" % i for i in range(100_000)) + b"\r\n"
    answers = flood(service, lambda sock: sock.sendall(many), 2)
    for answer in answers:
        assert status_of(answer) == 431 and b"more than 100 header fields" in answer, answer[:200]
    fifty = {f"x-{i}": "1" for i in range(50)}
    assert httpx.get(f"{service.url}/v2/health/ready", headers=fifty).status_code == 200


def test_past_the_connection_cap_new_connections_get_503_and_open_ones_are_served(
    built_repository: Path, tmp_path: Path
) -> None:
    settings = {"NORMSERVE_MAX_CONNECTIONS": "64", "NORMSERVE_MAX_CONNECTIONS_PER_CLIENT": "64"}  # one client here
    with running(built_repository, tmp_path, NORMSERVE_KEEP_ALIVE_S="5", **settings) as capped:
        with httpx.Client(base_url=capped.url, timeout=10) as served:
            assert served.get("/v2/health/ready").status_code == 200  # one of the 64, before the others
            held = [capped.connect() for _ in range(63)]
            refused = flood(capped, lambda sock: sock.sendall(head() + b"\r\n"), 20)
            assert served.get("/v2/health/ready").status_code == 200
            for sock in held:
                sock.close()
        for answer in refused:
            assert status_of(answer) == 503 and b"retry-after: 1" in answer.lower(), answer[:200]
            assert b"NORMSERVE_MAX_CONNECTIONS=64" in answer
        time.sleep(0.5)  # the server sees the held connections go
        assert httpx.get(f"{capped.url}/v2/health/ready").status_code == 200
        notices = [line for line in capped.log.read_text().splitlines() if "NORMSERVE_MAX_CONNECTIONS=64" in line]
    assert len(notices) == 1, f"expected one rate-limited notice for 20 refusals, got {notices}"


def exchange(service: Service, data: bytes) -> bytes:
    """Send ``data`` on a new connection and read everything the server says until it closes (or 5 s)."""
    with service.connect() as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass
    return received


def _infer_request(rows: list[float], version: str = "1.1", extra: bytes = b"") -> bytes:
    body = b'{"id": "%s", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": %s}]}' % (
        str(rows[0]).encode(),
        str(rows).encode(),
    )
    head_ = f"POST /v2/models/affine/infer HTTP/{version}\r\nHost: normserve\r\nContent-Type: application/json\r\n"
    return head_.encode() + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


def _answers(data: bytes) -> list[tuple[bytes, bytes]]:
    """Each HTTP response in ``data``: its head and its body (by its Content-Length)."""
    out = []
    while data:
        head_, _, rest = data.partition(b"\r\n\r\n")
        length = int(
            next(
                v
                for k, _, v in (line.partition(b": ") for line in head_.split(b"\r\n"))
                if k.lower() == b"content-length"
            )
        )
        if len(rest) < length:
            raise ValueError("the body is not whole yet")
        out.append((head_, rest[:length]))
        data = rest[length:]
    return out


def test_inference_answers_keep_http_semantics_keep_alive_pipelining_and_http_1_0(service: Service) -> None:
    """Inference requests are answered by the connection itself, without ASGI: keep-alive serves several in
    turn on one connection, pipelined ones are answered in order (one id each), and HTTP/1.0 gets its answer
    with ``connection: close`` and the end of the connection."""
    with service.connect() as sock:
        for i in (1, 2):  # keep-alive: one after the other on one connection
            sock.sendall(_infer_request([float(i), 0, 0, 0]))
            (answer,) = _answers(_read_answers(sock, 1))
            assert status_of(answer[0]) == 200 and b'"id":"%d.0"' % i in answer[1], answer
            assert b"connection: close" not in answer[0].lower()
        # pipelined: three requests in one write, answered in order
        sock.sendall(b"".join(_infer_request([float(i), 0, 0, 0]) for i in (3, 4, 5)))
        answers = _answers(_read_answers(sock, 3))
        assert [status_of(h) for h, _ in answers] == [200, 200, 200]
        assert [b'"id":"%d.0"' % i in body for (_, body), i in zip(answers, (3, 4, 5), strict=True)] == [True] * 3
    answer = exchange(service, _infer_request([6.0, 0, 0, 0], version="1.0"))  # read until the server closes
    ((head_, body),) = _answers(answer)
    assert status_of(head_) == 200 and b"connection: close" in head_.lower()
    assert b'"id":"6.0"' in body


def _read_answers(sock: socket.socket, count: int) -> bytes:
    """Read from ``sock`` until ``count`` whole responses have come."""
    data = b""
    while True:
        try:
            if len(_answers(data)) >= count:
                return data
        except (StopIteration, ValueError):  # a head or body not whole yet
            pass
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed after {data!r}"
        data += chunk


def test_keep_alive_closes_a_connection_idle_that_long_and_never_one_in_use(
    built_repository: Path, tmp_path: Path
) -> None:
    """NORMSERVE_KEEP_ALIVE_S counts from a connection's last answer: one idle that long is closed, and one
    that is never idle that long stays open however long it is in use, its requests answered by the
    connection itself (inference) or through ASGI (health) alike."""
    keep_alive_s = 2.0

    def ask(sock: socket.socket, request: bytes) -> None:
        sock.sendall(request)
        ((answer_head, _),) = _answers(_read_answers(sock, 1))
        assert status_of(answer_head) == 200

    def closed_by_server(sock: socket.socket) -> bool:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""

    inference, health = _infer_request([1.0, 0, 0, 0]), head() + b"\r\n"
    with running(built_repository, tmp_path, NORMSERVE_KEEP_ALIVE_S=str(keep_alive_s)) as short:
        with short.connect() as busy, short.connect() as pausing, short.connect() as idle:
            for sock in (busy, pausing, idle):
                ask(sock, inference)
            last_pause = started = time.monotonic()
            while (now := time.monotonic()) - started < 3 * keep_alive_s:
                ask(busy, inference if int(now * 10) % 2 else health)  # a request every 0.1 s
                if now - last_pause >= 0.6 * keep_alive_s:  # idle 0.6 of the timeout each time, never all of it
                    ask(pausing, inference)
                    last_pause = time.monotonic()
                time.sleep(0.1)
            assert not closed_by_server(busy) and not closed_by_server(pausing)
            assert closed_by_server(idle), f"a connection idle {3 * keep_alive_s:g} s is still open"
            ask(busy, inference)
            ask(pausing, health)
            time.sleep(keep_alive_s + SLACK_S)
            assert closed_by_server(busy) and closed_by_server(pausing)


def test_a_request_line_without_an_http_version_is_refused(service: Service) -> None:
    answer = exchange(service, b"GET /v2/health/ready\r\n\r\n")
    assert status_of(answer) == 505 and b"HTTP version 0.9 is not supported" in answer, answer[:200]


def test_a_transfer_coding_other_than_chunked_gets_501(service: Service) -> None:
    body = b'5\r\n{"in\r\n0\r\n\r\n'
    request = head("/v2/models/affine/infer", "POST") + b"Transfer-Encoding: gzip, chunked\r\n\r\n" + body
    answer = exchange(service, request)
    assert status_of(answer) == 501 and b"'gzip, chunked' is not supported" in answer, answer[:200]
    assert httpx.get(f"{service.url}/v2/health/ready").status_code == 200


def test_a_path_with_a_trailing_slash_is_not_redirected_to_the_host_the_client_named(service: Service) -> None:
    answer = httpx.get(f"{service.url}/v2/models/affine/", headers={"Host": "evil.example"})
    assert answer.status_code == 404 and "location" not in answer.headers


def test_a_request_refused_from_its_head_gets_one_response_even_if_its_body_is_broken(
    built_repository: Path, tmp_path: Path
) -> None:
    """Refused with 503 from its head (the queue is full), then a chunked body the parser refuses: the client
    hears the 503 alone, then the end of the connection, not a second (400) response."""
    settings = {"NORMSERVE_QUEUE_LIMIT": "1", "NORMSERVE_MAX_QUEUE_DELAY_MS": "3000"}
    with running(built_repository, tmp_path, **settings) as server:
        waiting = server.connect()  # its one-row request sits out the 3 s delay: the queue is full
        body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}'
        request = head("/v2/models/affine/infer", "POST") + b"Content-Length: %d\r\n\r\n" % len(body) + body
        waiting.sendall(request)
        time.sleep(0.5)
        broken = head("/v2/models/affine/infer", "POST") + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"
        answer = exchange(server, broken)
        assert answer.count(b"HTTP/1.1 ") == 1 and status_of(answer) == 503, answer[:300]
        assert status_of(waiting.recv(65536)) == 200  # the accepted request is answered
        waiting.close()


def test_one_client_cannot_take_every_connection(built_repository: Path, tmp_path: Path) -> None:
    """40 silent sockets from 127.0.0.1 take its share (half of the 40), not the whole cap: a client on
    127.0.0.2 still connects and is served, and so is 127.0.0.1 again once its sockets close."""
    settings = {"NORMSERVE_MAX_CONNECTIONS": "40", "NORMSERVE_HEADER_TIMEOUT_S": "30"}  # the taken ones stay
    with running(built_repository, tmp_path, **settings) as capped:
        host, port = capped.address
        held = [capped.connect() for _ in range(40)]
        answered: dict[socket.socket, bytes] = {}
        deadline = time.monotonic() + 10
        while len(answered) < 20 and time.monotonic() < deadline:  # the refused ones hear a 503 at once
            readable, _, _ = select.select([s for s in held if s not in answered], [], [], 0.5)
            for sock in readable:
                answered[sock] = sock.recv(65536)
        time.sleep(0.3)  # and no more come
        late, _, _ = select.select([s for s in held if s not in answered], [], [], 0)
        assert len(answered) == 20 and not late, (len(answered), len(late))
        for answer in answered.values():
            assert status_of(answer) == 503 and b"NORMSERVE_MAX_CONNECTIONS_PER_CLIENT=20 of 40" in answer, answer
        other = socket.create_connection((host, port), timeout=5, source_address=("127.0.0.2", 0))
        with other:
            other.sendall(head() + b"\r\n")
            assert status_of(other.recv(65536)) == 200
        for sock in held:
            sock.close()
        time.sleep(0.5)
        assert httpx.get(f"{capped.url}/v2/health/ready").status_code == 200
    notices = [line for line in capped.log.read_text().splitlines() if "NORMSERVE_MAX_CONNECTIONS_PER_CLIENT" in line]
    assert notices and "this client (127.0.0.1) has 20 connections open" in notices[0], notices


def test_a_client_that_pipelines_and_never_reads_cannot_grow_the_server(built_repository: Path, tmp_path: Path) -> None:
    """Requests pipelined on one connection whose answers are never read: the server reads no further once
    a few wait, and closes the connection once a read brings too many; its memory stays put and other
    clients are answered throughout."""
    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}'
    request = head("/v2/models/affine/infer", "POST") + b"Content-Length: %d\r\n\r\n" % len(body) + body
    with running(built_repository, tmp_path) as server:
        before = server.rss_mb()
        attacker = socket.socket()
        attacker.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it never reads
        attacker.connect(server.address)
        attacker.setblocking(False)
        stream, sent, closed = memoryview(request * 200), 0, False
        health: list[float] = []
        until = time.monotonic() + 5
        last_check = 0.0
        while time.monotonic() < until and not closed:
            try:
                sent += (n := attacker.send(stream))
                stream = stream[n:] or memoryview(request * 200)
            except BlockingIOError:
                time.sleep(0.001)
            except OSError:  # closed by the server
                closed = True
            if time.monotonic() - last_check > 0.25:
                last_check = time.monotonic()
                started = time.perf_counter()
                assert httpx.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200
                health.append(time.perf_counter() - started)
        grown = server.rss_mb() - before
        attacker.close()
    log = server.log.read_text()
    assert grown < 100, f"the server's RSS grew {grown:.0f} MB while {sent / 1e6:.1f} MB were pipelined to it"
    assert "pipelined requests waited on one connection" in log or not closed, log[-2000:]
    assert health and max(health) < 5, health  # answered throughout (the figure is the benchmark's, not this)


@dataclass
class Answer:
    client: int
    status: int
    retry_after: bool
    settled: bool  # its request was sent once every client had had its first answer


def closed_loop(
    address: tuple[str, int], request: bytes, clients: int, seconds: float, split: int | None = None
) -> list[Answer]:
    """``clients`` keep-alive connections, each sending ``request`` again as soon as its answer is in; with
    ``split``, in two writes, the first of that many bytes."""
    selector = selectors.DefaultSelector()
    buffers: dict[socket.socket, bytes] = {}
    first_answered: set[int] = set()
    settled: dict[socket.socket, bool] = {}  # whether the request in flight was sent once all had an answer

    def send(sock: socket.socket) -> None:
        settled[sock] = len(first_answered) == clients
        sock.settimeout(5)  # sent whole, however small the socket's buffer
        if split is None:
            sock.sendall(request)
        else:
            sock.sendall(request[:split])
            time.sleep(0.0005)  # the two writes reach the server apart
            sock.sendall(request[split:])
        sock.setblocking(False)

    for client in range(clients):
        sock = socket.create_connection(address, timeout=5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, client)
        buffers[sock] = b""
    started = time.monotonic()
    answers: list[Answer] = []
    try:
        for sock in buffers:
            send(sock)
        while time.monotonic() - started < seconds:
            for key, _ in selector.select(timeout=0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                chunk = sock.recv(65536)
                assert chunk, "the server closed a connection under load"
                buffers[sock] += chunk
                while (end := buffers[sock].find(b"\r\n\r\n")) >= 0:
                    lines = buffers[sock][:end].lower().split(b"\r\n")
                    length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length:"))
                    if len(buffers[sock]) < end + 4 + length:
                        break
                    status = status_of(buffers[sock][:end])
                    buffers[sock] = buffers[sock][end + 4 + length :]
                    retry_after = any(line.startswith(b"retry-after:") for line in lines)
                    answers.append(Answer(key.data, status, retry_after, settled[sock]))
                    first_answered.add(key.data)
                    send(sock)
    finally:
        selector.close()
        for sock in buffers:
            sock.close()
    return answers


@pytest.mark.parametrize("sent", ["whole", "in two writes", f"past {KEEP_BYTES} bytes"])
def test_past_a_models_fill_its_connections_wait_unread_instead_of_being_refused(
    built_repository: Path, tmp_path: Path, sent: str
) -> None:
    """64 clients on their own keep-alive connections, each sending its next request the moment its answer
    comes, to a model that takes 8 requests in at once (NORMSERVE_INTAKE_BATCHES=1 of 8 rows) and queues at
    most 32. The first wave comes on new connections, whose requests are read as they come: what passes the
    queue limit is refused with 503 and Retry-After. From then on a connection answered while the model has
    its fill is parsed no further until the model answers more, so what its client sends waits unparsed:
    nothing more is refused, every request is answered, and the queue stays well below its limit. (Before,
    every connection was read as it sent, the queue stayed at its limit, and two requests in three were
    refused for as long as the load lasted.)

    What a held connection's client sends is read and kept unparsed until it is released, up to one chunk of
    KEEP_BYTES; then it is read no further. Each way its next request may come is answered in order: whole,
    in two writes (head, then body), and larger than KEEP_BYTES (the connection stops being read)."""
    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}'
    if sent.startswith("past"):
        body = body[:-1] + b" " * KEEP_BYTES + b"}"
    request = head("/v2/models/affine/infer", "POST") + b"Content-Length: %d\r\n\r\n" % len(body) + body
    split = request.index(b"\r\n\r\n") + 4 if sent == "in two writes" else None
    settings = {"NORMSERVE_INTAKE_BATCHES": "1", "NORMSERVE_QUEUE_LIMIT": "32"}
    samples: list[tuple[float, float]] = []  # held connections, queued requests
    with running(built_repository, tmp_path, **settings) as server:
        stop = threading.Event()

        def sample() -> None:
            with httpx.Client(base_url=server.url, timeout=10) as client:
                while not stop.is_set():
                    text = client.get("/metrics").text
                    values = [
                        float(line.rsplit(" ", 1)[1])
                        for family in ("normserve_held_connections", "normserve_pending_requests")
                        for line in text.splitlines()
                        if line.startswith(family + '{model="affine"')
                    ]
                    samples.append((values[0], values[1]))
                    time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        answers = closed_loop(server.address, request, clients=64, seconds=3.0, split=split)
        stop.set()
        sampler.join(timeout=10)
        time.sleep(0.5)  # the clients closed: nothing may stay held
        after = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert 'normserve_held_connections{model="affine",version="1"} 0.0' in after
        served = httpx.post(f"{server.url}/v2/models/affine/infer", content=body, timeout=10)
        assert served.status_code == 200
    refused = [a for a in answers if a.status == 503]
    assert all(a.retry_after for a in refused), "a 503 without Retry-After"
    assert {a.status for a in answers} <= {200, 503}
    # Past the first wave: requests sent once every client had its first answer. (A client answered early in
    # the first wave sends again while later clients' first requests may still be filling the queue.)
    settled = [a for a in answers if a.settled]
    assert len(settled) >= 100, f"only {len(settled)} answers past the first wave"
    late = [a for a in settled if a.status != 200]
    assert not late, f"{len(late)} of {len(settled)} requests refused past the first wave"
    held = max(h for h, _ in samples)
    queued = max(q for _, q in samples)
    assert held >= 32, f"at most {held:.0f} of 64 connections were held (8 requests in flight, 56 waiting)"
    assert queued <= 24, f"{queued:.0f} requests were queued at once, near the limit of 32"
