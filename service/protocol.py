"""The Open Inference Protocol (KServe v2) on the wire, as Triton speaks it: parse and encode.

An inference request is JSON, optionally followed by raw tensor bytes (Triton's binary-data
extension): the header ``Inference-Header-Content-Length`` gives the JSON's length, and each input
sent as bytes says how many in ``parameters.binary_data_size``, in input order::

    {"id": "42", "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [...]}],
     "outputs": [{"name": "logits", "parameters": {"binary_data": true}}]}

Every datatype but BYTES goes both ways (BOOL, UINT8, INT8, INT16, INT32, INT64, FP16, FP32, FP64):
in JSON as numbers, BOOL as ``true``/``false``; as binary data in little-endian element order, BOOL as
one byte per element (0 or 1), as Triton sends it. A model with a batch dimension (max_batch_size >= 1)
takes any number of rows up to its max batch size, the same in every input; one without (max_batch_size
0) takes exactly the declared shapes, and a request counts as one row.

An output may ask for ``"classification": k`` (Triton's classification extension): its top k
classes per row of a 2-D output, as BYTES strings ``"<score>:<index>:<label>"``, or
``"<score>:<index>"`` where the model has no labels (as Triton answers without a label file).

JSON is parsed strictly: ``NaN`` and ``Infinity`` are not JSON numbers and are refused, as is any
value that does not fit the declared datatype; binary floating-point data (FP16, FP32, FP64) must be
finite too. This module is the hot path, so it parses with
orjson and checks by hand; the pydantic schemas at the bottom document the same format in OpenAPI.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from time import monotonic
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, Field

from repository import DTYPES, ModelConfig, TensorSpec
from service.errors import InvalidInput

__all__ = [
    "InferRequest",
    "InferenceRequestSchema",
    "InferenceResponseSchema",
    "RequestedOutput",
    "bytes_tensor",
    "check_infer_document",
    "encode_infer_response",
    "parse_infer_request",
    "top_classes",
]

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
_NO_PARAMETERS: dict[str, Any] = {}  # what a request without parameters reads as its parameters: never written to


class RequestedOutput:
    """One output a request asks for: its name, whether as binary data, and Triton's classification extension
    (the top ``classification`` classes instead of the tensor; 0: the tensor). (A plain class: protocol.pxd
    makes it an extension type when compiled, which a dataclass cannot be.)"""

    __slots__ = ("binary", "classification", "name")

    def __init__(self, name: str, binary: bool, classification: int = 0) -> None:
        self.name, self.binary, self.classification = name, binary, classification


class InferRequest:
    """One inference request, checked: its id, its inputs as arrays, its rows, the outputs it asks for and
    Triton's 'timeout' parameter in seconds (given in microseconds). (A plain class: protocol.pxd makes it an
    extension type when compiled, which a dataclass cannot be.)"""

    __slots__ = ("feeds", "id", "outputs", "plan", "rows", "timeout_s")

    def __init__(
        self,
        id: str | None,
        feeds: dict[str, np.ndarray],
        rows: int,
        outputs: list[RequestedOutput],
        timeout_s: float | None,
        plan: _Plan | None = None,
    ) -> None:
        self.id, self.feeds, self.rows, self.outputs, self.timeout_s = id, feeds, rows, outputs, timeout_s
        self.plan = plan  # the plan of its JSON (``_plan``, ``_plan_json``), which keeps its response's header too

    def deadline(self, server_timeout_s: float) -> float:
        """The ``time.monotonic()`` after which the request must not run: its own timeout, or the server's
        when it sets none or a longer one (no request may wait longer than NORMSERVE_REQUEST_TIMEOUT_MS)."""
        own = self.timeout_s if self.timeout_s is not None else server_timeout_s
        return monotonic() + min(own, server_timeout_s)


def _short(value: Any) -> str:
    """A value the client sent, as it appears in an error message: its repr, cut at 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _json(data: bytes | memoryview, what: str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(
            f"{what} is not valid JSON ({e}); expected a KServe v2 inference request. "
            "NaN and Infinity are not JSON numbers (and the models take finite values only)"
        ) from None


def _split_body(body: bytes, header_length: str | None) -> tuple[Any, memoryview]:
    if header_length is None:
        return _json(body, "the request body"), memoryview(b"")
    if not (header_length.isascii() and header_length.isdigit() and 0 < int(header_length) <= len(body)):
        raise InvalidInput(
            f"Inference-Header-Content-Length is {_short(header_length)}; expected the length in bytes of the JSON "
            f"header at the start of the body, between 1 and the body's {len(body)} bytes"
        )
    size = int(header_length)
    view = memoryview(body)
    return _json(view[:size], "the JSON header (the first Inference-Header-Content-Length bytes)"), view[size:]


def _check_shape(name: str, shape: Any, spec: TensorSpec, max_batch_size: int, batched: bool) -> list[int]:
    # Loops rather than all() over generators: this runs for every input of every request.
    integers = isinstance(shape, list)
    if integers:
        for d in shape:
            if type(d) is not int:
                integers = False
                break
    if not integers:
        raise InvalidInput(f"input '{name}' has shape {_short(shape)}; expected a list of integers like {spec.shape}")
    if not batched:
        if shape != spec.shape:
            raise InvalidInput(
                f"input '{name}' has shape {shape}; expected exactly {spec.shape} (the model has no batch dimension: "
                "max_batch_size 0)"
            )
        return list(shape)
    expected = spec.shape
    dims_ok = len(shape) == len(expected)
    if dims_ok:
        for d, s in zip(shape, expected, strict=True):
            if s != -1 and d != s:
                dims_ok = False
                break
    if not dims_ok:
        raise InvalidInput(f"input '{name}' has shape {shape}; expected {spec.shape} (-1: rows in the batch)")
    rows = shape[0]
    if rows < 1:
        raise InvalidInput(f"input '{name}' has {rows} rows; expected at least 1")
    if rows > max_batch_size:
        raise InvalidInput(
            f"input '{name}' has {rows} rows, more than this model's max batch size of {max_batch_size}; "
            "split the request"
        )
    return list(shape)


# The values each narrower datatype can hold: JSON numbers outside them are refused, not wrapped or made inf.
_RANGES: dict[str, tuple[Any, Any]] = {
    **{t: (np.iinfo(d.type).min, np.iinfo(d.type).max) for t, d in DTYPES.items() if d.kind in "iu"},  # type: ignore[type-var]
    "FP16": (-float(np.finfo(np.float16).max), float(np.finfo(np.float16).max)),
    "FP32": (-float(np.finfo(np.float32).max), float(np.finfo(np.float32).max)),
}


# What the flat FP32 path calls, as module globals: compiled code reads a global from a cache, where each
# ``np.empty`` would be an attribute lookup on the module, per request.
_empty, _prod, _FP32, _frombuffer = np.empty, math.prod, np.float32, np.frombuffer
_FP32_MAX = float(np.finfo(np.float32).max)


def _fp32_flat(data: list[Any], shape: list[int]) -> np.ndarray | None:
    """FP32 data sent flat, as clients send it: its numbers checked and stored in one pass (compiled, a C loop
    over the list: protocol.pxd types it; ten times the speed of the array module's conversion, which parses
    each item's format, and of numpy's, which first works out the list's nesting and types). None where the
    data is anything else: the wrong count, nested, holding a value that is not a number (TypeError), an int
    too large for a float (OverflowError), or a value past FP32's range. ``_from_json`` then reads it the
    general way, and refuses it with its reason."""
    n = len(data)
    if n != _prod(shape):
        return None
    values = _empty(n, dtype=_FP32)
    view = values  # compiled: a typed view of its memory
    limit = _FP32_MAX
    try:
        for i in range(n):
            x = data[i]
            # Before the store: from source, the comparison is what refuses a string (numpy would parse "1.5").
            if not -limit <= x <= limit:
                return None
            view[i] = x
    except (TypeError, OverflowError):
        return None
    return values.reshape(shape)


def _from_json(name: str, data: Any, shape: list[int], datatype: str) -> np.ndarray:
    if datatype == "FP32" and type(data) is list:
        fast = _fp32_flat(data, shape)
        if fast is not None:
            return fast
    dtype = DTYPES[datatype]
    if not isinstance(data, list):
        raise InvalidInput(f"input '{name}' data is {type(data).__name__}; expected a list of numbers")
    try:
        raw = np.array(data)
    except ValueError:  # ragged nesting
        raise InvalidInput(
            f"input '{name}' data is not a rectangular array; expected {math.prod(shape)} numbers, flat or nested "
            f"as {shape}"
        ) from None
    kinds = "b" if dtype.kind == "b" else "biu" if dtype.kind in "iu" else "biuf"
    if raw.dtype.kind not in kinds:
        held = {"U": "strings", "O": "nulls, objects or mixed"}.get(raw.dtype.kind, raw.dtype.name)
        raise InvalidInput(f"input '{name}' data holds {held} values; expected {datatype} numbers")
    if raw.size != math.prod(shape):
        raise InvalidInput(f"input '{name}' has {raw.size} values; its shape {shape} needs {math.prod(shape)}")
    low, high = _RANGES.get(datatype, (None, None))
    if low is not None and raw.size:
        # A float type's range is symmetric: one pass over the magnitudes does for the two ends.
        inside = abs(raw).max() <= high if low == -high else low <= raw.min() and raw.max() <= high
        if not inside:
            raise InvalidInput(f"input '{name}' has values outside {datatype}'s range [{low}, {high}]")
    # In range, so the cast cannot overflow (strict JSON has no NaN or Infinity to carry over).
    return raw.astype(dtype, copy=False).reshape(shape)


def _from_binary(name: str, size: Any, binary: memoryview, offset: int, shape: list[int], datatype: str) -> np.ndarray:
    dtype = DTYPES[datatype]
    expected = math.prod(shape) * dtype.itemsize
    if not (type(size) is int and size == expected):
        raise InvalidInput(
            f"input '{name}' has binary_data_size {_short(size)}; shape {shape} of {datatype} needs {expected} bytes"
        )
    if offset + size > len(binary):
        raise InvalidInput(
            f"input '{name}' needs bytes {offset}..{offset + size} of the binary data after the JSON header, "
            f"but only {len(binary)} bytes follow it"
        )
    flat = np.frombuffer(binary[offset : offset + size], dtype=dtype)
    if _binary_values_ok(flat, datatype):
        return flat.reshape(shape)
    if dtype.kind == "b":
        bytes_ = flat.view(np.uint8)
        first = int(np.flatnonzero(bytes_ > 1)[0])
        raise InvalidInput(
            f"input '{name}' holds byte {int(bytes_.flat[first])} at flat index {first}; a BOOL element is one byte, "
            "0 (false) or 1 (true)"
        )
    finite_each = np.isfinite(flat)
    first = int(np.flatnonzero(~finite_each)[0])
    raise InvalidInput(
        f"input '{name}' holds {int((~finite_each).sum())} NaN or Infinity value(s), the first at flat index "
        f"{first}; expected finite numbers, as JSON input must be too"
    )


def _binary_values_ok(flat: np.ndarray, datatype: str) -> bool:
    """Whether binary tensor data holds only what its datatype allows: a BOOL element one byte of 0 or 1, a
    floating-point value finite (FP32, the common case, by a C loop: numpy's isfinite and all() cost a
    microsecond each in calls)."""
    kind = flat.dtype.kind
    if kind == "b":
        return not (flat.size and flat.view(np.uint8).max() > 1)
    if kind == "f":
        return _fp32_finite(flat) if datatype == "FP32" else bool(np.isfinite(flat).all())
    return True


def _fp32_finite(values: np.ndarray) -> bool:
    """Whether every value of a flat FP32 array is finite (compiled, protocol.pxd: a C loop over its memory).
    NaN fails both comparisons, and an infinity one of them."""
    limit = _FP32_MAX
    for i in range(len(values)):
        x = values[i]
        if not -limit <= x <= limit:
            return False
    return True


def parse_infer_request(
    body: bytes, header_length: str | None, config: ModelConfig, max_batch_size: int
) -> InferRequest:
    """Parse and check one inference request against the model's declared inputs and outputs.

    Args:
        body: the whole request body.
        header_length: the Inference-Header-Content-Length header, if sent (binary data follows the JSON).
        config: the model's config, whose inputs and outputs the request must match.
        max_batch_size: the most rows the request may carry (unused for a model without a batch dimension,
            whose every input must have exactly its declared shape; such a request counts as one row).

    Raises:
        InvalidInput: naming what was wrong and what was expected.
    """
    key = None  # a JSON request's plan's
    if header_length is None:
        start = _data_start(body)
        end = body.find(b"]", start) if start >= 0 else -1  # where a flat list of values would end
        if end >= 0 and start + len(body) - end <= _PLAN_HEADER_BYTES:
            key = (body[:start], body[end:], id(config), max_batch_size)
            if (planned := _planned_json(body, start, end, key, config)) is not None:
                return planned
    elif (planned := _planned(body, header_length, config, max_batch_size)) is not None:
        return planned
    doc, binary = _split_body(body, header_length)
    request = check_infer_document(doc, binary, config, max_batch_size)
    if header_length is not None:
        _plan(body, int(header_length), doc, request, config, max_batch_size)
    elif key is not None:
        _plan_json(body, start, end, key, doc, request, config, max_batch_size)
    return request


class _Plan:
    """What a request's JSON says, checked (``check_infer_document``), apart from its tensors' values: where
    each input's values lie in the body and what they are, and the rest of the request. A client sends the
    same JSON again and again (the same inputs, shapes and outputs; only the values differ): a request whose
    JSON has been planned with its model's config is read from the plan, its values alone read and checked.

    A binary request's plan (``_plan``, ``_planned``) is keyed by its JSON header, and its inputs' bytes lie
    at fixed offsets in a body of ``size`` bytes. A JSON request's (``_plan_json``, ``_planned_json``) is keyed
    by the text before and after its one input's ``data`` values; ``inputs`` holds that input alone (its offset,
    where the values' text starts, and ``size`` are not used). (A plain class: protocol.pxd makes it an
    extension type when compiled.)"""

    __slots__ = ("binary_outputs", "config", "id", "inputs", "max_batch_size", "outputs", "response", "rows", "size",
                 "timeout_s")  # fmt: skip

    def __init__(
        self,
        config: ModelConfig,
        max_batch_size: int,
        request: InferRequest,
        inputs: list[tuple[str, np.dtype[Any], int, int, tuple[int, ...], str]],
        size: int,
    ) -> None:
        self.config, self.max_batch_size, self.inputs, self.size = config, max_batch_size, inputs, size
        self.id, self.rows, self.outputs, self.timeout_s = request.id, request.rows, request.outputs, request.timeout_s
        # Whether every output it asks for comes back as binary data, none as classes: the response's JSON header
        # is then the same for each answer of the same shapes, and is kept (``encode_infer_response``).
        self.binary_outputs = all([o.binary and not o.classification for o in request.outputs])
        self.response: tuple[str, str, Mapping[str, str], list[tuple[int, ...]], bytes] | None = None


_PLANS: dict[bytes, _Plan] = {}  # by the JSON header's bytes
_PLANS_KEPT = 256  # headers planned at once: clients that send a new id with each request start them again
_PLAN_HEADER_BYTES = 4096  # a longer header is parsed each time


def _plan(
    body: bytes,
    header_size: int,
    doc: dict[str, Any],
    request: InferRequest,
    config: ModelConfig,
    max_batch_size: int,
) -> None:
    """Remember a binary request's checked header, where every input came as binary data."""
    if header_size > _PLAN_HEADER_BYTES:
        return
    inputs = []
    offset = 0
    for tensor in doc["inputs"]:  # checked: each an object naming a distinct input
        size = (tensor.get("parameters") or _NO_PARAMETERS).get("binary_data_size")
        if size is None:  # its values are in the JSON: only a header whose inputs are all binary is planned
            return
        array = request.feeds[tensor["name"]]
        dtype = array.dtype
        inputs.append(
            (tensor["name"], dtype, size // dtype.itemsize, header_size + offset, array.shape, tensor["datatype"])
        )
        offset += size
    if len(_PLANS) >= _PLANS_KEPT:
        _PLANS.clear()
    _PLANS[body[:header_size]] = request.plan = _Plan(config, max_batch_size, request, inputs, len(body))


def _planned(body: bytes, header_length: str, config: ModelConfig, max_batch_size: int) -> InferRequest | None:
    """A binary request whose JSON header was planned for this model (``_plan``), read from the plan; None
    where there is no plan, or where its bytes fail a check (the request is then parsed, and refused, the
    usual way, which says why)."""
    if not (len(header_length) < 5 and header_length.isascii() and header_length.isdigit()):  # 4096 bytes at most
        return None
    plan = _PLANS.get(body[: int(header_length)])
    if plan is None or plan.config is not config or plan.max_batch_size != max_batch_size or plan.size != len(body):
        return None
    feeds = {}
    for name, dtype, count, offset, shape, datatype in plan.inputs:
        flat = _frombuffer(body, dtype, count, offset)
        if not _binary_values_ok(flat, datatype):
            return None
        feeds[name] = flat.reshape(shape)
    return InferRequest(plan.id, feeds, plan.rows, plan.outputs, plan.timeout_s, plan)


# By the text before the values and after them, the model's config (its identity: a plan holds it, so no other
# config can take its id while the plan is kept) and max batch size: two models may well be sent the same text.
_JSON_PLANS: dict[tuple[bytes, bytes, int, int], _Plan] = {}
_JSON_SEEN: dict[tuple[bytes, bytes, int, int], int] = {}  # those not planned: 1 seen once, 2 tried, not plannable
_DATA_KEY = b'"data"'


def _data_start(body: bytes) -> int:
    """Where the values of the body's first ``"data": [`` start (just past its bracket); -1 where there is none."""
    at = body.find(_DATA_KEY)
    while at >= 0:
        i = _past_space(body, at + 6)
        if i < len(body) and body[i] == 58:  # ':'
            i = _past_space(body, i + 1)
            if i < len(body) and body[i] == 91:  # '['
                return i + 1
        at = body.find(_DATA_KEY, at + 6)
    return -1


def _past_space(text: bytes, i: int) -> int:
    """The first index from ``i`` on that is not JSON's white space."""
    while i < len(text) and (text[i] == 32 or text[i] == 10 or text[i] == 13 or text[i] == 9):
        i += 1
    return i


def _plan_json(
    body: bytes,
    start: int,
    end: int,
    key: tuple[bytes, bytes, int, int],
    doc: dict[str, Any],
    request: InferRequest,
    config: ModelConfig,
    max_batch_size: int,
) -> None:
    """Remember a JSON request's checked text around its values (``body[start:end]``), under ``key``, the second
    time that text is seen (a client that sends a new id with each request would be planned for nothing): a
    request of one FP32 input whose ``data`` is a flat list, as clients send it. The plan is proved before it is
    kept: the same text with other values in their place must parse as the same request with those values, and
    the plan must read this request's values as they were read. A client whose numbers the plan's reading leaves
    to the general parser (too many digits, ``_fp32_text``) is not planned, nor tried again."""
    if (seen := _JSON_SEEN.get(key, 0)) != 1:
        if seen == 0:
            if len(_JSON_SEEN) >= _PLANS_KEPT:
                _JSON_SEEN.clear()
            _JSON_SEEN[key] = 1
        return
    _JSON_SEEN[key] = 2  # tried now, once
    if len(request.feeds) != 1:
        return
    tensor = doc["inputs"][0]  # checked: the one input, an object
    data = tensor.get("data")
    values = request.feeds[tensor["name"]]
    if tensor["datatype"] != "FP32" or type(data) is not list or len(data) != values.size or not values.size:
        return  # binary, nested or another datatype: parsed each time
    other = 2 if data != [2] * len(data) else 3
    try:
        proof = orjson.loads(key[0] + b",".join([b"%d" % other] * len(data)) + key[1])
    except orjson.JSONDecodeError:
        return
    if proof != {**doc, "inputs": [{**tensor, "data": [other] * len(data)}]}:
        return
    read = _empty(values.size, dtype=_FP32)
    if _fp32_text(body, start, read) != end or read.tobytes() != values.tobytes():
        return
    if len(_JSON_PLANS) >= _PLANS_KEPT:
        _JSON_PLANS.clear()
    inputs = [(tensor["name"], values.dtype, values.size, start, values.shape, "FP32")]
    _JSON_PLANS[key] = request.plan = _Plan(config, max_batch_size, request, inputs, -1)


def _planned_json(
    body: bytes, start: int, end: int, key: tuple[bytes, bytes, int, int], config: ModelConfig
) -> InferRequest | None:
    """A JSON request whose text around its values (``body[start:end]``) was planned for this model
    (``_plan_json``, under ``key``), its values read from the text; None where there is no plan, or where the
    values are not a flat list of as many numbers of the kind the plan reads (the request is then parsed the
    usual way, which refuses what is wrong)."""
    plan = _JSON_PLANS.get(key)
    if plan is None or plan.config is not config:
        return None
    name, dtype, count, offset, shape, datatype = plan.inputs[0]
    values = _empty(count, dtype=_FP32)
    if _fp32_text(body, start, values) != end:
        return None
    return InferRequest(plan.id, {name: values.reshape(shape)}, plan.rows, plan.outputs, plan.timeout_s, plan)


_EXACT_MANTISSA = 2**53  # digits up to this are exact as a double
_MOST_DIGITS = 922_337_203_685_477_579  # a mantissa at most this, times 10 plus a digit, fits in 63 bits
_NEAR = 2.0**-45  # relative: how close to a rounded value every number it may stand for lies (see _fp32_text)


def _fp32_text(text: bytes, start: int, values: np.ndarray) -> int:
    """Read a JSON array's numbers from ``text[start:]`` into ``values`` (FP32), up to its closing bracket;
    where that bracket is, or -1 where the text is not a list of exactly ``len(values)`` JSON numbers, each
    within FP32's range, that this reading takes (compiled: a C loop over the bytes). Each value is stored as
    ``_fp32_flat`` stores the double a correctly rounded parser (orjson, Python's float) reads from the text:
    the FP32 nearest to that double.

    A number whose digits (without the decimal point) make an integer below 9.2 * 10**18 (18 digits at least)
    and whose power of ten is within 44 is read as that integer scaled by the power. Where the digits fit in
    2**53 and the power is within 22, both are exact as doubles and the one multiplication or division rounds
    once: the double is the parser's.
    Otherwise the double read is within 4 units in its last place of the parser's (each of at most three
    operations rounds once), and it is stored only where every value within ``_NEAR`` of it, far wider, rounds
    to the same FP32, and lies within FP32's range: the parser's double then stores as the same FP32. The rest
    (more digits, a power past 44, a value that near a tie between two FP32s) is left to the parser: -1. As
    orjson reads them, ``-0`` is the integer 0 and ``-0.0`` is negative zero."""
    n = len(values)
    length = len(text)
    limit = _FP32_MAX
    exact_mantissa = _EXACT_MANTISSA
    most = _MOST_DIGITS
    near = _NEAR
    i = start
    k = 0
    while True:  # at a number, after the bracket or a comma
        i = _past_space(text, i)
        if i >= length:
            return -1
        negative = text[i] == 45  # '-'
        if negative:
            i += 1
        if i >= length:
            return -1
        mantissa = 0
        exponent = 0
        integral = True
        if text[i] == 48:  # '0': no more digits before the point
            i += 1
        elif 49 <= text[i] <= 57:
            while i < length and 48 <= text[i] <= 57:
                if mantissa > most:
                    return -1
                mantissa = mantissa * 10 + (text[i] - 48)
                i += 1
        else:
            return -1
        if i < length and text[i] == 46:  # '.'
            integral = False
            i += 1
            if not (i < length and 48 <= text[i] <= 57):
                return -1
            while i < length and 48 <= text[i] <= 57:
                if mantissa > most:
                    return -1
                mantissa = mantissa * 10 + (text[i] - 48)
                exponent -= 1
                i += 1
        if i < length and (text[i] == 101 or text[i] == 69):  # 'e', 'E'
            integral = False
            i += 1
            sign = 1
            if i < length and (text[i] == 43 or text[i] == 45):  # '+', '-'
                sign = 1 if text[i] == 43 else -1
                i += 1
            if not (i < length and 48 <= text[i] <= 57):
                return -1
            power = 0
            while i < length and 48 <= text[i] <= 57:
                if power < 1000:
                    power = power * 10 + (text[i] - 48)
                i += 1
            exponent += sign * power
        if mantissa == 0:
            x = 0.0
        else:
            if not -44 <= exponent <= 44:
                return -1
            # the power of ten as two exact doubles: every power up to 1e22 is one
            first = 1.0
            for _j in range(min(exponent if exponent > 0 else -exponent, 22)):
                first *= 10.0
            second = 1.0
            for _j in range((exponent if exponent > 0 else -exponent) - 22):
                second *= 10.0
            x = mantissa * first * second if exponent >= 0 else mantissa / first / second
            if mantissa > exact_mantissa or second != 1.0:  # rounded more than once
                if x * (1.0 + near) > limit:
                    return -1
                values[k] = x * (1.0 - near)
                low = values[k]
                values[k] = x * (1.0 + near)
                if values[k] != low:
                    return -1
        if negative and not (integral and mantissa == 0):
            x = -x
        if not -limit <= x <= limit:
            return -1
        values[k] = x
        k += 1
        i = _past_space(text, i)
        if i < length and text[i] == 44 and k < n:  # ','
            i += 1
        elif i < length and text[i] == 93 and k == n:  # ']'
            return i
        else:
            return -1


def check_infer_document(doc: Any, binary: memoryview, config: ModelConfig, max_batch_size: int) -> InferRequest:
    """Check one inference request, as a JSON document (``doc``) and the binary tensors after it, against the
    model: what ``parse_infer_request`` does once the body is parsed, and what the gRPC service does with a
    request it has put in that form (``service.grpc_service``), so both protocols check alike and say alike."""
    # Each object is named again once it is known to be a dict: compiled, the new name is typed as one
    # (protocol.pxd), and its lookups are C calls rather than method calls.
    if not isinstance(doc, dict):
        raise InvalidInput(f"the request is a JSON {type(doc).__name__}; expected an object with 'inputs'")
    document = doc
    request_id = document.get("id")
    if not (request_id is None or isinstance(request_id, str)):
        raise InvalidInput(f"'id' is {_short(request_id)}; expected a string")
    parameters = document.get("parameters") or _NO_PARAMETERS
    if not isinstance(parameters, dict):
        raise InvalidInput(f"'parameters' is {_short(parameters)}; expected an object")

    inputs = document.get("inputs")
    if not (isinstance(inputs, list) and len(inputs) > 0):
        raise InvalidInput(
            f"'inputs' is {'missing' if inputs is None else _short(inputs)}; expected a list of tensors: "
            + ", ".join([s.text for s in config.inputs])
        )
    specs = config.input_specs
    batched = config.max_batch_size > 0  # config.batched, without a call of its property's Python code
    feeds: dict[str, np.ndarray] = {}
    rows = 0
    offset = 0
    for tensor in inputs:
        if not isinstance(tensor, dict):
            raise InvalidInput(f"an input is {_short(tensor)}; expected an object with name, shape, datatype")
        fields = tensor
        name = fields.get("name")
        for key in ("name", "shape", "datatype"):
            if key not in fields:
                which = _short(name) if name is not None else f"#{len(feeds) + 1}"
                raise InvalidInput(f"input {which} has no '{key}'")
        spec = specs.get(name) if isinstance(name, str) else None
        if spec is None:
            expected = ", ".join([s.text for s in config.inputs])
            raise InvalidInput(f"model {config.name} has no input {_short(name)}; expected {expected}")
        name = spec.name
        if name in feeds:
            raise InvalidInput(f"input '{name}' is given twice")
        if fields["datatype"] != spec.datatype:
            raise InvalidInput(f"input '{name}' has datatype {_short(fields['datatype'])}; expected {spec.datatype}")
        shape = _check_shape(name, fields["shape"], spec, max_batch_size, batched)
        tensor_parameters = fields.get("parameters") or _NO_PARAMETERS
        if not isinstance(tensor_parameters, dict):
            raise InvalidInput(f"input '{name}' parameters must be an object")
        size = tensor_parameters.get("binary_data_size")
        if size is not None:
            if "data" in fields:
                raise InvalidInput(f"input '{name}' has both 'data' and binary_data_size; send one")
            feeds[name] = _from_binary(name, size, binary, offset, shape, spec.datatype)
            offset += size
        else:
            if "data" not in fields:
                raise InvalidInput(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
            feeds[name] = _from_json(name, fields["data"], shape, spec.datatype)
        if not batched:
            rows = 1  # the request is one run of the model, and counts as one
        elif rows not in (0, shape[0]):
            raise InvalidInput(f"input '{name}' has {shape[0]} rows but another input has {rows}; expected equal")
        else:
            rows = shape[0]
    if len(feeds) != len(specs):  # every name in feeds is one of the specs', given once
        missing = [s for s in config.inputs if s.name not in feeds]
        raise InvalidInput("missing input " + ", ".join([s.text for s in missing]))
    if offset != len(binary):
        raise InvalidInput(
            f"{len(binary) - offset} bytes follow the binary tensors; binary_data_size of the inputs sums to {offset}"
        )
    return InferRequest(request_id, feeds, rows, _requested_outputs(document, parameters, config), _timeout(parameters))


def _requested_outputs(doc: dict[str, Any], parameters: dict[str, Any], config: ModelConfig) -> list[RequestedOutput]:
    binary_default = parameters.get("binary_data_output", False)
    if type(binary_default) is not bool:
        raise InvalidInput(f"binary_data_output is {_short(binary_default)}; expected true or false")
    requested = doc.get("outputs")
    if requested is None:
        return _every_output(config, binary_default)
    specs = config.output_specs
    if not isinstance(requested, list):
        raise InvalidInput(f"'outputs' is {_short(requested)}; expected a list of {{'name': ...}}")
    outputs = []
    for output in requested:
        name = output.get("name") if isinstance(output, dict) else None
        if not (isinstance(name, str) and name in specs):
            raise InvalidInput(
                f"model {config.name} has no output {_short(name)}; expected one of " + ", ".join(sorted(specs))
            )
        output_parameters = output.get("parameters") or {}
        if not isinstance(output_parameters, dict):
            raise InvalidInput(f"output '{name}' parameters must be an object")
        binary = output_parameters.get("binary_data", binary_default)
        if type(binary) is not bool:
            raise InvalidInput(f"output '{name}' binary_data is {_short(binary)}; expected true or false")
        outputs.append(RequestedOutput(str(name), binary, _classification(output_parameters, specs[name])))
    return outputs


def _every_output(config: ModelConfig, binary: bool) -> list[RequestedOutput]:
    """Each of the model's outputs, as a request that names none asks for them: made once per model and
    encoding, and shared by its requests (none changes what it was asked for)."""
    key = (id(config), binary)
    kept = _EVERY_OUTPUT.get(key)
    if kept is None or kept[0] is not config:
        if len(_EVERY_OUTPUT) >= _EVERY_OUTPUT_KEPT:  # models reloaded many times over: start again
            _EVERY_OUTPUT.clear()
        kept = _EVERY_OUTPUT[key] = (config, [RequestedOutput(s.name, binary) for s in config.outputs])
    return kept[1]


# By the id of a model's config and binary_data_output: the config (so that an id reused by another is told
# apart) and the outputs a request that names none asks for.
_EVERY_OUTPUT: dict[tuple[int, bool], tuple[ModelConfig, list[RequestedOutput]]] = {}
_EVERY_OUTPUT_KEPT = 256


def _classification(parameters: dict[str, Any], spec: TensorSpec) -> int:
    k = parameters.get("classification")
    if k is None:
        return 0
    if len(spec.shape) != 2:
        raise InvalidInput(
            f"output '{spec.name}' has shape {spec.shape}; classification needs a 2-D output of scores, "
            "(rows, classes), such as [-1, 10]"
        )
    classes = spec.shape[-1]
    if not (type(k) is int and 1 <= k <= classes):
        raise InvalidInput(
            f"output '{spec.name}' classification is {_short(k)}; expected a count of classes, 1..{classes}"
        )
    return k


def _timeout(parameters: dict[str, Any]) -> float | None:
    timeout = parameters.get("timeout")
    if timeout is None:
        return None
    if not (type(timeout) is int and timeout > 0):
        raise InvalidInput(f"'timeout' is {_short(timeout)}; expected a positive number of microseconds")
    return float(timeout) / 1e6


def top_classes(array: np.ndarray, k: int, labels: Sequence[str]) -> list[str]:
    """Triton's classification strings, row by row, best first: "<score>:<index>[:<label>]"."""
    best = np.argsort(-array, axis=1, kind="stable")[:, :k]
    named = len(labels) == array.shape[1]
    return [
        f"{array[row, i]}:{i}:{labels[i]}" if named else f"{array[row, i]}:{i}"
        for row in range(array.shape[0])
        for i in best[row]
    ]


def bytes_tensor(strings: list[str]) -> bytes:
    """The binary form of a BYTES tensor: each element as a 4-byte little-endian length, then its bytes."""
    encoded = [s.encode() for s in strings]
    return b"".join(struct.pack("<I", len(e)) + e for e in encoded)


def encode_infer_response(
    model: str,
    version: str,
    request: InferRequest,
    outputs: Mapping[str, np.ndarray],
    datatypes: Mapping[str, str],
    labels: Sequence[str] = (),
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary tensors follow it (else None)."""
    plan = request.plan
    if plan is not None and plan.binary_outputs:
        return _binary_response(model, version, plan, outputs, datatypes)
    tensors = []
    blobs = []
    for requested in request.outputs:
        array = outputs[requested.name]
        tensor: dict[str, Any] = {
            "name": requested.name,
            "datatype": datatypes[requested.name],
            "shape": list(array.shape),
        }
        if requested.classification:
            classes = top_classes(array, requested.classification, labels)
            tensor["datatype"] = "BYTES"
            tensor["shape"] = [array.shape[0], requested.classification]
            if requested.binary:
                blob = bytes_tensor(classes)
                tensor["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                tensor["data"] = classes
        elif requested.binary:
            blob = np.ascontiguousarray(array).tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = array.ravel()
        tensors.append(tensor)
    response: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": tensors}
    if request.id is not None:
        response["id"] = request.id
    header = orjson.dumps(response, option=_JSON_OPTIONS)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _binary_response(
    model: str, version: str, plan: _Plan, outputs: Mapping[str, np.ndarray], datatypes: Mapping[str, str]
) -> tuple[bytes, int | None]:
    """``encode_infer_response`` for a planned request whose every output comes back as binary data: its JSON
    header made once for the plan and the outputs' shapes (the same for each answer of as many rows)."""
    arrays = [outputs[requested.name] for requested in plan.outputs]
    shapes = [array.shape for array in arrays]
    kept = plan.response
    if kept is None or not (kept[0] == model and kept[1] == version and kept[2] is datatypes and kept[3] == shapes):
        tensors = [
            {
                "name": requested.name,
                "datatype": datatypes[requested.name],
                "shape": list(array.shape),
                "parameters": {"binary_data_size": array.nbytes},
            }
            for requested, array in zip(plan.outputs, arrays, strict=True)
        ]
        response: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": tensors}
        if plan.id is not None:
            response["id"] = plan.id
        kept = plan.response = (model, version, datatypes, shapes, orjson.dumps(response, option=_JSON_OPTIONS))
    header = kept[4]
    return b"".join([header, *[np.ascontiguousarray(array).tobytes() for array in arrays]]), len(header)


# Documentation only: the same format as pydantic schemas, for the OpenAPI page.


class TensorSchema(BaseModel):
    name: str
    datatype: str = Field(examples=["FP32"])
    shape: list[int] = Field(examples=[[1, 1, 8, 8]])
    data: list[Any] | None = Field(default=None, description="flat or nested; absent when sent as binary data")
    parameters: dict[str, Any] | None = Field(default=None, description="binary_data_size: bytes after the header")


class RequestedOutputSchema(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(
        default=None, description="binary_data: return this output as bytes; classification: the top k classes"
    )


class InferenceRequestSchema(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None, description="binary_data_output: all outputs as bytes; timeout: deadline in microseconds"
    )
    inputs: list[TensorSchema]
    outputs: list[RequestedOutputSchema] | None = None


class InferenceResponseSchema(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[TensorSchema]
