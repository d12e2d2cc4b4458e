"""export.onnx_fold on small hand-built graphs, and on a graph torch's exporter wrote: every folded graph answers
as the original does in onnxruntime, without a BatchNormalization node."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.onnx_batch_stats import batch_stats_graph, check_batch_stats_graph
from export.onnx_fold import LEFT_IN_PLACE, OnnxFold, fold_onnx_batchnorms
from export.onnx_graph import OnnxImportError
from tests.export.onnx_graphs import (
    assert_close,
    assert_same_answers,
    bn_node,
    bn_stats,
    conv_bn,
    init,
    make_model,
    ops,
    randn,
    run,
    tensor,
)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("group", "c_out"), [(1, 8), (2, 6), (4, 4)], ids=["dense", "grouped", "depthwise"])
def test_conv_batchnorm_folds_into_the_conv(bias: bool, group: int, c_out: int) -> None:
    rng = np.random.default_rng(0)
    model = conv_bn(rng, bias, group, c_out)
    result = fold_onnx_batchnorms(model)
    assert result.folds == [OnnxFold("conv", "bn", "Conv+BatchNormalization")]
    assert result.unfoldable == []
    assert ops(result.model) == {"Conv": 1}
    assert_same_answers(model, result.model, {"x": randn(rng, 5, 4, 6, 6)})


def test_folding_keeps_the_interface_and_drops_unused_initializers() -> None:
    rng = np.random.default_rng(1)
    model = conv_bn(rng, bias=True, group=1, c_out=8)
    model.graph.value_info.append(tensor("c", ["N", 8, 6, 6]))  # the Conv's output: renamed y by folding
    result = fold_onnx_batchnorms(model)
    folded = result.model
    assert [i.name for i in folded.graph.input] == ["x"]
    assert folded.graph.output == model.graph.output
    assert folded.opset_import == model.opset_import
    assert folded.ir_version == model.ir_version
    names = {t.name for t in folded.graph.initializer}
    assert len(names) == 2  # the folded weight and bias, nothing of the BatchNorm
    assert not names & {"W", "b", "bn.scale", "bn.B", "bn.mean", "bn.var"}
    assert [v.name for v in folded.graph.value_info] == []
    assert model.graph.node[1].op_type == "BatchNormalization"  # the input is not modified


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_batchnorm_folds(bias: bool, group: int) -> None:
    rng = np.random.default_rng(2)
    c_in, c_out = 4, 6
    w = randn(rng, c_in, c_out // group, 3, 3)  # (C_in, C_out / group, kH, kW)
    stats, stat_inits = bn_stats(rng, c_out)
    inputs = ["x", "W", "b"] if bias else ["x", "W"]
    inits = [init("W", w), *stat_inits] + ([init("b", randn(rng, c_out))] if bias else [])
    nodes = [
        helper.make_node("ConvTranspose", inputs, ["c"], "deconv", group=group, strides=[2, 2]),
        bn_node("c", "y", stats),
    ]
    model = make_model(nodes, [tensor("x", ["N", c_in, 4, 4])], [tensor("y", ["N", c_out, 9, 9])], inits)
    result = fold_onnx_batchnorms(model)
    assert result.folds == [OnnxFold("deconv", "bn", "ConvTranspose+BatchNormalization")]
    assert_same_answers(model, result.model, {"x": randn(rng, 3, c_in, 4, 4)})


@pytest.mark.parametrize(
    ("trans_a", "trans_b", "c_shape"),
    [(0, 0, (5,)), (0, 1, (5,)), (0, 1, None), (0, 0, (1, 5)), (0, 1, ()), (1, 0, (5,))],
)
def test_gemm_batchnorm_folds(trans_a: int, trans_b: int, c_shape: tuple[int, ...] | None) -> None:
    rng = np.random.default_rng(3)
    k, m = 7, 5
    w = randn(rng, m, k) if trans_b else randn(rng, k, m)
    stats, stat_inits = bn_stats(rng, m)
    inputs = ["x", "W"] + ([] if c_shape is None else ["C"])
    inits = [init("W", w), *stat_inits] + ([] if c_shape is None else [init("C", randn(rng, *c_shape))])
    gemm = helper.make_node("Gemm", inputs, ["g"], "gemm", alpha=0.5, beta=2.0, transA=trans_a, transB=trans_b)
    x_shape = [k, "N"] if trans_a else ["N", k]
    model = make_model([gemm, bn_node("g", "y", stats)], [tensor("x", x_shape)], [tensor("y", ["N", m])], inits)
    result = fold_onnx_batchnorms(model)
    assert result.folds == [OnnxFold("gemm", "bn", "Gemm+BatchNormalization")]
    x = randn(rng, k, 6) if trans_a else randn(rng, 6, k)
    assert_same_answers(model, result.model, {"x": x})


@pytest.mark.parametrize("bias_first", [False, True])
def test_matmul_add_batchnorm_folds(bias_first: bool) -> None:
    rng = np.random.default_rng(4)
    stats, stat_inits = bn_stats(rng, 5)
    add_inputs = ["bias", "mm"] if bias_first else ["mm", "bias"]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"], "matmul"),
        helper.make_node("Add", add_inputs, ["a"], "add"),
        bn_node("a", "y", stats),
    ]
    inits = [init("W", randn(rng, 7, 5)), init("bias", randn(rng, 5)), *stat_inits]
    model = make_model(nodes, [tensor("x", ["N", 7])], [tensor("y", ["N", 5])], inits)
    result = fold_onnx_batchnorms(model)
    assert result.folds == [OnnxFold("matmul", "bn", "MatMul+Add+BatchNormalization")]
    assert ops(result.model) == {"MatMul": 1, "Add": 1}
    assert_same_answers(model, result.model, {"x": randn(rng, 6, 7)})


def test_matmul_batchnorm_folds_with_a_new_bias() -> None:
    rng = np.random.default_rng(5)
    stats, stat_inits = bn_stats(rng, 5)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], "matmul"), bn_node("mm", "y", stats)]
    model = make_model(
        nodes, [tensor("x", ["N", 7])], [tensor("y", ["N", 5])], [init("W", randn(rng, 7, 5)), *stat_inits]
    )
    result = fold_onnx_batchnorms(model)
    assert result.folds == [OnnxFold("matmul", "bn", "MatMul+BatchNormalization")]
    assert ops(result.model) == {"MatMul": 1, "Add": 1}
    assert_same_answers(model, result.model, {"x": randn(rng, 6, 7)})


def test_matmul_on_tokens_is_not_folded() -> None:
    """A MatMul over (N, L, K) puts its features on the last axis, not on the BatchNorm's axis 1."""
    rng = np.random.default_rng(6)
    stats, stat_inits = bn_stats(rng, 3)  # normalizes L = 3
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], "matmul"), bn_node("mm", "y", stats)]
    model = make_model(
        nodes, [tensor("x", ["N", 3, 7])], [tensor("y", ["N", 3, 5])], [init("W", randn(rng, 7, 5)), *stat_inits]
    )
    result = fold_onnx_batchnorms(model)
    assert result.folds == []
    assert "rank 3" in result.unfoldable[0].reason
    assert_same_answers(model, result.model, {"x": randn(rng, 4, 3, 7)})


