"""Fold the BatchNormalization nodes of an ONNX graph into the layers before them, at the ONNX level.

The counterpart of ``export.fold`` for a graph that did not come through torch.fx: a user's ONNX file
(``normserve import``), or a module fx cannot trace, exported unfolded. No torch here.

Folding. At inference ``BatchNormalization`` is a fixed per-channel affine map along axis 1::

    s = scale / sqrt(var + eps),    y = (x - mean) * s + B = x * s + (B - mean * s)

When x is the output of a layer that nothing else reads, the map merges into that layer's weights
(computed in float64, then cast to the weights' dtype):

- Conv, weight (M, C/group, k...):            W' = W * s[m],           b' = (b - mean) * s + B
- ConvTranspose, weight (C_in, M/group, k...): output channel m = g * M/group + j is column j of
  group g, whose rows are input channels g * C_in/group ...: W'[i, j] = W[i, j] * s[g(i) * M/group + j]
- Gemm, Y = alpha * A' B' + beta * C with A' = transA(A), B' = transB(B), Y of shape (N, M): column m
  of B' scales by s[m] (column B[:, m] when transB = 0, row B[m, :] when transB = 1), alpha stays, and
  C' = (beta * C - mean) * s + B with beta set to 1; C may be absent (0) or any shape that broadcasts
  to (N, M)
- MatMul (N, K) @ W (K, M), with or without a constant bias Add after it: W' = W * s[None, :],
  bias' = (bias - mean) * s + B; a MatMul without one gets a new Add

Any other BatchNormalization (after Relu or a residual Add, on a layer output read elsewhere or
returned, with statistics computed in the graph, ...) becomes ``Mul`` and ``Add`` with s and
B - mean * s shaped (C, 1, ...) to broadcast along axis 1 of its input (from ``Shape(x)`` at run time
when nothing tells its rank), and is listed with the reason.

Why our own pass: onnx itself has no fusion pass (onnxoptimizer's ``fuse_bn_into_conv`` is a separate
C++ package, Conv only, not in the serving install), and onnxruntime's ``ConvBNFusion`` and
``MatmulBNFusion`` rewrite only a session's in-memory graph, never Gemm+BN or ConvTranspose+BN, and
never the file: the repository would keep a graph with ``BatchNormalization`` in it, which
``export.verify`` refuses, and the report could not say which layers folded. Only the main graph is
rewritten: a BatchNorm inside an If/Loop body or a local function is left where it is and listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from export.graphs import Unfoldable
from export.onnx_graph import (
    DEFAULT_DOMAINS,
    STAT_ROLES,
    GraphIndex,
    OnnxImportError,
    bn_epsilon,
    check_inference_form,
    copy_proto,
    is_batchnorm,
    node_attr,
    node_subgraphs,
    set_node_attr,
)

__all__ = [
    "LEFT_IN_PLACE",
    "OnnxFold",
    "OnnxFoldResult",
    "along_channels",
    "fold_onnx_batchnorms",
    "nested_batchnorms",
]

LEFT_IN_PLACE = "nothing: left in place"
_FOLDABLE_INTO = "a Conv, ConvTranspose, Gemm or MatMul (with or without a constant bias Add)"


@dataclass(frozen=True)
class OnnxFold:
    layer: str  # node name of the Conv/ConvTranspose/Gemm/MatMul that absorbed the BatchNormalization
    norm: str  # node name of the BatchNormalization
    kind: str  # for example "Conv+BatchNormalization", "MatMul+Add+BatchNormalization"


@dataclass
class OnnxFoldResult:
    model: onnx.ModelProto
    folds: list[OnnxFold] = field(default_factory=list)
    unfoldable: list[Unfoldable] = field(default_factory=list)


def nested_batchnorms(model: onnx.ModelProto) -> list[Unfoldable]:
    """The BatchNormalization nodes in subgraphs and local functions, which the passes leave alone."""
    found: list[Unfoldable] = []

    def listed(nodes: Any, place: str) -> None:
        for i, inner in enumerate(nodes):
            if is_batchnorm(inner):
                reason = f"it is inside {place}; only the main graph's BatchNormalization nodes are rewritten"
                found.append(Unfoldable(inner.name or f"{inner.op_type}_{i}", reason, LEFT_IN_PLACE))
        walk(nodes, f"{place}, in ")

    def walk(nodes: Any, where: str) -> None:
        for node in nodes:
            for attr_name, g in node_subgraphs(node):
                listed(g.node, f"{where}the {attr_name} subgraph of {node.op_type} {node.name!r}")

    walk(model.graph.node, "")
    for fn in model.functions:
        listed(fn.node, f"the local function {fn.domain}:{fn.name}")
    return found


# ---------------------------------------------------------------------------------------------------------
# Folding


@dataclass(frozen=True)
class _Target:
    kind: str  # "Conv", "ConvTranspose", "Gemm", "MatMul+Add" or "MatMul"
    layer: onnx.NodeProto  # the Conv, ConvTranspose, Gemm or MatMul
    bias_add: onnx.NodeProto | None = None  # the Add of MatMul+Add


def _matmul_target(mm: onnx.NodeProto, g: GraphIndex, channels: int) -> str | None:
    """None if the MatMul ``mm`` can take the BatchNorm: a 2-D constant weight on (N, K) features."""
    w = g.constant(mm.input[1])
    if w is None:
        return f"MatMul {mm.name!r}'s weight {mm.input[1]!r} is computed in the graph; expected a constant"
    if w.ndim != 2:
        return f"MatMul {mm.name!r}'s weight has shape {list(w.shape)}; expected a 2-D constant (K, M)"
    rank = g.rank(mm.output[0])
    if rank != 2:
        got = "of unknown rank" if rank is None else f"rank {rank}"
        return f"MatMul {mm.name!r}'s output is {got}; folding needs (N, C) features, with C on axis 1"
    if w.shape[1] != channels:
        return f"MatMul {mm.name!r} has {w.shape[1]} output features, the BatchNormalization {channels} channels"
    return None


def _fold_target(bn: onnx.NodeProto, g: GraphIndex) -> _Target | str:
    """The layer ``bn`` folds into, or the reason it cannot."""
    for role, name in zip(STAT_ROLES, bn.input[1:5], strict=True):
        if g.constant(name) is None:
            return f"its {role} {name!r} is computed in the graph, not a constant"
    channels = g.value(bn.input[1]).size
    x = bn.input[0]
    layer = g.producer.get(x)
    if layer is None:
        return f"its input {x!r} is a graph input or initializer, not a layer's output"
    if g.readers[x] > 1:
        return f"{layer.op_type} {layer.name!r}'s output {x!r} is also read by {g.readers[x] - 1} other node(s)"
    if x in g.outputs:
        return f"{layer.op_type} {layer.name!r}'s output {x!r} is also a graph output"
    if layer.domain not in DEFAULT_DOMAINS:
        return f"its input comes from {layer.domain}:{layer.op_type} {layer.name!r}, not from {_FOLDABLE_INTO}"
    if layer.op_type in ("Conv", "ConvTranspose", "Gemm"):
        if any(g.constant(name) is None for name in layer.input[1:] if name):
            return f"{layer.op_type} {layer.name!r} has weights computed in the graph; expected constants"
        w = g.value(layer.input[1])
        if layer.op_type == "Conv":
            out = w.shape[0]
        elif layer.op_type == "ConvTranspose":
            out = w.shape[1] * int(node_attr(layer, "group", 1))
        else:
            out = w.shape[0] if node_attr(layer, "transB", 0) else w.shape[1]
        if out != channels:
            return f"{layer.op_type} {layer.name!r} has {out} output channels, the BatchNormalization {channels}"
        return _Target(layer.op_type, layer)
    if layer.op_type == "MatMul":
        reason = _matmul_target(layer, g, channels)
        return reason or _Target("MatMul", layer)
    if layer.op_type == "Add":
        for k in (0, 1):
            mm, bias = g.producer.get(layer.input[k]), g.constant(layer.input[1 - k])
            if mm is None or mm.op_type != "MatMul" or mm.domain not in DEFAULT_DOMAINS or bias is None:
                continue
            if g.readers[mm.output[0]] > 1 or mm.output[0] in g.outputs:
                return f"MatMul {mm.name!r}'s output is also read elsewhere than by Add {layer.name!r}"
            if bias.size not in (1, channels) or bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1):
                return (
                    f"Add {layer.name!r}'s bias has shape {list(bias.shape)}; expected ({channels},) or (1, {channels})"
                )
            reason = _matmul_target(mm, g, channels)
            return reason or _Target("MatMul+Add", mm, layer)
    return f"its input comes from {layer.op_type} {layer.name!r}, not from {_FOLDABLE_INTO}"


def _scale(stats: list[np.ndarray], eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(s, mean, B) in float64, each (C,): y = (x - mean) * s + B."""
    scale, bias, mean, var = (a.astype(np.float64).reshape(-1) for a in stats)
    return scale / np.sqrt(var + eps), mean, bias


