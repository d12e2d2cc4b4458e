"""The bad-input suite: malformed inference requests, sent over real HTTP to a real server.

Each gets the right status and a JSON body ``{"error": message}`` whose message names what was
expected (datatype, shape, input name, max batch size, the models or versions there are), never a
traceback; each that reaches a model is counted in ``normserve_request_failure_total`` under its reason;
and after each the server still answers a good request exactly.
"""

from __future__ import annotations

import gzip
import json
import socket
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import httpx
import numpy as np
import pytest

from bench.suite.servers import metric_samples
from tests.service.conftest import RunningServer, ServeFactory, affine_expected, infer_json

# Quarters and small integers: x @ W + b is exact in float32, so answers compare with ==.
GOOD_X = np.array([[1, 2, 3, 4], [-1, 0.5, 2, -3]], dtype=np.float32)
GOOD_INPUT: dict[str, Any] = {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1.0, 2.0, 3.0, 4.0]}
REASONS = {400: "invalid_input", 404: "not_found", 413: "too_large", 415: "unsupported_media_type"}
DROP = object()  # a field value meaning "leave the field out"


class Req(NamedTuple):
    """One request: a JSON ``body``, or raw ``content`` when the body is not JSON (or is JSON plus binary data)."""

    body: Any = None
    content: bytes | None = None
    headers: dict[str, Any] | None = None  # values may be bytes: headers a client can send but str cannot spell
    model: str = "affine"
    path: str | None = None  # instead of /v2/models/{model}/infer

    def send(self, url: str) -> httpx.Response:
        content = self.content if self.content is not None else json.dumps(self.body).encode()
        headers = {"Content-Type": "application/json", **(self.headers or {})}
        return httpx.post(url + (self.path or f"/v2/models/{self.model}/infer"), content=content, headers=headers)


def x_input(**changes: Any) -> Req:
    """A request for affine whose one input is the good one with these fields changed (DROP: left out)."""
    tensor = {k: v for k, v in {**GOOD_INPUT, **changes}.items() if v is not DROP}
    return Req({"inputs": [tensor]})


def with_token(token: str) -> Req:
    """A request whose last value is ``token`` verbatim: NaN and Infinity are not JSON, so json.dumps is no use."""
    content = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, %s]}]}'
    return Req(content=content % token.encode())


def binary(
    header_length: str | bytes | None = None, size: int = 16, tail: bytes = b"", values: list[float] | None = None
) -> Req:
    """A binary-data request: the JSON header, then the tensor's bytes (16 for affine's [1, 4] FP32) and ``tail``."""
    header = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": size}}]}
    ).encode()
    blob = np.array(values if values is not None else range(4), dtype=np.float32).tobytes()[:size]
    length = str(len(header)) if header_length is None else header_length
    return Req(
        content=header + blob + tail,
        headers={"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": length},
    )


