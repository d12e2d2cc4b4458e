"""The registry's checks of a user's model against its config, in-process: a graph that does not take or give
what config.json declares is refused with both named, and never served."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from repository import TensorSpec, write_version
from service.config import Settings
from service.metrics import Metrics
from service.registry import Readiness, Registry, _check_outputs
from service.runtime import Runtime
from tests.service.conftest import AFFINE_CONFIG, affine_onnx
from tests.service.user_models import write_grid


def built(root: Path, name: str) -> tuple[Readiness, str]:
    """How one model of ``root`` loads: its version 1's readiness and reason."""
    entry = Registry(Settings(repository=root, provider="cpu"), Metrics())._build(root / name)
    held = entry.versions["1"]
    return held.readiness, held.reason


@pytest.mark.parametrize(
    ("inputs", "outputs", "fragment"),
    [
        (
            [TensorSpec(name="x", datatype="FP32", shape=[-1, 5])],
            None,
            "its input x (FP32 [?, 4]) is declared x (FP32 [-1, 5])",
        ),
        (
            [TensorSpec(name="x", datatype="FP64", shape=[-1, 4])],
            None,
            "its input x (FP32 [?, 4]) is declared x (FP64 [-1, 4])",
        ),
        (
            None,
            [
                TensorSpec(name="y", datatype="INT64", shape=[-1, 3]),
                TensorSpec(name="total", datatype="FP32", shape=[-1, 1]),
            ],
            "its output y (FP32 [?, 3]) is declared y (INT64 [-1, 3])",
        ),
        (
            None,
            [
                TensorSpec(name="y", datatype="FP32", shape=[-1, 3, 1]),
                TensorSpec(name="total", datatype="FP32", shape=[-1, 1]),
            ],
            "its output y (FP32 [?, 3]) is declared y (FP32 [-1, 3, 1])",
        ),
    ],
)
def test_a_graph_unlike_its_config_is_refused_naming_both(
    tmp_path: Path, inputs: list[TensorSpec] | None, outputs: list[TensorSpec] | None, fragment: str
) -> None:
    changes = {"name": "unlike"} | ({"inputs": inputs} if inputs else {}) | ({"outputs": outputs} if outputs else {})
    write_version(tmp_path, AFFINE_CONFIG.model_copy(update=changes), "1", affine_onnx(), {})
    readiness, reason = built(tmp_path, "unlike")
    assert readiness is Readiness.UNAVAILABLE
    assert reason.startswith("model.onnx does not take or give what config.json declares: ") and fragment in reason


def test_a_graph_that_fixes_what_the_config_batches_is_refused(tmp_path: Path) -> None:
    write_grid(tmp_path)  # x [3, 4] -> y [3, 2], no batch dimension
    fixed = tmp_path / "grid"
    batched = AFFINE_CONFIG.model_copy(
        update={
            "name": "grid",
            "inputs": [TensorSpec(name="x", datatype="FP32", shape=[-1, 4])],
            "outputs": [TensorSpec(name="y", datatype="FP32", shape=[-1, 2])],
        }
    )
    write_version(tmp_path, batched, "1", (fixed / "1" / "model.onnx").read_bytes(), {})
    readiness, reason = built(tmp_path, "grid")
    assert readiness is Readiness.UNAVAILABLE and "its input x (FP32 [3, 4]) is declared x (FP32 [-1, 4])" in reason


def test_an_output_that_does_not_follow_the_batch_is_refused(tmp_path: Path) -> None:
    write_version(tmp_path, AFFINE_CONFIG, "1", affine_onnx(), {})
    runtime = Runtime(tmp_path / "affine" / "1" / "model.onnx", "cpu", 1)
    warmed = runtime.warm({"x": np.zeros((1, 4), np.float32)}, 8, repeats=1)
    _check_outputs(runtime, AFFINE_CONFIG, warmed)  # as declared
    warmed[8] = [warmed[8][0][:1], warmed[8][1]]  # a graph that answers one row for a batch of 8
    with pytest.raises(
        ValueError, match=r"answers a batch of 8 rows with y of float32 \[1, 3\]; .* expected float32 \[8, 3\]"
    ):
        _check_outputs(runtime, AFFINE_CONFIG, warmed)