def test_chained_batchnorms_both_fold() -> None:
    """Once the first folds into the Conv, the Conv feeds the second."""
    rng = np.random.default_rng(7)
    first, first_inits = bn_stats(rng, 8, "bn1")
    second, second_inits = bn_stats(rng, 8, "bn2")
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], "conv"),
        bn_node("c", "h", first, "bn1"),
        bn_node("h", "y", second, "bn2"),
    ]
    inits = [init("W", randn(rng, 8, 4, 3, 3)), *first_inits, *second_inits]
    model = make_model(nodes, [tensor("x", ["N", 4, 6, 6])], [tensor("y", ["N", 8, 4, 4])], inits)
    result = fold_onnx_batchnorms(model)
    assert [f.norm for f in result.folds] == ["bn1", "bn2"]
    assert ops(result.model) == {"Conv": 1}
    assert_same_answers(model, result.model, {"x": randn(rng, 3, 4, 6, 6)})


def test_statistics_from_constant_nodes_fold() -> None:
    rng = np.random.default_rng(8)
    values = [randn(rng, 8), randn(rng, 8), randn(rng, 8), (rng.random(8) + 0.5).astype(np.float32)]
    constants = [
        helper.make_node("Constant", [], [f"k{i}"], f"const{i}", value=numpy_helper.from_array(v))
        for i, v in enumerate(values)
    ]
    nodes = [
        *constants,
        helper.make_node("Conv", ["x", "W"], ["c"], "conv"),
        bn_node("c", "y", [f"k{i}" for i in range(4)]),
    ]
    model = make_model(
        nodes, [tensor("x", ["N", 4, 5, 5])], [tensor("y", ["N", 8, 3, 3])], [init("W", randn(rng, 8, 4, 3, 3))]
    )
    result = fold_onnx_batchnorms(model)
    assert len(result.folds) == 1
    assert ops(result.model) == {"Conv": 1}  # the Constant nodes nothing reads any more are gone
    assert_same_answers(model, result.model, {"x": randn(rng, 2, 4, 5, 5)})