# (description, request, status, fragments the error message must hold[, marks])
CASES: list[tuple[Any, ...]] = [
    # shape
    ("shape with 5 columns", x_input(shape=[1, 5], data=[0] * 5), 400, ["input 'x'", "[1, 5]", "expected [-1, 4]"]),
    ("shape of the wrong rank", x_input(shape=[1, 2, 2]), 400, ["input 'x'", "[1, 2, 2]", "expected [-1, 4]"]),
    ("shape without the batch dimension", x_input(shape=[4]), 400, ["[4]", "expected [-1, 4]"]),
    ("shape of floats", x_input(shape=[1, 4.0]), 400, ["[1, 4.0]", "list of integers like [-1, 4]"]),
    (
        "tiny-cnn-bn image without its channel dimension",
        Req(infer_json("input", np.zeros((1, 8, 8), np.float32)), model="tiny-cnn-bn"),
        400,
        ["input 'input'", "[1, 8, 8]", "expected [-1, 1, 8, 8]"],
    ),
    # datatype
    ("datatype FP64", x_input(datatype="FP64"), 400, ["input 'x'", "'FP64'", "expected FP32"]),
    ("datatype INT32", x_input(datatype="INT32", data=[1, 2, 3, 4]), 400, ["'INT32'", "expected FP32"]),
    # names and missing fields
    ("unknown input name", x_input(name="input"), 400, ["no input 'input'", "expected x (FP32 [-1, 4])"]),
    ("'inputs' missing", Req({"id": "1"}), 400, ["'inputs' is missing", "x (FP32 [-1, 4])"]),
    ("'inputs' empty", Req({"inputs": []}), 400, ["'inputs' is []", "x (FP32 [-1, 4])"]),
    ("'inputs' an object", Req({"inputs": GOOD_INPUT}), 400, ["expected a list of tensors: x (FP32 [-1, 4])"]),
    ("input not an object", Req({"inputs": [5]}), 400, ["an input is 5", "object with name, shape, datatype"]),
    ("input without name", x_input(name=DROP), 400, ["has no 'name'"]),
    ("input without shape", x_input(shape=DROP), 400, ["input 'x' has no 'shape'"]),
    ("input without datatype", x_input(datatype=DROP), 400, ["input 'x' has no 'datatype'"]),
    ("input without data", x_input(data=DROP), 400, ["input 'x'", "neither 'data' nor parameters.binary_data_size"]),
    ("input given twice", Req({"inputs": [GOOD_INPUT, GOOD_INPUT]}), 400, ["input 'x' is given twice"]),
    # data
    ("strings in data", x_input(data=[1, 2, 3, "4"]), 400, ["input 'x'", "strings", "expected FP32 numbers"]),
    ("nulls in data", x_input(data=[1, 2, None, 4]), 400, ["input 'x'", "nulls", "expected FP32 numbers"]),
    ("objects in data", x_input(data=[1, 2, 3, {"v": 4}]), 400, ["objects", "expected FP32 numbers"]),
    ("data a string", x_input(data="1 2 3 4"), 400, ["input 'x' data is str", "expected a list of numbers"]),
    (
        "ragged rows",
        x_input(shape=[2, 4], data=[[1, 2, 3, 4], [5, 6, 7]]),
        400,
        ["input 'x'", "not a rectangular array", "8 numbers", "[2, 4]"],
    ),
    ("too few values", x_input(data=[1, 2, 3]), 400, ["input 'x' has 3 values", "[1, 4] needs 4"]),
    ("too many values", x_input(data=list(range(8))), 400, ["input 'x' has 8 values", "[1, 4] needs 4"]),
    ("no values", x_input(data=[]), 400, ["input 'x' has 0 values", "[1, 4] needs 4"]),
    ("NaN", with_token("NaN"), 400, ["not valid JSON", "NaN and Infinity are not JSON numbers", "finite values"]),
    ("Infinity", with_token("Infinity"), 400, ["not valid JSON", "NaN and Infinity are not JSON numbers"]),
    ("-Infinity", with_token("-Infinity"), 400, ["not valid JSON", "NaN and Infinity are not JSON numbers"]),
    ("1e400, past float64", with_token("1e400"), 400, ["not valid JSON", "NaN and Infinity are not JSON numbers"]),
    ("1e39, past FP32", with_token("1e39"), 400, ["input 'x'", "outside FP32's range"]),
    # the body as a whole
    ("body not JSON", Req(content=b"x=1,2,3,4"), 400, ["not valid JSON", "expected a KServe v2 inference request"]),
    ("body empty", Req(content=b""), 400, ["not valid JSON", "expected a KServe v2 inference request"]),
    ("body a JSON list", Req([GOOD_INPUT]), 400, ["JSON list", "expected an object with 'inputs'"]),
    ("non-string id", Req({"id": 42, "inputs": [GOOD_INPUT]}), 400, ["'id' is 42", "expected a string"]),
    (
        "negative timeout",
        Req({"inputs": [GOOD_INPUT], "parameters": {"timeout": -1}}),
        400,
        ["'timeout' is -1", "positive number of microseconds"],
    ),
    # batch size
    ("zero rows", x_input(shape=[0, 4], data=[]), 400, ["input 'x' has 0 rows", "at least 1"]),
    ("negative rows", x_input(shape=[-1, 4]), 400, ["input 'x' has -1 rows", "at least 1"]),
    (
        "9 rows, over max batch 8",
        Req(infer_json("x", np.ones((9, 4), np.float32))),
        400,
        ["input 'x' has 9 rows", "max batch size of 8"],
    ),
    # outputs
    (
        "unknown output",
        Req({"inputs": [GOOD_INPUT], "outputs": [{"name": "z"}]}),
        400,
        ["no output 'z'", "expected one of total, y"],
    ),
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
    # binary data
    (
        "header length not a number",
        binary(header_length="abc"),
        400,
        ["Inference-Header-Content-Length is 'abc'", "length in bytes of the JSON header"],
    ),
    (
        "header length past the body",
        binary(header_length="100000"),
        400,
        ["Inference-Header-Content-Length is '100000'", "between 1 and the body's"],
    ),
    (
        "header length a superscript digit",
        binary(header_length=b"\xb2"),
        400,
        ["Inference-Header-Content-Length", "length in bytes of the JSON header"],
    ),
    ("binary_data_size 12", binary(size=12), 400, ["input 'x' has binary_data_size 12", "FP32 needs 16 bytes"]),
    (
        "binary_data_size with no bytes after the JSON",
        x_input(data=DROP, parameters={"binary_data_size": 16}),
        400,
        ["input 'x' needs bytes 0..16", "only 0 bytes follow"],
    ),
    (
        "NaN in binary data",
        binary(values=[0.0, float("nan"), 1.0, float("nan")]),
        400,
        ["input 'x' holds 2 NaN or Infinity value(s), the first at flat index 1", "expected finite numbers"],
    ),
    (
        "Infinity in binary data",
        binary(values=[float("-inf"), 0.0, 0.0, 0.0]),
        400,
        ["input 'x' holds 1 NaN or Infinity value(s), the first at flat index 0"],
    ),
    (
        "trailing bytes",
        binary(tail=b"xx"),
        400,
        ["2 bytes follow the binary tensors", "binary_data_size of the inputs sums to 16"],
    ),
]


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


@pytest.mark.parametrize(
    ("request_", "status", "fragments"), [pytest.param(*c[1:4], id=c[0], marks=c[4:]) for c in CASES]
)
def test_a_bad_request_is_refused_with_what_was_expected(
    server: RunningServer, request_: Req, status: int, fragments: list[str]
) -> None:
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
    assert count("normserve_request_failure_total", model="affine", reason="invalid_input", version="1") == 3
    assert count("normserve_request_failure_total", model="", reason="not_found", version="") == 1  # unknown model
    assert count("normserve_request_success_total", model="affine", version="1") == 1


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


def test_413_arrives_before_the_body_is_sent(small_server: RunningServer) -> None:
    """A client declaring 1 GB gets its 413 at once: the server never waits for (or buffers) the body."""
    head = (
        f"POST /v2/models/affine/infer HTTP/1.1\r\nHost: {small_server.host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {10**9}\r\n\r\n"
    )
    host, port = small_server.host.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + b'{"inputs": [')  # and nothing more: the rest never comes
        status, body = read_response(sock)  # a server waiting for the body times this out
    assert status == 413, body
    assert f"the body is {10**9} bytes" in body["error"] and f"at most {LIMIT}" in body["error"]
    assert_still_serves(small_server)
