"""The config schema's rules for users' own models: batch dimensions, datatypes, names; and what a report may
say of its batch-statistics graph."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from repository import DTYPES, ModelConfig, VersionReport


def config(max_batch_size: int, inputs: list[Any], outputs: list[Any] | None = None) -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "name": "m",
            "max_batch_size": max_batch_size,
            "inputs": [{"name": n, "datatype": t, "shape": s} for n, t, s in inputs],
            "outputs": [{"name": n, "datatype": t, "shape": s} for n, t, s in outputs or [("y", "FP32", [2])]],
        }
    )


def test_a_model_without_a_batch_dimension_has_fixed_shapes() -> None:
    unbatched = config(0, [("x", "FP32", [3, 4]), ("flags", "BOOL", [3])], [("y", "FP32", [3, 2])])
    assert not unbatched.batched and unbatched.inputs[0].shape == [3, 4]
    batched = config(8, [("x", "FP32", [-1, 4])], [("y", "FP32", [-1, 2]), ("n", "INT64", [-1])])
    assert batched.batched


@pytest.mark.parametrize(
    ("max_batch_size", "inputs", "outputs", "fragments"),
    [
        (0, [("x", "FP32", [-1, 4])], None, ["input x (FP32 [-1, 4]) has a -1 dimension", "max_batch_size is 0"]),
        (0, [("x", "FP32", [3, 4])], [("y", "FP32", [-1, 2])], ["output y (FP32 [-1, 2]) has a -1 dimension"]),
        (
            4,
            [("x", "FP32", [3, 4])],
            [("y", "FP32", [-1, 2])],
            ["input x (FP32 [3, 4])", "first dimension is the batch"],
        ),
        (4, [("x", "FP32", [-1, 4])], [("y", "FP32", [2])], ["output y (FP32 [2])", "expected a shape like [-1, 2]"]),
        (4, [("x", "FP32", [-1, -1])], [("y", "FP32", [-1, 2])], ["input x (FP32 [-1, -1])", "no other dimension"]),
        (4, [("x", "FP32", [])], [("y", "FP32", [-1, 2])], ["input x (FP32 [])"]),
        (-1, [("x", "FP32", [3])], None, ["max_batch_size", "greater than or equal to 0"]),
        (0, [("x", "FP32", [3, 0])], None, ["'x' has shape [3, 0]", "sizes of at least 1"]),
        (0, [("x", "FP32", [3]), ("x", "INT64", [3])], None, ["input names ['x', 'x'] repeat"]),
    ],
)
def test_shapes_that_disagree_with_max_batch_size_are_refused_saying_what_was_expected(
    max_batch_size: int, inputs: list[Any], outputs: list[Any] | None, fragments: list[str]
) -> None:
    with pytest.raises(ValidationError) as refused:
        config(max_batch_size, inputs, outputs)
    for fragment in fragments:
        assert fragment in str(refused.value)


@pytest.mark.parametrize("datatype", sorted(DTYPES))
def test_every_fixed_size_datatype_is_accepted(datatype: str) -> None:
    assert config(2, [("x", datatype, [-1, 3])], [("y", datatype, [-1])]).inputs[0].datatype == datatype


def test_bytes_is_refused_with_the_reason() -> None:
    with pytest.raises(ValidationError) as refused:
        config(2, [("text", "BYTES", [-1, 1])], [("y", "FP32", [-1, 2])])
    message = str(refused.value)
    assert "tensor 'text' is BYTES" in message and "fixed-size elements only" in message and "FP32" in message


def test_a_report_may_say_why_its_version_has_no_batch_statistics_graph() -> None:
    sha = "0" * 64
    base = {"model": "m", "version": "1", "sha256": sha}
    assert VersionReport.model_validate(base).batch_stats_unavailable is None
    assert VersionReport.model_validate({**base, "batch_stats": None}).batch_stats_unavailable is None
    described = {**base, "batch_stats": {"file": "batch_stats.onnx"}}
    assert VersionReport.model_validate(described).batch_stats_unavailable is None
    unavailable = {**base, "batch_stats": {"unavailable": "a BatchNormalization follows a Relu"}}
    assert VersionReport.model_validate(unavailable).batch_stats_unavailable == "a BatchNormalization follows a Relu"