def test_batchnorm_after_relu_becomes_an_affine_map_with_the_reason() -> None:
    rng = np.random.default_rng(9)
    stats, stat_inits = bn_stats(rng, 8)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], "conv"),
        helper.make_node("Relu", ["c"], ["r"], "relu"),
        bn_node("r", "y", stats),
    ]
    model = make_model(
        nodes,
        [tensor("x", ["N", 4, 5, 5])],
        [tensor("y", ["N", 8, 3, 3])],
        [init("W", randn(rng, 8, 4, 3, 3)), *stat_inits],
    )
    model.graph.value_info.extend([tensor("c", ["N", 8, 3, 3]), tensor("r", ["N", 8, 3, 3])])
    result = fold_onnx_batchnorms(model)
    assert result.model.graph.value_info == model.graph.value_info
    assert result.folds == []
    [unfoldable] = result.unfoldable
    assert unfoldable.norm == "bn"
    assert "Relu 'relu'" in unfoldable.reason
    assert unfoldable.replaced_by == "Mul, Add (per-channel affine)"
    assert ops(result.model) == {"Conv": 1, "Relu": 1, "Mul": 1, "Add": 1}
    assert_same_answers(model, result.model, {"x": randn(rng, 3, 4, 5, 5)})


@pytest.mark.parametrize("second_reader", ["node", "graph output"])
def test_batchnorm_on_a_shared_output_is_not_folded(second_reader: str) -> None:
    rng = np.random.default_rng(10)
    stats, stat_inits = bn_stats(rng, 5)
    nodes = [helper.make_node("Gemm", ["x", "W"], ["g"], "gemm"), bn_node("g", "y", stats)]
    outputs = [tensor("y", ["N", 5])]
    if second_reader == "node":
        nodes.append(helper.make_node("Neg", ["g"], ["z"], "neg"))
        outputs.append(tensor("z", ["N", 5]))
    else:
        outputs.append(tensor("g", ["N", 5]))
    model = make_model(nodes, [tensor("x", ["N", 3])], outputs, [init("W", randn(rng, 3, 5)), *stat_inits])
    result = fold_onnx_batchnorms(model)
    assert result.folds == []
    expected = "also read by 1 other node(s)" if second_reader == "node" else "also a graph output"
    assert expected in result.unfoldable[0].reason
    assert [o.name for o in result.model.graph.output] == [o.name for o in outputs]
    assert_same_answers(model, result.model, {"x": randn(rng, 4, 3)})


def test_statistics_fed_at_run_time_become_an_affine_map_computed_in_the_graph() -> None:
    rng = np.random.default_rng(11)
    stats, stat_inits = bn_stats(rng, 8)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], "conv"),
        helper.make_node("Abs", ["v"], ["var_abs"], "abs"),
        bn_node("c", "y", [*stats[:3], "var_abs"]),
    ]
    model = make_model(
        nodes,
        [tensor("x", ["N", 4, 5, 5]), tensor("v", [8])],
        [tensor("y", ["N", 8, 3, 3])],
        [init("W", randn(rng, 8, 4, 3, 3)), *stat_inits[:3]],
    )
    result = fold_onnx_batchnorms(model)
    assert "var 'var_abs' is computed in the graph" in result.unfoldable[0].reason
    assert_same_answers(model, result.model, {"x": randn(rng, 3, 4, 5, 5), "v": randn(rng, 8)})


def test_weights_computed_from_constants_alone_fold() -> None:
    """The zero bias of a bias-less Conv as torch's dynamo exporter writes it unoptimized, and a
    variance computed from an initializer: both are known without any input, so the BatchNorm folds
    and the nodes that computed them go."""
    rng = np.random.default_rng(15)
    stats, stat_inits = bn_stats(rng, 8)
    nodes = [
        helper.make_node("Shape", ["W"], ["w_shape"], start=0, end=1),
        helper.make_node("Expand", ["zero", "w_shape"], ["zeros"]),
        helper.make_node("CastLike", ["zeros", "x"], ["bias"]),  # x: an input, read for its dtype only
        helper.make_node("Conv", ["x", "W", "bias"], ["c"], "conv"),
        helper.make_node("Abs", [stats[3]], ["var_abs"], "abs"),
        bn_node("c", "y", [*stats[:3], "var_abs"]),
    ]
    inits = [init("W", randn(rng, 8, 4, 3, 3)), init("zero", np.array([0.0])), *stat_inits]
    model = make_model(nodes, [tensor("x", ["N", 4, 5, 5])], [tensor("y", ["N", 8, 3, 3])], inits)
    result = fold_onnx_batchnorms(model)
    assert result.folds == [OnnxFold("conv", "bn", "Conv+BatchNormalization")]
    assert ops(result.model) == {"Conv": 1}
    assert_same_answers(model, result.model, {"x": randn(rng, 3, 4, 5, 5)})


