"""export.onnx_import on small hand-built graphs with random weights and non-trivial BatchNorm statistics:
every folded graph must answer as the original does in onnxruntime, without a BatchNormalization node."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.onnx_import import (
    LEFT_IN_PLACE,
    OnnxFold,
    OnnxImportError,
    batch_stats_graph,
    check_batch_stats_graph,
    fold_onnx_batchnorms,
    graph_specs,
    load_onnx,
    onnx_datatype,
)
from repository import BatchNormLayer, TensorSpec

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


# ---------------------------------------------------------------------------------------------------------
# Folding


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


# ---------------------------------------------------------------------------------------------------------
# Loading


def test_external_data_is_read_into_a_self_contained_proto(tmp_path: Path) -> None:
    rng = np.random.default_rng(20)
    model = conv_bn(rng, bias=True, group=1, c_out=8)
    onnx.save(
        copy.deepcopy(model),  # saving with external data rewrites the proto it is given
        tmp_path / "model.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="w.data",
        size_threshold=0,
    )
    loaded = load_onnx(tmp_path / "model.onnx")
    assert all(t.data_location == TensorProto.DEFAULT and not t.external_data for t in loaded.graph.initializer)
    (tmp_path / "w.data").unlink()  # the proto needs the side file no more
    x = {"x": randn(rng, 2, 4, 6, 6)}
    assert_close(run(loaded, x)[0], run(model, x)[0])


def test_missing_external_data_is_refused(tmp_path: Path) -> None:
    model = conv_bn(np.random.default_rng(21), bias=True, group=1, c_out=8)
    path = tmp_path / "model.onnx"
    onnx.save(model, path, save_as_external_data=True, location="w.data", size_threshold=0)
    (tmp_path / "w.data").unlink()
    with pytest.raises(OnnxImportError, match=r"cannot read the external data .*w\.data"):
        load_onnx(path)


def test_external_data_over_two_gigabytes_is_refused(tmp_path: Path) -> None:
    model = conv_bn(np.random.default_rng(22), bias=True, group=1, c_out=8)
    path = tmp_path / "model.onnx"
    onnx.save(model, path, save_as_external_data=True, location="w.data", size_threshold=0)
    proto = onnx.load(str(path), load_external_data=False)
    length = next(e for e in proto.graph.initializer[0].external_data if e.key == "length")
    length.value = str(3 * 2**30)
    onnx.save(proto, path)
    with pytest.raises(OnnxImportError, match=r"3\.00 GiB; a self-contained model must stay under protobuf's 2 GiB"):
        load_onnx(path)


def test_a_file_that_is_not_onnx_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x00\xffnot a model at all\x12\x34")
    with pytest.raises(OnnxImportError, match="is not an ONNX model"):
        load_onnx(path)
    with pytest.raises(OnnxImportError, match="cannot read"):
        load_onnx(tmp_path / "missing.onnx")


def test_a_graph_onnxruntime_refuses_is_refused_with_its_message(tmp_path: Path) -> None:
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", ["N", 3])], [tensor("y", ["N", 3])], [])
    model.graph.node.append(helper.make_node("NoSuchOp", ["y"], ["z"]))
    model.graph.output.append(tensor("z", ["N", 3]))
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    with pytest.raises(OnnxImportError, match="onnxruntime cannot load .*NoSuchOp"):
        load_onnx(path)


# ---------------------------------------------------------------------------------------------------------
# Inputs and outputs


def test_a_symbolic_first_axis_everywhere_is_the_batch_axis() -> None:
    rng = np.random.default_rng(30)
    model = conv_bn(rng, bias=True, group=1, c_out=8)
    model.graph.output[0].type.tensor_type.ClearField("shape")  # shape inference supplies it
    inputs, outputs, max_batch = graph_specs(model, max_batch_size=16)
    assert inputs == [TensorSpec(name="x", datatype="FP32", shape=[-1, 4, 6, 6])]
    assert outputs == [TensorSpec(name="y", datatype="FP32", shape=[-1, 8, 6, 6])]
    assert max_batch == 16


def test_a_fixed_first_axis_means_no_batch_axis() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    model = make_model(nodes, [tensor("x", [1, 3])], [tensor("y", [1, 3])], [])
    assert graph_specs(model) == (
        [TensorSpec(name="x", datatype="FP32", shape=[1, 3])],
        [TensorSpec(name="y", datatype="FP32", shape=[1, 3])],
        0,
    )


def test_integer_and_boolean_inputs_map_to_their_datatypes() -> None:
    nodes = [
        helper.make_node("Cast", ["ids"], ["f"], to=FLOAT),
        helper.make_node("Where", ["mask", "f", "zero"], ["y"]),
    ]
    inputs = [tensor("ids", ["N", 5], TensorProto.INT64), tensor("mask", ["N", 5], TensorProto.BOOL)]
    inputs.append(tensor("zero", []))  # an initializer listed as an input too: not one to feed
    model = make_model(nodes, inputs, [tensor("y", ["N", 5])], [init("zero", np.float32(0))])
    specs, outputs, max_batch = graph_specs(model)
    assert [(s.name, s.datatype, s.shape) for s in specs] == [("ids", "INT64", [-1, 5]), ("mask", "BOOL", [-1, 5])]
    assert outputs == [TensorSpec(name="y", datatype="FP32", shape=[-1, 5])]
    assert max_batch == 64
    assert onnx_datatype(TensorProto.FLOAT16) == "FP16"


def test_an_unsupported_datatype_is_refused() -> None:
    model = make_model(
        [helper.make_node("Identity", ["s"], ["y"])],
        [tensor("s", ["N"], TensorProto.STRING)],
        [tensor("y", ["N"], TensorProto.STRING)],
        [],
    )
    with pytest.raises(OnnxImportError, match=r"input 's': ONNX element type STRING \(8\) has no Open Inference"):
        graph_specs(model)


def test_a_symbolic_axis_other_than_the_batch_axis_is_refused() -> None:
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])], [tensor("x", ["N", "D"])], [tensor("y", ["N", "D"])], []
    )
    with pytest.raises(OnnxImportError, match=r"input 'x' axis 1 is symbolic \('D'\); .* expected a fixed size"):
        graph_specs(model)
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Shape", ["x"], ["s"])],
        [tensor("x", ["N", 3])],
        [tensor("y", ["N", 3]), tensor("s", [2], TensorProto.INT64)],
        [],
    )
    with pytest.raises(OnnxImportError, match=r"input 'x' axis 0 is symbolic \('N'\).*every input and output"):
        graph_specs(model)


# ---------------------------------------------------------------------------------------------------------
# The batch-statistics graph


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


# ---------------------------------------------------------------------------------------------------------
# Against PyTorch, on a graph its exporter wrote


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


def test_importing_the_module_imports_neither_torch_nor_onnxscript() -> None:
    code = "import sys, export.onnx_import; print(sorted({'torch', 'onnxscript'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2]
    )
    assert out.stdout.strip() == "[]"
