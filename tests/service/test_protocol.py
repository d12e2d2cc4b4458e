"""The wire protocol's parser, in-process: every malformed request it refuses, with what was expected.

The same requests over HTTP (the status, the JSON body, the failure metric, the server serving on) are
in test_bad_input.py, for what only the wire can show and a few of these.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from repository import ModelConfig, TensorSpec
from service import protocol
from service.errors import InvalidInput
from service.protocol import parse_infer_request
from tests.service.conftest import AFFINE_CONFIG, infer_json
from tests.service.malformed import GOOD_X, PARSE_CASES, Req

# The test repository's two models, as their config.json declares them.
CONFIGS = {
    "affine": AFFINE_CONFIG,
    "tiny-cnn-bn": ModelConfig(
        name="tiny-cnn-bn",
        max_batch_size=8,
        inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 1, 8, 8])],
        outputs=[TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])],
    ),
}
MAX_BATCH_SIZE = 8


def parse(request_: Req) -> Any:
    config = CONFIGS[request_.model]
    return parse_infer_request(request_.raw, request_.header_length, config, MAX_BATCH_SIZE)


@pytest.mark.parametrize(
    ("request_", "status", "fragments"), [pytest.param(*c[1:4], id=c[0], marks=c[4:]) for c in PARSE_CASES]
)
def test_a_malformed_request_is_refused_naming_what_was_expected(
    request_: Req, status: int, fragments: list[str]
) -> None:
    with pytest.raises(InvalidInput) as refused:
        parse(request_)
    assert refused.value.status == status == 400
    for fragment in fragments:
        assert fragment in refused.value.message
    assert "Traceback" not in refused.value.message


def test_the_good_request_beside_them_parses_to_its_own_rows() -> None:
    parsed = parse(Req(infer_json("x", GOOD_X)))
    assert parsed.rows == 2
    np.testing.assert_array_equal(parsed.feeds["x"], GOOD_X)


# A model without a batch dimension, and one of BOOL and FP16 inputs.
FIXED = ModelConfig(
    name="fixed",
    max_batch_size=0,
    inputs=[TensorSpec(name="x", datatype="FP32", shape=[3, 4]), TensorSpec(name="n", datatype="INT64", shape=[3])],
    outputs=[TensorSpec(name="y", datatype="FP32", shape=[3, 2]), TensorSpec(name="s", datatype="FP32", shape=[3])],
)
FLAGS = ModelConfig(
    name="flags",
    max_batch_size=4,
    inputs=[TensorSpec(name="b", datatype="BOOL", shape=[-1, 2]), TensorSpec(name="h", datatype="FP16", shape=[-1, 2])],
    outputs=[TensorSpec(name="y", datatype="FP16", shape=[-1, 2])],
)


def fixed_request(x_shape: list[int]) -> bytes:
    x = np.zeros(x_shape, np.float32)
    return orjson.dumps({"inputs": [*infer_json("x", x)["inputs"], *infer_json("n", np.arange(3), "INT64")["inputs"]]})


def test_a_request_to_a_model_without_a_batch_dimension_is_one_row_of_exactly_its_shape() -> None:
    parsed = parse_infer_request(fixed_request([3, 4]), None, FIXED, 0)
    assert parsed.rows == 1 and parsed.feeds["x"].shape == (3, 4) and parsed.feeds["n"].dtype == np.int64
    for shape in ([1, 3, 4], [2, 4], [3, 4, 1]):
        with pytest.raises(InvalidInput) as refused:
            parse_infer_request(fixed_request(shape), None, FIXED, 0)
        assert f"input 'x' has shape {shape}; expected exactly [3, 4]" in refused.value.message
        assert "no batch dimension" in refused.value.message


def binary_request(tensors: dict[str, tuple[str, np.ndarray]]) -> tuple[bytes, str]:
    header = orjson.dumps(
        {
            "inputs": [
                {"name": n, "datatype": d, "shape": list(x.shape), "parameters": {"binary_data_size": x.nbytes}}
                for n, (d, x) in tensors.items()
            ]
        }
    )
    return header + b"".join(x.tobytes() for _, x in tensors.values()), str(len(header))


def test_bool_and_fp16_binary_data_are_read_and_checked() -> None:
    flags = np.array([[True, False], [False, True]])
    halves = np.array([[0.5, -2], [1e4, 3]], np.float16)
    parsed = parse_infer_request(*binary_request({"b": ("BOOL", flags), "h": ("FP16", halves)}), FLAGS, 4)
    np.testing.assert_array_equal(parsed.feeds["b"], flags)
    np.testing.assert_array_equal(parsed.feeds["h"], halves)
    not_a_bool = np.array([[1, 0], [7, 1]], np.uint8).view(np.bool_)
    with pytest.raises(InvalidInput, match=r"input 'b' holds byte 7 at flat index 2; a BOOL element is one byte"):
        parse_infer_request(*binary_request({"b": ("BOOL", not_a_bool), "h": ("FP16", halves)}), FLAGS, 4)
    overflowed = np.array([[0.5, np.inf], [1, 2]], np.float16)
    with pytest.raises(InvalidInput, match=r"input 'h' holds 1 NaN or Infinity value\(s\), the first at flat index 1"):
        parse_infer_request(*binary_request({"b": ("BOOL", flags), "h": ("FP16", overflowed)}), FLAGS, 4)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [([1, 0, 0, 1], "holds int64 values; expected BOOL"), ([True, False, 1.5, True], "expected BOOL")],
)
def test_bool_in_json_is_true_and_false_only(data: list[Any], fragment: str) -> None:
    body = {
        "inputs": [
            {"name": "b", "datatype": "BOOL", "shape": [2, 2], "data": data},
            infer_json("h", np.ones((2, 2)), "FP16")["inputs"][0],
        ]
    }
    with pytest.raises(InvalidInput) as refused:
        parse_infer_request(orjson.dumps(body), None, FLAGS, 4)
    assert fragment in refused.value.message


def test_classification_needs_a_2d_output() -> None:
    body = orjson.loads(fixed_request([3, 4]))
    for output, ok in (("y", True), ("s", False)):
        request = orjson.dumps(body | {"outputs": [{"name": output, "parameters": {"classification": 1}}]})
        if ok:
            assert parse_infer_request(request, None, FIXED, 0).outputs[0].classification == 1
            continue
        with pytest.raises(InvalidInput) as refused:
            parse_infer_request(request, None, FIXED, 0)
        assert "output 's' has shape [3]; classification needs a 2-D output of scores" in refused.value.message


@pytest.mark.parametrize(
    ("values", "refused"),
    [
        ([0.5, -0.0, 1e-45, 3.4028235e38, -3.4028235e38], None),  # a subnormal, FP32's largest magnitudes
        ([0.5, float("nan"), 1.0, float("inf"), 2.0], "holds 2 NaN or Infinity value(s), the first at flat index 1"),
        ([0.5, 1.0, 1.5, 2.0, float("-inf")], "holds 1 NaN or Infinity value(s), the first at flat index 4"),
    ],
)
def test_binary_fp32_data_is_refused_where_a_value_is_not_finite(values: list[float], refused: str | None) -> None:
    # FP32 binary data is checked by a loop of its own (service.protocol._fp32_finite); other types by numpy.
    config = ModelConfig(
        name="m",
        max_batch_size=8,
        inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, len(values)])],
        outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1, 1])],
    )
    array = np.array([values], np.float32)
    body, header_length = binary_request({"x": ("FP32", array)})
    if refused is None:
        assert parse_infer_request(body, header_length, config, 8).feeds["x"].tobytes() == array.tobytes()
        return
    with pytest.raises(InvalidInput) as error:
        parse_infer_request(body, header_length, config, 8)
    assert f"input 'x' {refused}" in error.value.message


@pytest.mark.parametrize(
    "values",
    [
        [0.5, -0.0, 1e-45, 3.0e38, -3.4028234e38],  # a subnormal, FP32's edges
        [1, -7, 2**60, True, False, 0.1],  # ints and JSON's true and false are numbers too
        [1.0000000596046448, 16777217.0],  # rounded to the nearest FP32, as numpy rounds
    ],
)
def test_fp32_data_sent_flat_reads_as_the_same_data_sent_nested(values: list[Any]) -> None:
    # Flat FP32 data takes a faster way (service.protocol._fp32_flat) than nested data: the same numbers.
    config = ModelConfig(
        name="m",
        max_batch_size=8,
        inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, len(values)])],
        outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1, 1])],
    )
    docs = [
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, len(values)], "data": d}]}
        for d in (values, [values])
    ]
    flat, nested = (parse_infer_request(orjson.dumps(d), None, config, 8).feeds["x"] for d in docs)
    assert flat.dtype == nested.dtype == np.float32 and flat.shape == nested.shape == (1, len(values))
    assert flat.tobytes() == nested.tobytes()


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ([1.0, 3.5e38], "outside FP32's range"),
        ([1.0, -1e300], "outside FP32's range"),
        ([1.0, "2"], "holds strings"),
        ([1.0, "1.5"], "holds strings"),  # a string numpy would read as a number: refused, compiled or not
        ([1.0, None], "holds nulls"),
        ([1.0, 2.0, 3.0], "its shape [1, 2] needs 2"),
    ],
)
def test_flat_fp32_data_the_faster_way_does_not_take_is_refused_as_before(data: list[Any], fragment: str) -> None:
    config = ModelConfig(
        name="m",
        max_batch_size=8,
        inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 2])],
        outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1, 1])],
    )
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": data}]}
    with pytest.raises(InvalidInput) as refused:
        parse_infer_request(orjson.dumps(doc), None, config, 8)
    assert fragment in refused.value.message


# A model of three binary inputs of different types, for a header sent again and again.
MIXED = ModelConfig(
    name="mixed",
    max_batch_size=4,
    inputs=[
        TensorSpec(name="x", datatype="FP32", shape=[-1, 4]),
        TensorSpec(name="n", datatype="INT64", shape=[-1, 2]),
        TensorSpec(name="b", datatype="BOOL", shape=[-1, 3]),
    ],
    outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1, 1])],
)


def mixed_request(seed: int, **replaced: np.ndarray) -> tuple[dict[str, np.ndarray], bytes, str]:
    rng = np.random.default_rng(seed)
    arrays = {
        "x": rng.standard_normal((2, 4)).astype(np.float32),
        "n": rng.integers(-(2**40), 2**40, (2, 2)),
        "b": rng.random((2, 3)) > 0.5,
    } | replaced
    types = {"x": "FP32", "n": "INT64", "b": "BOOL"}
    body, header_length = binary_request({name: (types[name], array) for name, array in arrays.items()})
    return arrays, body, header_length


def test_a_binary_header_sent_again_gives_each_request_its_own_values_checked_as_the_first() -> None:
    # The same JSON header with other bytes after it: what the header says is checked once and remembered
    # (service.protocol._plan), what the bytes hold is read and checked for each request.
    for seed in range(4):
        arrays, body, header_length = mixed_request(seed)
        parsed = parse_infer_request(body, header_length, MIXED, 4)
        assert parsed.rows == 2 and [o.name for o in parsed.outputs] == ["y"]
        for name, array in arrays.items():
            assert parsed.feeds[name].dtype == array.dtype and parsed.feeds[name].shape == array.shape
            np.testing.assert_array_equal(parsed.feeds[name], array)

    x = np.array([[1, 2, np.nan, 3], [4, 5, 6, 7]], np.float32)
    _, body, header_length = mixed_request(9, x=x)
    with pytest.raises(InvalidInput, match=r"input 'x' holds 1 NaN or Infinity value\(s\), the first at flat index 2"):
        parse_infer_request(body, header_length, MIXED, 4)
    not_a_bool = np.array([[1, 0, 1], [0, 5, 1]], np.uint8).view(np.bool_)
    _, body, header_length = mixed_request(9, b=not_a_bool)
    with pytest.raises(InvalidInput, match=r"input 'b' holds byte 5 at flat index 4"):
        parse_infer_request(body, header_length, MIXED, 4)
    _, body, header_length = mixed_request(9)
    with pytest.raises(InvalidInput, match=r"1 bytes follow the binary tensors"):
        parse_infer_request(body + b"\0", header_length, MIXED, 4)
    with pytest.raises(
        InvalidInput, match=r"input 'b' needs bytes 64..70 of the binary data after the JSON header, but only 69"
    ):
        parse_infer_request(body[:-1], header_length, MIXED, 4)
    # the same header to a model that takes fewer rows, or the same model with a smaller max batch size
    smaller = ModelConfig(name="smaller", max_batch_size=1, inputs=MIXED.inputs, outputs=MIXED.outputs)
    for config, max_batch_size in ((smaller, 1), (MIXED, 1)):
        with pytest.raises(InvalidInput, match=r"input 'x' has 2 rows, more than this model's max batch size of 1"):
            parse_infer_request(body, header_length, config, max_batch_size)
    assert parse_infer_request(body, header_length, MIXED, 4).rows == 2


def test_binary_requests_each_with_an_id_of_its_own_are_read_as_their_own() -> None:
    # Clients that send a new id with each request send a new header each time: each is read as its own, and
    # the headers remembered stay bounded.
    x = np.ones((1, 1, 8, 8), np.float32)
    config = CONFIGS["tiny-cnn-bn"]
    for i in range(3 * protocol._PLANS_KEPT):
        header = orjson.dumps(
            {
                "id": f"r{i}",
                "inputs": [
                    {
                        "name": "input",
                        "datatype": "FP32",
                        "shape": [1, 1, 8, 8],
                        "parameters": {"binary_data_size": x.nbytes},
                    }
                ],
            }  # fmt: skip
        )
        parsed = parse_infer_request(header + (x * i).tobytes(), str(len(header)), config, 8)
        assert parsed.id == f"r{i}" and parsed.feeds["input"][0, 0, 0, 0] == i
    assert len(protocol._PLANS) <= protocol._PLANS_KEPT


def test_a_planned_binary_answer_is_the_one_its_request_read_afresh_gets() -> None:
    # A planned request's binary response header is made once per shape and kept (service.protocol._plan): each
    # answer must still be what the request, read without a plan, is answered with.
    config, rng = CONFIGS["tiny-cnn-bn"], np.random.default_rng(0)
    for rows, version in ((1, "1"), (1, "1"), (3, "1"), (1, "1"), (1, "2")):
        header = orjson.dumps(
            {
                "id": "a",
                "inputs": [
                    {
                        "name": "input",
                        "datatype": "FP32",
                        "shape": [rows, 1, 8, 8],
                        "parameters": {"binary_data_size": rows * 256},
                    }
                ],  # fmt: skip
                "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
            }
        )
        body = header + np.ones((rows, 1, 8, 8), np.float32).tobytes()
        planned = parse_infer_request(body, str(len(header)), config, 8)
        afresh = protocol.check_infer_document(orjson.loads(header), memoryview(body)[len(header) :], config, 8)
        logits = {"logits": rng.standard_normal((rows, 10)).astype(np.float32)}
        answer = protocol.encode_infer_response("tiny-cnn-bn", version, planned, logits, {"logits": "FP32"})
        assert answer == protocol.encode_infer_response("tiny-cnn-bn", version, afresh, logits, {"logits": "FP32"})
        response, header_length = answer
        assert orjson.loads(response[:header_length])["outputs"][0]["shape"] == [rows, 10]
        assert response[header_length:] == logits["logits"].tobytes()


def json_request(values: list[str], rows: int = 1, before: str = "", after: str = "", separator: str = ",") -> bytes:
    """A JSON request to tiny-cnn-bn whose data is written as the client wrote ``values``, text and all."""
    tensor = f'{{"name":"input","datatype":"FP32","shape":[{rows},1,8,8],"data":[{separator.join(values)}]}}'
    return f'{{{before}"inputs":[{tensor}]{after}}}'.encode()


def read_afresh(body: bytes, config: ModelConfig = CONFIGS["tiny-cnn-bn"]) -> protocol.InferRequest:
    return protocol.check_infer_document(orjson.loads(body), memoryview(b""), config, MAX_BATCH_SIZE)


# How clients write FP32 values: short decimals, Python's repr of an FP32 read as a double (17 digits),
# exponents, integers, the two zeros, and numbers near a tie between two FP32s.
NUMBER_FORMS = [
    lambda v: f"{v:.4f}",
    lambda v: repr(float(np.float32(v))),
    lambda v: f"{v:.6e}",
    lambda v: f"{v * 1e-30:.17g}",
    lambda v: str(int(v * 1000)),
    lambda v: "-0" if v > 0 else "-0.0",
    lambda v: f"{(float(np.float32(v)) + float(np.nextafter(np.float32(v), np.float32(9)))) / 2:.17g}",
]


def test_json_requests_sent_again_are_each_read_as_the_general_parser_reads_them() -> None:
    # The same JSON text around other values (service.protocol._plan_json): after the first two, the values alone
    # are read from the text (_fp32_text), and must be bit for bit what orjson and the general checks make of them.
    rng = np.random.default_rng(0)
    config = CONFIGS["tiny-cnn-bn"]
    read_from_plan = 0
    for form in NUMBER_FORMS:
        for separator in (",", ", ", " ,\n "):
            for _ in range(4):
                body = json_request([form(v) for v in rng.uniform(-3, 3, 64)], separator=separator)
                parsed = parse_infer_request(body, None, config, MAX_BATCH_SIZE)
                afresh = read_afresh(body)
                assert parsed.feeds["input"].shape == (1, 1, 8, 8) and parsed.rows == 1
                assert parsed.feeds["input"].tobytes() == afresh.feeds["input"].tobytes(), body
                read_from_plan += parsed.plan is not None
    assert read_from_plan >= 2 * len(NUMBER_FORMS) * 3  # each text planned from its second request on


def random_number_text(rng: np.random.Generator) -> str:
    """A JSON number as some client may write it, many of them next to a tie between two FP32s."""
    kind = rng.integers(7)
    if kind == 0:  # an FP32, its neighbour, or the double halfway between, to 15-18 digits
        low = np.frombuffer(np.uint32(rng.integers(0x7F7FFFFF)).tobytes(), np.float32)[0]
        high = np.nextafter(low, np.float32(np.inf))
        value = [float(low), float(high), (float(low) + float(high)) / 2][rng.integers(3)]
        return f"{value:.{rng.integers(15, 19)}g}"
    if kind == 1:
        return f"{rng.uniform(-1, 1) * 10.0 ** rng.integers(-50, 41):.{rng.integers(0, 19)}e}"
    if kind == 2:
        return str(int(rng.integers(-(10**18), 10**18)))
    if kind == 3:
        return f"{rng.uniform(-100, 100):.{rng.integers(0, 21)}f}"
    if kind == 4:  # around FP32's largest value
        return repr(float(np.finfo(np.float32).max) * (1 + float(rng.choice([0, 1e-9, -1e-9, 2**-25, 2**-24]))))
    if kind == 5:
        return repr(float(np.float32(rng.uniform(-10, 10))))
    return ["-0", "-0.0", "0e7", "-0E-3", "1E+2", "5e-324", "1e-45", "123456789012345678"][rng.integers(8)]


def test_a_planned_request_s_numbers_are_read_bit_for_bit_as_the_general_parser_reads_them() -> None:
    # What the plan's reading takes (service.protocol._fp32_text) it must store as orjson's double stored as FP32
    # (_fp32_flat); what it cannot be sure of it leaves to them (-1). Most of these it takes.
    rng, limit = np.random.default_rng(7), float(np.finfo(np.float32).max)
    taken = 0
    for _ in range(20_000):
        text = "[" + random_number_text(rng) + "]"
        read = np.zeros(1, np.float32)
        end = protocol._fp32_text(text.encode(), 1, read)
        if end < 0:
            continue
        taken += 1
        (value,) = orjson.loads(text)
        assert end == len(text) - 1 and -limit <= value <= limit, text
        assert read.tobytes() == np.float32(float(value)).tobytes(), (text, read[0], value)
    assert taken > 12_000


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("NaN", "is not valid JSON"),
        ("1e400", "is not valid JSON"),
        ("3.5e38", "outside FP32's range"),
        ('"1.5"', "holds strings"),
        ("null", "holds nulls"),
        ("01", "is not valid JSON"),
        ("1.", "is not valid JSON"),
        ("[1]", "is not a rectangular array"),
    ],
)
def test_a_planned_json_request_with_a_value_the_plan_cannot_read_is_refused_as_before(
    value: str, fragment: str
) -> None:
    config = CONFIGS["tiny-cnn-bn"]
    good = ["0.5"] * 64
    for _ in range(3):  # planned the second time its text is seen
        planned = parse_infer_request(json_request(good), None, config, MAX_BATCH_SIZE)
    assert planned.plan is not None
    with pytest.raises(InvalidInput) as refused:
        parse_infer_request(json_request([*good[:63], value]), None, config, MAX_BATCH_SIZE)
    assert fragment in refused.value.message
    with pytest.raises(InvalidInput, match=r"input 'input' has 63 values; its shape \[1, 1, 8, 8\] needs 64"):
        parse_infer_request(json_request(good[:63]), None, config, MAX_BATCH_SIZE)
    with pytest.raises(InvalidInput, match=r"input 'input' has 65 values; its shape \[1, 1, 8, 8\] needs 64"):
        parse_infer_request(json_request([*good, "1"]), None, config, MAX_BATCH_SIZE)


def test_a_data_key_that_is_not_the_input_s_values_is_never_read_as_them() -> None:
    # The first '"data": [' of the text is where a plan reads the values: text where it is something else (a
    # parameter, an input named data) is proved not to be planned, and is read the general way every time.
    decoy = ModelConfig(
        name="decoy",
        max_batch_size=8,
        inputs=[TensorSpec(name="data", datatype="FP32", shape=[-1, 2])],
        outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1, 1])],
    )
    tensor = b'{"name":"data","datatype":"FP32","shape":[1,2],"data":[%d.5,1]}'
    for i in range(4):
        body = b'{"parameters":{"data":[7,7]},"inputs":[' + tensor % i + b"]}"
        parsed = parse_infer_request(body, None, decoy, MAX_BATCH_SIZE)
        assert parsed.feeds["data"].tolist() == [[i + 0.5, 1.0]] and parsed.plan is None
        body = b'{"inputs":[{"name":"data","datatype":"FP32","shape":[1,2],"data" : [ %d.5 , 2 ] }]}'
        parsed = parse_infer_request(body % i, None, decoy, MAX_BATCH_SIZE)
        assert parsed.feeds["data"].tolist() == [[i + 0.5, 2.0]]
    assert parsed.plan is not None  # the input named data, once seen, is planned all the same


def test_the_same_json_text_to_two_models_is_read_against_each_model() -> None:
    tiny = CONFIGS["tiny-cnn-bn"]
    smaller = ModelConfig(name="smaller", max_batch_size=1, inputs=tiny.inputs, outputs=tiny.outputs)
    body = json_request(["0.25"] * 128, rows=2)
    for _ in range(3):
        assert parse_infer_request(body, None, tiny, MAX_BATCH_SIZE).rows == 2
        with pytest.raises(InvalidInput, match=r"input 'input' has 2 rows, more than this model's max batch size of 1"):
            parse_infer_request(body, None, smaller, 1)


def test_json_requests_each_with_an_id_of_their_own_are_read_as_their_own() -> None:
    config = CONFIGS["tiny-cnn-bn"]
    for i in range(3 * protocol._PLANS_KEPT):
        parsed = parse_infer_request(json_request([str(i)] * 64, after=f',"id":"r{i}"'), None, config, MAX_BATCH_SIZE)
        assert parsed.id == f"r{i}" and parsed.feeds["input"][0, 0, 0, 0] == i
    assert len(protocol._JSON_PLANS) <= protocol._PLANS_KEPT and len(protocol._JSON_SEEN) <= protocol._PLANS_KEPT


@pytest.mark.parametrize(
    "outputs",
    [None, [{"name": "logits"}], [{"name": "logits", "parameters": {"binary_data": True}}]],
    ids=["every-output", "json", "binary"],
)
def test_a_planned_json_answer_is_the_one_its_request_read_afresh_gets(outputs: list[Any] | None) -> None:
    # A planned request keeps its response's JSON header where its outputs come back as binary data: each answer
    # must still be, byte for byte, what the request read without a plan is answered with.
    config, rng = CONFIGS["tiny-cnn-bn"], np.random.default_rng(0)
    for rows, version, request_id in ((1, "1", None), (1, "1", None), (3, "1", 'a "quoted" id'), (1, "2", None)):
        doc: dict[str, Any] = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, 1, 8, 8]}]}
        doc["inputs"][0]["data"] = [0.5] * 64 * rows
        if request_id is not None:
            doc["id"] = request_id
        if outputs is not None:
            doc["outputs"] = outputs
        body = orjson.dumps(doc)
        for _ in range(3):
            planned = parse_infer_request(body, None, config, MAX_BATCH_SIZE)
        assert planned.plan is not None
        afresh = read_afresh(body)
        for _ in range(2):
            logits = {"logits": rng.standard_normal((rows, 10)).astype(np.float32)}
            answer = protocol.encode_infer_response("tiny-cnn-bn", version, planned, logits, {"logits": "FP32"})
            assert answer == protocol.encode_infer_response("tiny-cnn-bn", version, afresh, logits, {"logits": "FP32"})