def test_batchnorm_on_an_input_of_unknown_rank_broadcasts_at_run_time() -> None:
    """A Reshape to a shape fed at run time hides the rank: the affine map is reshaped to (C, 1, ...) from
    Shape(x) in the graph, so one folded graph serves every rank."""
    rng = np.random.default_rng(12)
    stats, stat_inits = bn_stats(rng, 3)
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["r"], "reshape"),
        bn_node("r", "b", stats),
        helper.make_node("Reshape", ["b", "flat"], ["y"], "flatten"),
    ]
    inputs = [tensor("x", ["N", 12]), tensor("shape", ["R"], TensorProto.INT64)]
    inits = [*stat_inits, init("flat", np.array([-1, 12]))]
    model = make_model(nodes, inputs, [tensor("y", ["N", 12])], inits)
    result = fold_onnx_batchnorms(model)
    assert "Reshape 'reshape'" in result.unfoldable[0].reason
    x = randn(rng, 4, 12)
    for shape in [(4, 3, 4), (4, 3, 2, 2), (2, 3, 8)]:
        assert_same_answers(model, result.model, {"x": x, "shape": np.array(shape)})


def test_batchnorm_inside_a_subgraph_is_left_and_listed() -> None:
    rng = np.random.default_rng(13)
    stats, stat_inits = bn_stats(rng, 3)
    then_branch = helper.make_graph([bn_node("x", "t", stats, "inner_bn")], "then", [], [tensor("t", ["N", 3])])
    else_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [tensor("e", ["N", 3])])
    nodes = [helper.make_node("If", ["flag"], ["y"], "if", then_branch=then_branch, else_branch=else_branch)]
    inputs = [tensor("x", ["N", 3]), tensor("flag", [], TensorProto.BOOL)]
    model = make_model(nodes, inputs, [tensor("y", ["N", 3])], stat_inits)
    result = fold_onnx_batchnorms(model)
    [left] = result.unfoldable
    assert left.norm == "inner_bn"
    assert "then_branch subgraph of If 'if'" in left.reason
    assert left.replaced_by == LEFT_IN_PLACE
    assert {t.name for t in result.model.graph.initializer} == set(stats)  # still read by the branch
    x = randn(rng, 2, 3)
    for flag in (True, False):
        feeds = {"x": x, "flag": np.array(flag)}
        assert_close(run(result.model, feeds)[0], run(model, feeds)[0])


def test_training_mode_batchnorm_is_refused() -> None:
    rng = np.random.default_rng(14)
    stats, stat_inits = bn_stats(rng, 3)
    model = make_model(
        [bn_node("x", "y", stats, training_mode=1)], [tensor("x", ["N", 3])], [tensor("y", ["N", 3])], stat_inits
    )
    with pytest.raises(OnnxImportError, match="training_mode=1; expected the inference form"):
        fold_onnx_batchnorms(model)


def test_a_torch_exported_graph_folds_and_runs_batch_statistics_as_train_mode() -> None:
    import torch
    from torch import nn

    from export.onnx_export import export_onnx
    from tests.conftest import randomize_batchnorms

    torch.manual_seed(0)
    model = nn.Sequential(  # a bias-less Conv: the exporter computes its zero bias in the graph
        nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 5), nn.BatchNorm1d(5)
    )
    model = randomize_batchnorms(model)
    x = torch.randn(8, 2, 5, 5) * 2 + 0.5
    proto = export_onnx(model, x, optimize=False)  # keeps the BatchNormalization nodes
    assert ops(proto)["BatchNormalization"] == 2
    with torch.no_grad():
        eval_out = model(x).numpy()

    result = fold_onnx_batchnorms(proto)
    assert [f.kind for f in result.folds] == ["Conv+BatchNormalization", "Gemm+BatchNormalization"]
    assert ops(result.model).keys() <= {"Conv", "Relu", "Reshape", "Gemm", "Constant", "Concat", "Shape", "Squeeze"}
    assert_close(run(result.model, {"input": x.numpy()})[0], eval_out)

    graph, layers = batch_stats_graph(proto, {"input": x[:2].numpy()})
    train = copy.deepcopy(model)
    seen: list[np.ndarray] = []
    for m in train.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.train()
            m.register_forward_pre_hook(lambda _, args: seen.append(args[0].double().numpy()))
    with torch.no_grad():
        train_out = train(x).numpy()
    logits, *stats = run(graph, {"input": x.numpy()})
    assert_close(logits, train_out)
    for i, inputs in enumerate(seen):
        axes = (0, *range(2, inputs.ndim))
        assert_close(stats[2 * i], inputs.mean(axis=axes))
        assert_close(stats[2 * i + 1], inputs.var(axis=axes))  # biased
    assert [(layer["momentum"], layer["eps"]) for layer in layers] == [(0.1, 1e-5), (0.1, 1e-5)]
    assert layers[0]["running_mean"] == pytest.approx(model[1].running_mean.tolist())
    assert check_batch_stats_graph(proto, graph, {"input": x.numpy()})["passed"]
