"""The wire protocol's parser, in-process: every malformed request it refuses, with what was expected.

The same requests over HTTP (the status, the JSON body, the failure metric, the server serving on) are
in test_bad_input.py, for what only the wire can show and a few of these.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from repository import ModelConfig, TensorSpec
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
