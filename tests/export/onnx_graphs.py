"""Small hand-built ONNX graphs with random weights and non-trivial BatchNorm statistics, and the checks the
ONNX-level tests share: every folded graph must answer as the original does in onnxruntime."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
ATOL, RTOL = 1e-4, 1e-5
FLOAT = TensorProto.FLOAT


def make_model(nodes: list, inputs: list, outputs: list, initializers: list, opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def tensor(name: str, shape: list, elem: int = FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def init(name: str, value: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def randn(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def bn_stats(rng: np.random.Generator, c: int, prefix: str = "bn") -> tuple[list[str], list[TensorProto]]:
    """scale, B, mean, var of a BatchNorm over ``c`` channels, far from the identity map."""
    values = [randn(rng, c), randn(rng, c), randn(rng, c), (rng.random(c) * 2 + 0.1).astype(np.float32)]
    names = [f"{prefix}.{role}" for role in ("scale", "B", "mean", "var")]
    return names, [init(n, v) for n, v in zip(names, values, strict=True)]


def bn_node(x: str, y: str, stats: list[str], name: str = "bn", **attrs: object) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x, *stats], [y], name, epsilon=1e-3, **attrs)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    assert (diff <= ATOL + RTOL * np.abs(want.astype(np.float64))).all(), f"max |diff| {diff.max():.3g}"


def ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def assert_same_answers(original: onnx.ModelProto, folded: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    assert ops(folded)["BatchNormalization"] == 0
    for got, want in zip(run(folded, feeds), run(original, feeds), strict=True):
        assert_close(got, want)


def conv_bn(rng: np.random.Generator, bias: bool, group: int, c_out: int) -> onnx.ModelProto:
    c_in = 4
    w = randn(rng, c_out, c_in // group, 3, 3)
    stats, stat_inits = bn_stats(rng, c_out)
    conv_inputs = ["x", "W", "b"] if bias else ["x", "W"]
    inits = [init("W", w), *stat_inits] + ([init("b", randn(rng, c_out))] if bias else [])
    nodes = [
        helper.make_node("Conv", conv_inputs, ["c"], "conv", group=group, pads=[1, 1, 1, 1]),
        bn_node("c", "y", stats),
    ]
    return make_model(nodes, [tensor("x", ["N", c_in, 6, 6])], [tensor("y", ["N", c_out, 6, 6])], inits)
