"""The bad-input suite over the wire: malformed inference requests, sent over real HTTP to a real server.

Each gets the right status and a JSON body ``{"error": message}`` whose message names what was
expected (datatype, shape, input name, max batch size, the models or versions there are), never a
traceback; each that reaches a model is counted in ``normserve_request_failure_total`` under its reason;
and after each the server still answers a good request exactly.
"""

from __future__ import annotations

import gzip
import json
import socket
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest

from bench.suite.servers import metric_samples
from service.config import Settings
from service.routes import inference
from tests.service.conftest import RunningServer, ServeFactory, affine_expected, infer_json
from tests.service.malformed import GOOD_INPUT, GOOD_X, PARSE_CASES, Req, with_token, x_input

REASONS = {400: "invalid_input", 404: "not_found", 413: "too_large", 415: "unsupported_media_type"}

# What only the wire can show: media types and encodings, which the HTTP layer reads before the parser.
WIRE_CASES: list[tuple[Any, ...]] = [
    # media type
    ("Content-Type text/plain", x_input()._replace(headers={"Content-Type": "text/plain"}), 415, ["'text/plain'"]),
    (
        "Content-Type form",
        Req(content=b"x=1&x=2", headers={"Content-Type": "application/x-www-form-urlencoded"}),
        415,
        ["'application/x-www-form-urlencoded'", "send application/json"],
    ),
    ("Content-Encoding br", x_input()._replace(headers={"Content-Encoding": "br"}), 415, ["'br'", "uncompressed"]),
    (
        "Content-Encoding gzip, body not gzip",
        x_input()._replace(headers={"Content-Encoding": "gzip"}),
        400,
        ["not valid gzip data", "expected what Content-Encoding says"],
    ),
    (
        "Content-Encoding gzip, bytes after the stream",
        Req(content=gzip.compress(json.dumps(x_input().body).encode()) + b"junk", headers={"Content-Encoding": "gzip"}),
        400,
        ["4 bytes follow the end of the gzip stream", "expected one stream"],
    ),
    # routes
    (
        "unknown model",
        Req({"inputs": [GOOD_INPUT]}, path="/v2/models/nope/infer"),
        404,
        ["unknown model 'nope'", "POST /v2/repository/index lists the models served"],
    ),
    (
        "unknown version",
        Req({"inputs": [GOOD_INPUT]}, path="/v2/models/affine/versions/7/infer"),
        404,
        ["model 'affine' has no version '7'", "it has: 1"],
    ),
    ("unknown route", Req({"inputs": [GOOD_INPUT]}, path="/v2/modelz/affine/infer"), 404, ["no route POST /v2/modelz"]),
]
# Parser refusals that also go over HTTP, one of each kind (the whole table runs in-process, test_protocol.py).
OVER_THE_WIRE = {
    "shape with 5 columns",
    "unknown input name",
    "NaN",
    "body empty",
    "9 rows, over max batch 8",
    "header length a superscript digit",
    "NaN in binary data",
}
CASES = WIRE_CASES + [c for c in PARSE_CASES if c[0] in OVER_THE_WIRE]


def assert_error(response: httpx.Response, status: int, fragments: list[str]) -> None:
    assert "Traceback" not in response.text
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str), body
    for fragment in fragments:
        assert fragment in body["error"]


def failures(server: RunningServer, model: str, reason: str) -> float:
    """normserve_request_failure_total of this model and reason, whichever version label it was counted under."""
    return sum(
        sample.value
        for sample in metric_samples(server.url)
        if sample.name == "normserve_request_failure_total"
        and sample.labels["model"] == model
        and sample.labels["reason"] == reason
    )


def assert_still_serves(server: RunningServer) -> None:
    response = httpx.post(f"{server.url}/v2/models/affine/infer", json=infer_json("x", GOOD_X))
    assert response.status_code == 200, response.text
    outputs = {o["name"]: np.array(o["data"], dtype=np.float32).reshape(o["shape"]) for o in response.json()["outputs"]}
    y, total = affine_expected(GOOD_X)
    np.testing.assert_array_equal(outputs["y"], y)
    np.testing.assert_array_equal(outputs["total"], total)