def _fold(bn: onnx.NodeProto, target: _Target, g: GraphIndex) -> None:
    """Merge ``bn`` into ``target``'s weights; the layer's output takes the BatchNorm's output name."""
    s, mean, bias = _scale([g.value(n) for n in bn.input[1:5]], bn_epsilon(bn))
    layer = target.layer
    w = g.value(layer.input[1])
    w64 = w.astype(np.float64)
    if target.kind == "Conv":
        w_new = w64 * s.reshape((-1,) + (1,) * (w.ndim - 1))
        old_b = g.value(layer.input[2]) if len(layer.input) > 2 and layer.input[2] else None
    elif target.kind == "ConvTranspose":
        group = int(node_attr(layer, "group", 1))
        kernel = w.shape[2:]
        grouped = w64.reshape(group, w.shape[0] // group, w.shape[1], *kernel)  # (G, C_in/G, M/G, k...)
        w_new = (grouped * s.reshape(group, 1, w.shape[1], *(1,) * len(kernel))).reshape(w.shape)
        old_b = g.value(layer.input[2]) if len(layer.input) > 2 and layer.input[2] else None
    elif target.kind == "Gemm":
        w_new = w64 * (s[:, None] if node_attr(layer, "transB", 0) else s[None, :])
        c = g.value(layer.input[2]) if len(layer.input) > 2 and layer.input[2] else None
        old_b = None if c is None else float(node_attr(layer, "beta", 1.0)) * c.astype(np.float64)
        set_node_attr(layer, "beta", 1.0)
    else:  # MatMul, MatMul+Add
        w_new = w64 * s[None, :]
        old_b = None
        if target.bias_add is not None:
            bias_input = 1 if target.bias_add.input[0] == layer.output[0] else 0
            old_b = g.value(target.bias_add.input[bias_input]).reshape(-1)
    b_new = ((0.0 if old_b is None else old_b.astype(np.float64)) - mean) * s + bias
    layer.input[1] = g.add_initializer(f"{layer.input[1]}_bn_folded", w_new.astype(w.dtype))
    b_name = g.add_initializer(f"{layer.name}_bn_folded_bias", b_new.astype(w.dtype))
    y = bn.output[0]
    if target.kind in ("Conv", "ConvTranspose", "Gemm"):
        if len(layer.input) > 2:
            layer.input[2] = b_name
        else:
            layer.input.append(b_name)
        layer.output[0] = y
        g.replace(bn, [])
    elif target.bias_add is not None:
        add = target.bias_add
        add.input[1 if add.input[0] == layer.output[0] else 0] = b_name
        add.output[0] = y
        g.replace(bn, [])
    else:
        g.replace(bn, [helper.make_node("Add", [layer.output[0], b_name], [y], g.fresh(f"{layer.name}_bias"))])


def along_channels(g: GraphIndex, names: list[str], rank: int | None, x: str, hint: str) -> tuple[list[str], list[Any]]:
    """Reshape each (C,) tensor in ``names`` to (C, 1, ...) so it broadcasts along axis 1 of ``x``.

    With ``rank`` unknown the target shape is built at run time from ``Shape(x)``: [-1] and rank - 2 ones.
    Returns the new names and the nodes that compute them.
    """
    if rank == 2:
        return names, []  # (C,) already broadcasts along the last axis, which is axis 1
    nodes: list[onnx.NodeProto] = []
    if rank is not None:
        shape = g.add_initializer(f"{hint}_channel_shape", np.array([-1] + [1] * (rank - 2), dtype=np.int64))
    else:
        if g.opset < 9:
            raise OnnxImportError(
                f"the rank of {x!r} is unknown and opset {g.opset} has no ConstantOfShape to broadcast along axis 1 "
                "at run time; expected a declared shape or opset >= 9"
            )
        two = g.add_initializer(f"{hint}_two", np.array([2], dtype=np.int64))
        minus_one = g.add_initializer(f"{hint}_minus_one", np.array([-1], dtype=np.int64))
        one = helper.make_tensor("value", TensorProto.INT64, [1], [1])
        nodes.append(g.node("Shape", [x], f"{hint}_shape"))
        nodes.append(g.node("Shape", [nodes[-1].output[0]], f"{hint}_rank"))
        nodes.append(g.node("Sub", [nodes[-1].output[0], two], f"{hint}_rank_minus_2"))
        nodes.append(g.node("ConstantOfShape", [nodes[-1].output[0]], f"{hint}_ones", value=one))
        nodes.append(g.node("Concat", [minus_one, nodes[-1].output[0]], f"{hint}_channel_shape", axis=0))
        shape = nodes[-1].output[0]
    out = []
    for name in names:
        nodes.append(g.node("Reshape", [name, shape], f"{hint}_reshape"))
        out.append(nodes[-1].output[0])
    return out, nodes


def _producer_rank(g: GraphIndex, x: str) -> int | None:
    """The rank of ``x`` from the layer that produces it, when shape inference gave none."""
    layer = g.producer.get(x)
    if layer is None:
        return None
    if layer.op_type in ("Conv", "ConvTranspose"):
        w = g.constant(layer.input[1])
        return None if w is None else w.ndim
    return 2 if layer.op_type == "Gemm" else None


def _to_affine(bn: onnx.NodeProto, g: GraphIndex) -> None:
    """Replace ``bn`` by x * s + (B - mean * s), s and the shift shaped to broadcast along axis 1."""
    x, y = bn.input[0], bn.output[0]
    rank = g.rank(x) or g.rank(y) or _producer_rank(g, x)
    x_type = g.elem_type(x) or g.elem_type(y)
    nodes: list[onnx.NodeProto] = []
    if all(g.constant(n) is not None for n in bn.input[1:5]):
        stats = [g.value(n) for n in bn.input[1:5]]
        s, mean, bias = _scale(stats, bn_epsilon(bn))
        dtype = helper.tensor_dtype_to_np_dtype(x_type) if x_type else stats[0].dtype
        shape = (-1,) if rank is None else (-1,) + (1,) * (rank - 2)
        factors = [
            g.add_initializer(f"{bn.name}_scale", s.reshape(shape).astype(dtype)),
            g.add_initializer(f"{bn.name}_shift", (bias - mean * s).reshape(shape).astype(dtype)),
        ]
        if rank is None:
            factors, nodes = along_channels(g, factors, rank, x, bn.name)
    else:  # the same map computed in the graph, every statistic first cast to the input's type
        inputs = []
        for name in bn.input[1:5]:
            if x_type and g.elem_type(name) and g.elem_type(name) != x_type:
                nodes.append(g.node("Cast", [name], f"{bn.name}_cast", to=x_type))
                name = nodes[-1].output[0]
            inputs.append(name)
        scale, bias, mean, var = inputs
        eps_dtype = helper.tensor_dtype_to_np_dtype(x_type or g.elem_type(var) or TensorProto.FLOAT)
        eps = g.add_initializer(f"{bn.name}_epsilon", np.array(bn_epsilon(bn), dtype=eps_dtype))
        nodes.append(g.node("Add", [var, eps], f"{bn.name}_var_eps"))
        nodes.append(g.node("Sqrt", [nodes[-1].output[0]], f"{bn.name}_std"))
        nodes.append(g.node("Div", [scale, nodes[-1].output[0]], f"{bn.name}_scale"))
        s = nodes[-1].output[0]
        nodes.append(g.node("Mul", [mean, s], f"{bn.name}_mean_scaled"))
        nodes.append(g.node("Sub", [bias, nodes[-1].output[0]], f"{bn.name}_shift"))
        factors, broadcast = along_channels(g, [s, nodes[-1].output[0]], rank, x, bn.name)
        nodes += broadcast
    nodes.append(g.node("Mul", [x, factors[0]], f"{bn.name}_mul"))
    nodes.append(helper.make_node("Add", [nodes[-1].output[0], factors[1]], [y], g.fresh(f"{bn.name}_add")))
    g.replace(bn, nodes)


def fold_onnx_batchnorms(model: onnx.ModelProto) -> OnnxFoldResult:
    """A copy of ``model`` whose main graph has no BatchNormalization node: each folded into the layer
    before it, or replaced by Mul and Add with the reason it could not fold.

    Args:
        model: a self-contained model (``load_onnx``); it is not modified.

    Returns:
        OnnxFoldResult with the new model (same inputs, outputs, value_info and opset; initializers no
        longer read removed; unnamed nodes named), the folds made and the BatchNorms that could not fold,
        those inside subgraphs or functions among them (left in place).

    Raises:
        OnnxImportError: a BatchNormalization is not in the inference form (training_mode 1, its
            statistics outputs read, spatial 0), or the result fails onnx's checker.
    """
    result = OnnxFoldResult(copy_proto(model))
    g = GraphIndex(result.model)
    for bn in [n for n in g.nodes if is_batchnorm(n)]:
        check_inference_form(bn, g)
        target = _fold_target(bn, g)
        if isinstance(target, _Target):
            _fold(bn, target, g)
            result.folds.append(OnnxFold(target.layer.name, bn.name, f"{target.kind}+BatchNormalization"))
        else:
            _to_affine(bn, g)
            result.unfoldable.append(Unfoldable(bn.name, target, "Mul, Add (per-channel affine)"))
    result.model = g.finish()
    result.unfoldable += nested_batchnorms(result.model)
    return result
