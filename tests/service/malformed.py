"""Malformed inference requests, built once for the tests that parse them in-process (test_protocol.py)
and the tests that send them over HTTP (test_bad_input.py)."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import httpx
import numpy as np

from tests.service.conftest import infer_json

__all__ = ["DROP", "GOOD_INPUT", "GOOD_X", "PARSE_CASES", "Req", "binary", "with_token", "x_input"]

# Quarters and small integers: x @ W + b is exact in float32, so answers compare with ==.
GOOD_X = np.array([[1, 2, 3, 4], [-1, 0.5, 2, -3]], dtype=np.float32)
GOOD_INPUT: dict[str, Any] = {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1.0, 2.0, 3.0, 4.0]}
DROP = object()  # a field value meaning "leave the field out"


class Req(NamedTuple):
    """One request: a JSON ``body``, or raw ``content`` when the body is not JSON (or is JSON plus binary data)."""

    body: Any = None
    content: bytes | None = None
    headers: dict[str, Any] | None = None  # values may be bytes: headers a client can send but str cannot spell
    model: str = "affine"
    path: str | None = None  # instead of /v2/models/{model}/infer

    @property
    def raw(self) -> bytes:
        return self.content if self.content is not None else json.dumps(self.body).encode()

    @property
    def header_length(self) -> str | None:
        """Inference-Header-Content-Length as the server reads it (latin-1, as every header)."""
        value = (self.headers or {}).get("Inference-Header-Content-Length")
        return value.decode("latin-1") if isinstance(value, bytes) else value

    def send(self, url: str) -> httpx.Response:
        headers = {"Content-Type": "application/json", **(self.headers or {})}
        return httpx.post(url + (self.path or f"/v2/models/{self.model}/infer"), content=self.raw, headers=headers)


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


# What the protocol parser refuses, whatever the transport: (description, request, status, fragments the
# error message must hold). Each is parsed in-process in test_protocol.py; a few go over HTTP too.
PARSE_CASES: list[tuple[Any, ...]] = [
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