@pytest.fixture(scope="module")
def shared_server(module_serve: ServeFactory) -> Iterator[RunningServer]:
    """One server for the table: each case counts its failure as a difference, so the cases may share it."""
    with module_serve() as running:
        yield running


@pytest.mark.parametrize(
    ("request_", "status", "fragments"), [pytest.param(*c[1:4], id=c[0], marks=c[4:]) for c in CASES]
)
def test_a_bad_request_is_refused_with_what_was_expected(
    shared_server: RunningServer, request_: Req, status: int, fragments: list[str]
) -> None:
    server = shared_server
    counted = request_.path is None  # the request named a model that exists: counted under its name
    before = failures(server, request_.model, REASONS[status])
    assert_error(request_.send(server.url), status, fragments)
    if counted:
        assert failures(server, request_.model, REASONS[status]) == before + 1
    assert_still_serves(server)


def test_failures_are_counted_by_reason_and_model(server: RunningServer) -> None:
    unknown_model = Req({"inputs": [GOOD_INPUT]}, path="/v2/models/nope/infer")
    for request_ in [x_input(shape=[1, 5]), with_token("NaN"), Req([GOOD_INPUT]), unknown_model]:
        assert request_.send(server.url).status_code >= 400
    assert_still_serves(server)
    count = server.metric
    assert (
        count("normserve_request_failure_total", model="affine", reason="invalid_input", version="1", protocol="http")
        == 3
    )
    assert (
        count("normserve_request_failure_total", model="", reason="not_found", version="", protocol="http") == 1
    )  # unknown model
    assert count("normserve_request_success_total", model="affine", version="1", protocol="http") == 1


def test_made_up_versions_do_not_mint_metric_series(server: RunningServer) -> None:
    for version in ("7", "8", "anything"):
        assert_error(
            Req({"inputs": [GOOD_INPUT]}, path=f"/v2/models/affine/versions/{version}/infer").send(server.url),
            404,
            [f"no version '{version}'"],
        )
    samples = [line for line in httpx.get(f"{server.url}/metrics").text.splitlines() if not line.startswith("#")]
    assert not [line for line in samples if 'version="7"' in line or 'version="anything"' in line]


# Bodies over max_body_bytes: refused with 413, from the declared length before reading any of it.

LIMIT = 1024


@pytest.fixture
def small_server(serve: ServeFactory) -> Iterator[RunningServer]:
    with serve(max_body_bytes=LIMIT) as running:
        yield running


def chunks() -> Iterator[bytes]:  # no Content-Length: httpx sends it chunked
    yield from [b" " * 256] * 8


def spaces() -> bytes:
    return b" " * 2000


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        pytest.param(spaces, ["the body is 2000 bytes", f"at most {LIMIT}"], id="Content-Length over the limit"),
        pytest.param(chunks, [f"the body passed {LIMIT} bytes"], id="chunked body passing the limit"),
    ],
)
def test_a_body_over_the_limit_is_refused_413(
    small_server: RunningServer, content: Callable[[], Any], fragments: list[str]
) -> None:
    response = httpx.post(f"{small_server.url}/v2/models/affine/infer", content=content())
    assert_error(response, 413, [*fragments, "NORMSERVE_MAX_BODY_BYTES"])
    assert failures(small_server, "affine", "too_large") == 1
    assert_still_serves(small_server)


def read_response(sock: socket.socket) -> tuple[int, Any]:
    """The status and JSON body of one HTTP/1.1 response, read by Content-Length."""

    def more(received: bytes) -> bytes:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection after {received!r}"
        return received + chunk

    received = b""
    while b"\r\n\r\n" not in received:
        received = more(received)
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers["content-length"]):
        body = more(body)
    return int(lines[0].split()[1]), json.loads(body)


def head_and_a_little(server: RunningServer, head: str) -> tuple[int, Any]:
    """Send a request's head and the first bytes of its body, never the rest; the answer that comes anyway."""
    host, port = server.host.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + b'{"inputs": [')  # and nothing more: the rest never comes
        return read_response(sock)  # a server waiting for the body times this out


def test_413_arrives_before_the_body_is_sent(small_server: RunningServer) -> None:
    """A client declaring 1 GB gets its 413 at once: the server never waits for (or buffers) the body."""
    head = (
        f"POST /v2/models/affine/infer HTTP/1.1\r\nHost: {small_server.host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {10**9}\r\n\r\n"
    )
    status, body = head_and_a_little(small_server, head)
    assert status == 413, body
    assert f"the body is {10**9} bytes" in body["error"] and f"at most {LIMIT}" in body["error"]
    assert_still_serves(small_server)


