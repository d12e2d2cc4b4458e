"""export.onnx_batch_stats: the batch-statistics graph of an imported graph reports the batch's statistics."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.onnx_batch_stats import batch_stats_graph, check_batch_stats_graph
from export.onnx_graph import OnnxImportError
from repository import BatchNormLayer
from tests.export.onnx_graphs import (
    OPSET,
    assert_close,
    bn_node,
    bn_stats,
    init,
    make_model,
    ops,
    randn,
    run,
    tensor,
)


def conv_relu_gemm(rng: np.random.Generator, opset: int = OPSET) -> onnx.ModelProto:
    """x (N, 2, 5, 5) -> Conv 4x3x3 -> BN -> Relu -> Flatten -> Gemm 36->6 -> BN -> logits (N, 6)."""
    bn1, bn1_inits = bn_stats(rng, 4, "bn1")
    bn2, bn2_inits = bn_stats(rng, 6, "bn2")
    nodes = [
        helper.make_node("Conv", ["x", "W1", "b1"], ["c"], "conv"),
        bn_node("c", "n1", bn1, "", momentum=0.8),  # unnamed: batch_stats_graph names it
        helper.make_node("Relu", ["n1"], ["r"], "relu"),
        helper.make_node("Flatten", ["r"], ["f"], "flatten"),
        helper.make_node("Gemm", ["f", "W2", "b2"], ["g"], "gemm", transB=1),
        helper.make_node("BatchNormalization", ["g", *bn2], ["logits"], "bn2"),
    ]
    inits = [
        init("W1", randn(rng, 4, 2, 3, 3)),
        init("b1", randn(rng, 4)),
        init("W2", randn(rng, 6, 36) / 4),
        init("b2", randn(rng, 6)),
        *bn1_inits,
        *bn2_inits,
    ]
    return make_model(nodes, [tensor("x", ["N", 2, 5, 5])], [tensor("logits", ["N", 6])], inits, opset)


@pytest.mark.parametrize("opset", [17, OPSET], ids=["axes-attribute", "axes-input"])
def test_batch_stats_graph_reports_the_batch_statistics(opset: int) -> None:
    rng = np.random.default_rng(40)
    model = conv_relu_gemm(rng, opset)
    x = randn(rng, 8, 2, 5, 5) * 2 + 0.5
    graph, layers = batch_stats_graph(model, {"x": x[:2]})
    assert ops(graph)["BatchNormalization"] == 0
    assert [o.name for o in graph.graph.output] == [
        "logits",
        "batch_mean.0",
        "batch_var.0",
        "batch_mean.1",
        "batch_var.1",
    ]
    assert [BatchNormLayer(**layer).name for layer in layers] == ["BatchNormalization_1", "bn2"]
    first, second = layers
    assert (first["channels"], first["reduced_over"], first["positions"]) == (4, "N, H, W", 9)
    assert (second["channels"], second["reduced_over"], second["positions"]) == (6, "N", 1)
    assert (first["eps"], first["momentum"], second["eps"], second["momentum"]) == (1e-3, 0.2, 1e-5, 0.1)
    stats = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert first["running_mean"] == stats["bn1.mean"].tolist()
    assert second["running_var"] == stats["bn2.var"].tolist()

    _, mean0, var0, *_ = run(graph, {"x": x})
    conv = run(
        make_model(
            model.graph.node[:1],
            [tensor("x", ["N", 2, 5, 5])],
            [tensor("c", ["N", 4, 3, 3])],
            model.graph.initializer[:2],
        ),
        {"x": x},
    )[0]
    assert_close(mean0, conv.astype(np.float64).mean(axis=(0, 2, 3)))
    assert_close(var0, conv.astype(np.float64).var(axis=(0, 2, 3)))

    report = check_batch_stats_graph(model, graph, {"x": x})
    assert report["passed"], report["detail"]
    assert set(report["figures"]["passed"]) == {
        "statistics",
        "train_mode_output",
        "differs_from_running",
        "repeated_sample",
    }


def test_a_graph_that_reports_the_running_statistics_fails_the_check() -> None:
    """The original graph, returning its running statistics as if they were the batch's."""
    rng = np.random.default_rng(41)
    model = conv_relu_gemm(rng)
    fake = copy.deepcopy(model)
    for i, prefix in enumerate(("bn1", "bn2")):
        for stat, name in (("mean", f"batch_mean.{i}"), ("var", f"batch_var.{i}")):
            fake.graph.node.append(helper.make_node("Identity", [f"{prefix}.{stat}"], [name]))
            fake.graph.output.append(tensor(name, [4 if i == 0 else 6]))
    report = check_batch_stats_graph(model, fake, {"x": randn(rng, 8, 2, 5, 5) * 2 + 0.5})
    assert not report["passed"]
    assert report["figures"]["passed"] == {
        "statistics": False,
        "train_mode_output": True,  # the running statistics reproduce themselves
        "differs_from_running": False,
        "repeated_sample": True,
    }


def test_batch_stats_graph_refuses_what_it_cannot_build() -> None:
    rng = np.random.default_rng(42)
    plain = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", ["N", 3])], [tensor("y", ["N", 3])], [])
    with pytest.raises(OnnxImportError, match="no BatchNormalization node"):
        batch_stats_graph(plain, {"x": randn(rng, 2, 3)})
    stats, stat_inits = bn_stats(rng, 3)
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], "mean", keepdims=0),  # over every axis: a scalar
        helper.make_node("Expand", ["m", "three"], ["m3"], "expand"),
        bn_node("x", "y", [*stats[:2], "m3", stats[3]]),
    ]
    inits = [*stat_inits, init("three", np.array([3]))]
    computed = make_model(nodes, [tensor("x", ["N", 3])], [tensor("y", ["N", 3])], inits)
    with pytest.raises(OnnxImportError, match="running mean 'm3' is computed in the graph; expected a constant"):
        batch_stats_graph(computed, {"x": randn(rng, 2, 3)})
    branch = helper.make_graph([bn_node("x", "t", stats, "inner")], "then", [], [tensor("t", ["N", 3])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [tensor("e", ["N", 3])])
    nested = make_model(
        [helper.make_node("If", ["flag"], ["y"], "if", then_branch=branch, else_branch=other)],
        [tensor("x", ["N", 3]), tensor("flag", [], TensorProto.BOOL)],
        [tensor("y", ["N", 3])],
        stat_inits,
    )
    with pytest.raises(OnnxImportError, match="'inner': it is inside the then_branch subgraph"):
        batch_stats_graph(nested, {"x": randn(rng, 2, 3), "flag": np.array(True)})