# The JSON header of a binary request: held to max_json_bytes, from the head (the body is not read).

JSON_LIMIT = 1024


@pytest.fixture
def json_limited_server(serve: ServeFactory) -> Iterator[RunningServer]:
    with serve(max_json_bytes=JSON_LIMIT) as running:  # the body limit stays at its 64 MiB default
        yield running


@pytest.mark.parametrize(
    ("size", "shown"),
    [
        (str(10**7), str(10**7)),
        ("9" * 5000, "9" * 40 + "... (5000 digits)"),  # past the 4,300 digits Python's int() converts: still a 413
    ],
)
def test_a_json_header_over_the_json_limit_is_refused_413_before_the_body_is_sent(
    json_limited_server: RunningServer, size: str, shown: str
) -> None:
    """Claiming the whole body as the "header" does not get a body-sized JSON document parsed."""
    head = (
        f"POST /v2/models/affine/infer HTTP/1.1\r\nHost: {json_limited_server.host}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {10**7}\r\n"
        f"Inference-Header-Content-Length: {size}\r\n\r\n"
    )
    status, body = head_and_a_little(json_limited_server, head)
    assert status == 413, body
    assert f"the JSON header is {shown} bytes" in body["error"] and "NORMSERVE_MAX_JSON_BYTES" in body["error"]
    assert failures(json_limited_server, "affine", "too_large") == 1
    assert_still_serves(json_limited_server)


def test_heads_with_a_new_long_content_type_each_are_checked_each_time_and_not_kept() -> None:
    # An inference head's body checks are kept per combination of its headers (routes.inference._head_checks):
    # a client sending a new long Content-Type with each request must not fill that cache with them.
    kept = inference._head_checks.cache_info().currsize
    state = SimpleNamespace(settings=Settings())
    for i in range(600):
        headers = inference.RequestHeaders(content_type=f"application/json; q={'x' * 300}{i}", content_length="10")
        reader, encoding = inference.request_body_reader(state, headers, None)  # type: ignore[arg-type]
        assert encoding == "identity" and reader.limit.bytes == Settings().max_json_bytes
    assert inference._head_checks.cache_info().currsize == kept


def test_a_json_header_longer_than_the_body_is_refused_400(json_limited_server: RunningServer) -> None:
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})
    response = httpx.post(
        f"{json_limited_server.url}/v2/models/affine/infer",
        content=header.encode(),
        headers={"Inference-Header-Content-Length": str(len(header) + 10)},
    )
    assert_error(response, 400, [f"Inference-Header-Content-Length is {len(header) + 10}", "Content-Length"])
    assert_still_serves(json_limited_server)


# Bodies held at once: bounded by max_bodies_bytes; past it, 503 with Retry-After from the head.

MB = 2**20


def test_bodies_held_at_once_are_bounded_and_given_back(serve: ServeFactory) -> None:
    with serve(max_body_bytes=MB, max_bodies_bytes=2 * MB) as server:
        host, port = server.host.split(":")
        slow = []
        for _ in range(2):  # two clients sending 1 MB bodies slowly: they hold the whole budget
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(
                f"POST /v2/models/affine/infer HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {MB}\r\n\r\n".encode()
                + b'{"inputs": '
            )
            slow.append(sock)
        budget = server.app.state.normserve.bodies
        deadline = time.monotonic() + 10
        while budget.held < 2 * MB and time.monotonic() < deadline:
            time.sleep(0.01)
        assert budget.held == 2 * MB
        third = httpx.post(f"{server.url}/v2/models/affine/infer", content=b" " * (MB // 2))
        assert_error(third, 503, ["holds 2097152 bytes of request bodies", "NORMSERVE_MAX_BODIES_BYTES"])
        assert third.headers["retry-after"] == "1"
        for sock in slow:  # they give up: what they held is given back
            sock.close()
        while budget.held and time.monotonic() < deadline:
            time.sleep(0.01)
        assert budget.held == 0
        assert_still_serves(server)
        assert budget.held == 0
