"""Bring your own ONNX model: load it whole, fold its BatchNorms, read its inputs and outputs.

The ONNX counterpart of ``export.fold`` and ``export.batch_stats`` for a graph that did not come from
our trainer. It imports neither torch nor onnxscript: the serving install has onnx, onnxruntime, numpy.

Loading. A file saved with external data keeps its weights in side files named by each tensor's
``external_data`` (location, offset, length), relative to the model's folder. ``load_onnx`` reads them
into the tensors (``onnx.load_external_data_for_model``), so the proto it returns is self-contained and
can be serialized as one message: that is what the repository stores and onnxruntime is given. A
protobuf message cannot exceed 2 GB, so a model whose weights would is refused before they are read.

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

Constants are initializers, even those the graph also lists as inputs (old exporters did: normserve
feeds only the inputs ``graph_specs`` reports, which leaves initializers out), Constant nodes, and what
nodes compute from those alone, evaluated once in onnxruntime: the zero bias that torch's unoptimized
dynamo export builds for a bias-less Conv with Shape, Expand and CastLike is one. Nodes that a rewrite
leaves unread are removed, with the initializers only they read.

The batch-statistics graph (``batch_stats_graph``) replaces each BatchNorm by what PyTorch's
``train()`` mode computes, over every axis but 1 with the biased variance::

    mean_c = E[x_c],  var_c = E[(x_c - mean_c)^2],  y_c = (x_c - mean_c) / sqrt(var_c + eps) * scale_c + B_c

and returns each layer's batch mean and variance after the model's own outputs.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_model, uses_external_data

from repository import TensorSpec

__all__ = [
    "DIFFERENCE_FACTOR",
    "LEFT_IN_PLACE",
    "MAX_PROTO_BYTES",
    "ONNX_DATATYPES",
    "STATS_ATOL",
    "STATS_RTOL",
    "OnnxFold",
    "OnnxFoldResult",
    "OnnxImportError",
    "OnnxUnfoldable",
    "batch_stats_graph",
    "check_batch_stats_graph",
    "fold_onnx_batchnorms",
    "graph_specs",
    "load_onnx",
    "onnx_datatype",
]

MAX_PROTO_BYTES = 2**31 - 1  # protobuf refuses to serialize or parse a larger message
# The parity tolerance of export.verify (not imported: it imports torch): |got - ref| <= atol + rtol * |ref|.
STATS_ATOL = 1e-4
STATS_RTOL = 1e-5
DIFFERENCE_FACTOR = 100.0  # as export.batch_stats: batch and running outputs must differ by 100x the tolerance
LEFT_IN_PLACE = "nothing: left in place"
ONNX_DATATYPES: dict[int, str] = {
    TensorProto.FLOAT: "FP32",
    TensorProto.FLOAT16: "FP16",
    TensorProto.DOUBLE: "FP64",
    TensorProto.INT64: "INT64",
    TensorProto.INT32: "INT32",
    TensorProto.INT16: "INT16",
    TensorProto.INT8: "INT8",
    TensorProto.UINT8: "UINT8",
    TensorProto.BOOL: "BOOL",
}
_DEFAULT_DOMAINS = ("", "ai.onnx")
_FOLDABLE_INTO = "a Conv, ConvTranspose, Gemm or MatMul (with or without a constant bias Add)"
_STAT_ROLES = ("scale", "B", "mean", "var")
_RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
_REDUCED_OVER = {2: "N", 3: "N, L", 4: "N, H, W", 5: "N, D, H, W"}


class OnnxImportError(ValueError):
    """An ONNX file or graph normserve refuses; the message says what it found and what it expected."""


@dataclass(frozen=True)
class OnnxFold:
    layer: str  # node name of the Conv/ConvTranspose/Gemm/MatMul that absorbed the BatchNormalization
    norm: str  # node name of the BatchNormalization
    kind: str  # for example "Conv+BatchNormalization", "MatMul+Add+BatchNormalization"


@dataclass(frozen=True)
class OnnxUnfoldable:
    norm: str
    reason: str
    replaced_by: str = "Mul, Add (per-channel affine)"


@dataclass
class OnnxFoldResult:
    model: onnx.ModelProto
    folds: list[OnnxFold] = field(default_factory=list)
    unfoldable: list[OnnxUnfoldable] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# Loading


def _all_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every tensor of the model: initializers and tensor attributes, in subgraphs and functions too."""

    def in_nodes(nodes: Any) -> Iterator[TensorProto]:
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
            for _, g in _subgraphs(node):
                yield from g.initializer
                yield from in_nodes(g.node)

    yield from model.graph.initializer
    yield from in_nodes(model.graph.node)
    for fn in model.functions:
        yield from in_nodes(fn.node)


def _external_bytes(tensor: TensorProto, folder: Path) -> int:
    info = ExternalDataInfo(tensor)
    if info.length:
        return int(info.length)
    data = folder / info.location
    return max(data.stat().st_size - int(info.offset or 0), 0) if data.is_file() else 0


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    """An onnxruntime CPU session with onnxruntime's default optimizations, as the service runs it."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def load_onnx(path: Path) -> onnx.ModelProto:
    """Read an ONNX file with its external data, as one self-contained proto that onnxruntime can load.

    Args:
        path: the ``.onnx`` file; external data files are looked up relative to its folder.

    Returns:
        The model, every initializer inline.

    Raises:
        OnnxImportError: the file is missing or not ONNX, an external data file is missing or too short,
            the weights would exceed protobuf's 2 GB, or onnxruntime refuses the graph; the message
            carries onnx's or onnxruntime's own.
    """
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except OSError as e:
        raise OnnxImportError(f"cannot read {path}: {e}") from e
    except DecodeError as e:
        raise OnnxImportError(f"{path} is not an ONNX model (expected a serialized onnx.ModelProto): {e}") from e
    external = [t for t in _all_tensors(model) if uses_external_data(t)]
    total = model.ByteSize() + sum(_external_bytes(t, path.parent) for t in external)
    if total > MAX_PROTO_BYTES:
        raise OnnxImportError(
            f"{path} with its external data is {total / 2**30:.2f} GiB; a self-contained model must stay under "
            f"protobuf's 2 GiB ({MAX_PROTO_BYTES} bytes)"
        )
    try:
        load_external_data_for_model(model, str(path.parent))
    except (OSError, onnx.checker.ValidationError) as e:
        raise OnnxImportError(f"cannot read the external data of {path}: {e}") from e
    try:
        _session(model)
    except Exception as e:  # onnxruntime's errors (Fail, InvalidGraph, ...) share no base class but Exception
        raise OnnxImportError(f"onnxruntime cannot load {path}: {e}") from e
    return model


# ---------------------------------------------------------------------------------------------------------
# Graph look-ups shared by the passes


def _is_batchnorm(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in _DEFAULT_DOMAINS


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def _opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in _DEFAULT_DOMAINS:
            return int(o.version)
    raise OnnxImportError(f"the model imports opsets {[o.domain for o in model.opset_import]}, expected ai.onnx")


def _subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        for g in attr.graphs:
            yield attr.name, g


def _nested_reads(nodes: Any) -> Counter[str]:
    """Names read by nodes inside the subgraphs of ``nodes`` (an If branch may read an outer tensor)."""
    reads: Counter[str] = Counter()
    for node in nodes:
        for _, g in _subgraphs(node):
            reads.update(i for n in g.node for i in n.input if i)
            reads.update(o.name for o in g.output)
            reads += _nested_reads(g.node)
    return reads


def _names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor and node name in ``graph`` and its subgraphs."""
    names = {v.name for v in itertools.chain(graph.input, graph.output, graph.value_info, graph.initializer)}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
        for _, g in _subgraphs(node):
            names |= _names(g)
    return names


def _nested_batchnorms(model: onnx.ModelProto) -> list[OnnxUnfoldable]:
    """The BatchNormalization nodes in subgraphs and local functions, which the passes leave alone."""
    found: list[OnnxUnfoldable] = []

    def walk(nodes: Any, where: str) -> None:
        for node in nodes:
            for attr_name, g in _subgraphs(node):
                place = f"{where}the {attr_name} subgraph of {node.op_type} {node.name!r}"
                for i, inner in enumerate(g.node):
                    if _is_batchnorm(inner):
                        reason = f"it is inside {place}; only the main graph's BatchNormalization nodes are rewritten"
                        found.append(OnnxUnfoldable(inner.name or f"{inner.op_type}_{i}", reason, LEFT_IN_PLACE))
                walk(g.node, f"{place}, in ")

    walk(model.graph.node, "")
    for fn in model.functions:
        place = f"the local function {fn.domain}:{fn.name}"
        for i, inner in enumerate(fn.node):
            if _is_batchnorm(inner):
                reason = f"it is inside {place}; only the main graph's BatchNormalization nodes are rewritten"
                found.append(OnnxUnfoldable(inner.name or f"{inner.op_type}_{i}", reason, LEFT_IN_PLACE))
        walk(fn.node, f"{place}, in ")
    return found


def _inferred_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Each tensor's type and shape, as declared or as onnx's shape inference finds them."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
        inferred = model  # what the file declares is all there is
    types: dict[str, onnx.TypeProto] = {}
    for v in itertools.chain(inferred.graph.input, inferred.graph.value_info, inferred.graph.output):
        known = types.get(v.name)
        if known is None or (v.type.tensor_type.HasField("shape") and not known.tensor_type.HasField("shape")):
            types[v.name] = v.type
    for t in model.graph.initializer:
        types[t.name] = helper.make_tensor_type_proto(t.data_type, list(t.dims))
    return types


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a Constant node, or None for a sparse or string constant."""
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None


def _evaluate(node: onnx.NodeProto, inputs: list[np.ndarray | None], model: onnx.ModelProto) -> dict[str, Any]:
    """Run one node whose inputs are all known in onnxruntime: its outputs by name, or {} if it cannot run."""
    feeds = {name: v for name, v in zip(node.input, inputs, strict=True) if name and v is not None}
    graph = helper.make_graph(
        [node],
        "constant",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for n, v in feeds.items()],
        [onnx.ValueInfoProto(name=o) for o in node.output if o],
    )
    single = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    try:
        values = _session(single).run(None, feeds)
    except Exception:  # onnxruntime's errors share no base class; the value is then simply not known
        return {}
    return dict(zip([o for o in node.output if o], values, strict=True))


def _tensor_array(tensor: TensorProto) -> np.ndarray:
    if uses_external_data(tensor):
        raise OnnxImportError(
            f"initializer {tensor.name!r} keeps its data in an external file; expected a self-contained model "
            "(read it with load_onnx)"
        )
    return numpy_helper.to_array(tensor)


_Message = TypeVar("_Message", onnx.ModelProto, onnx.NodeProto, TensorProto)


def _copy(message: _Message) -> _Message:
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


class _Graph:
    """The main graph of a model as a list of nodes, with the look-ups the passes need.

    The model's nodes and initializers are taken out of it on construction; ``finish`` puts the
    rewritten ones back, without the initializers and Constant nodes that nothing reads any more.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.opset = _opset(model)
        self.types = _inferred_types(model)
        self.taken = _names(model.graph)
        self.outputs = {o.name for o in model.graph.output}
        self.nodes = [_copy(n) for n in model.graph.node]
        self.initializers = {t.name: _copy(t) for t in model.graph.initializer}
        del model.graph.node[:]
        del model.graph.initializer[:]
        self.nested_reads = _nested_reads(self.nodes)
        for i, node in enumerate(self.nodes):
            if not node.name:
                node.name = self.fresh(f"{node.op_type}_{i}")
        self.computed: dict[str, np.ndarray | None] = {}
        self.reindex()
        self.read_before = set(self.readers)

    def reindex(self) -> None:
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.readers: Counter[str] = Counter(i for n in self.nodes for i in n.input if i) + self.nested_reads

    def fresh(self, hint: str) -> str:
        name = hint
        for k in itertools.count(1):
            if name not in self.taken:
                break
            name = f"{hint}_{k}"
        self.taken.add(name)
        return name

    def constant(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is an initializer, a Constant node's output, or computed from those
        alone (the zero bias an unoptimized dynamo export builds with Shape and Expand), else None."""
        if name in self.initializers:
            return _tensor_array(self.initializers[name])
        node = self.producer.get(name)
        if node is None or node.domain not in _DEFAULT_DOMAINS:
            return None
        if node.op_type == "Constant":
            return _constant_value(node)
        if node.op_type == "CastLike":  # input 1 gives only its dtype
            value, to = self.constant(node.input[0]), self.elem_type(node.input[1])
            return None if value is None or to is None else value.astype(helper.tensor_dtype_to_np_dtype(to))
        if name not in self.computed:
            self.computed[name] = None  # also marks the node as being evaluated, should the graph loop
            inputs = [self.constant(i) if i else None for i in node.input]
            if node.op_type not in _RANDOM_OPS and all(
                v is not None for v, i in zip(inputs, node.input, strict=True) if i
            ):
                self.computed.update(_evaluate(node, inputs, self.model))
        return self.computed.get(name)

    def value(self, name: str) -> np.ndarray:
        """The value of ``name``, which must be constant."""
        value = self.constant(name)
        if value is None:
            raise OnnxImportError(f"{name!r} is computed in the graph; expected an initializer or a Constant node")
        return value

    def add_initializer(self, hint: str, value: np.ndarray) -> str:
        name = self.fresh(hint)
        self.initializers[name] = numpy_helper.from_array(np.ascontiguousarray(value), name)
        return name

    def rank(self, name: str) -> int | None:
        t = self.types.get(name)
        if t is None or not t.tensor_type.HasField("shape"):
            return None
        return len(t.tensor_type.shape.dim)

    def elem_type(self, name: str) -> int | None:
        t = self.types.get(name)
        return t.tensor_type.elem_type if t is not None and t.tensor_type.elem_type else None

    def node(self, op: str, inputs: list[str], hint: str, **attrs: Any) -> onnx.NodeProto:
        """A new node with one fresh output, named after ``hint``."""
        return helper.make_node(op, inputs, [self.fresh(f"{hint}_out")], self.fresh(hint), **attrs)

    def replace(self, old: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
        at = next(i for i, n in enumerate(self.nodes) if n is old)
        self.nodes[at : at + 1] = new
        self.reindex()

    def finish(self) -> onnx.ModelProto:
        """Write the nodes and initializers back, drop what became unread, and check the model."""
        graph = self.model.graph
        while True:  # nodes whose outputs the rewrite left unread, and then the nodes that fed them
            orphans = {
                id(n)
                for n in self.nodes
                if all(self.unread(o) for o in n.output if o) and self.read_before & set(n.output)
            }
            if not orphans:
                break
            self.nodes = [n for n in self.nodes if id(n) not in orphans]
            self.reindex()
        dropped = {name for name in self.initializers if name in self.read_before and self.unread(name)}
        graph.node.extend(self.nodes)
        graph.initializer.extend(t for name, t in self.initializers.items() if name not in dropped)
        kept_inputs = [i for i in graph.input if i.name not in dropped]
        del graph.input[:]
        graph.input.extend(kept_inputs)
        self.reindex()
        live = set(self.readers) | set(self.producer) | {i.name for i in graph.input} | set(self.initializers)
        kept_info = [v for v in graph.value_info if v.name in live and v.name not in dropped]
        del graph.value_info[:]
        graph.value_info.extend(kept_info)
        try:
            onnx.checker.check_model(self.model)
        except onnx.checker.ValidationError as e:
            raise OnnxImportError(f"the rewritten graph fails onnx's checker (expected a valid model): {e}") from e
        return self.model

    def unread(self, name: str) -> bool:
        return self.readers[name] == 0 and name not in self.outputs


def _check_inference_form(bn: onnx.NodeProto, g: _Graph) -> None:
    """Refuse a BatchNormalization that is not the inference form: it has no fixed affine map."""
    if _attr(bn, "training_mode", 0):
        raise OnnxImportError(
            f"BatchNormalization {bn.name!r} has training_mode=1; expected the inference form (training_mode 0)"
        )
    if not _attr(bn, "spatial", 1):
        raise OnnxImportError(
            f"BatchNormalization {bn.name!r} has spatial=0 (statistics per activation); expected per-channel ones"
        )
    used = [o for o in bn.output[1:] if o and not g.unread(o)]
    if used:
        raise OnnxImportError(
            f"BatchNormalization {bn.name!r} has its outputs {used} read; expected the inference form (one output)"
        )


def _eps(bn: onnx.NodeProto) -> float:
    return float(_attr(bn, "epsilon", 1e-5))


def _f32(x: float) -> float:
    """A float32 attribute as the shortest decimal that reads back to it (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(x)))


# ---------------------------------------------------------------------------------------------------------
# Folding


@dataclass(frozen=True)
class _Target:
    kind: str  # "Conv", "ConvTranspose", "Gemm", "MatMul+Add" or "MatMul"
    layer: onnx.NodeProto  # the Conv, ConvTranspose, Gemm or MatMul
    bias_add: onnx.NodeProto | None = None  # the Add of MatMul+Add


def _matmul_target(mm: onnx.NodeProto, g: _Graph, channels: int) -> str | None:
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


def _fold_target(bn: onnx.NodeProto, g: _Graph) -> _Target | str:
    """The layer ``bn`` folds into, or the reason it cannot."""
    for role, name in zip(_STAT_ROLES, bn.input[1:5], strict=True):
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
    if layer.domain not in _DEFAULT_DOMAINS:
        return f"its input comes from {layer.domain}:{layer.op_type} {layer.name!r}, not from {_FOLDABLE_INTO}"
    if layer.op_type in ("Conv", "ConvTranspose", "Gemm"):
        if any(g.constant(name) is None for name in layer.input[1:] if name):
            return f"{layer.op_type} {layer.name!r} has weights computed in the graph; expected constants"
        w = g.value(layer.input[1])
        if layer.op_type == "Conv":
            out = w.shape[0]
        elif layer.op_type == "ConvTranspose":
            out = w.shape[1] * int(_attr(layer, "group", 1))
        else:
            out = w.shape[0] if _attr(layer, "transB", 0) else w.shape[1]
        if out != channels:
            return f"{layer.op_type} {layer.name!r} has {out} output channels, the BatchNormalization {channels}"
        return _Target(layer.op_type, layer)
    if layer.op_type == "MatMul":
        reason = _matmul_target(layer, g, channels)
        return reason or _Target("MatMul", layer)
    if layer.op_type == "Add":
        for k in (0, 1):
            mm, bias = g.producer.get(layer.input[k]), g.constant(layer.input[1 - k])
            if mm is None or mm.op_type != "MatMul" or mm.domain not in _DEFAULT_DOMAINS or bias is None:
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


def _fold(bn: onnx.NodeProto, target: _Target, g: _Graph) -> None:
    """Merge ``bn`` into ``target``'s weights; the layer's output takes the BatchNorm's output name."""
    s, mean, bias = _scale([g.value(n) for n in bn.input[1:5]], _eps(bn))
    layer = target.layer
    w = g.value(layer.input[1])
    w64 = w.astype(np.float64)
    if target.kind == "Conv":
        w_new = w64 * s.reshape((-1,) + (1,) * (w.ndim - 1))
        old_b = g.value(layer.input[2]) if len(layer.input) > 2 and layer.input[2] else None
    elif target.kind == "ConvTranspose":
        group = int(_attr(layer, "group", 1))
        kernel = w.shape[2:]
        grouped = w64.reshape(group, w.shape[0] // group, w.shape[1], *kernel)  # (G, C_in/G, M/G, k...)
        w_new = (grouped * s.reshape(group, 1, w.shape[1], *(1,) * len(kernel))).reshape(w.shape)
        old_b = g.value(layer.input[2]) if len(layer.input) > 2 and layer.input[2] else None
    elif target.kind == "Gemm":
        w_new = w64 * (s[:, None] if _attr(layer, "transB", 0) else s[None, :])
        c = g.value(layer.input[2]) if len(layer.input) > 2 and layer.input[2] else None
        old_b = None if c is None else float(_attr(layer, "beta", 1.0)) * c.astype(np.float64)
        _set_attr(layer, "beta", 1.0)
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


def _along_channels(g: _Graph, names: list[str], rank: int | None, x: str, hint: str) -> tuple[list[str], list[Any]]:
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


def _producer_rank(g: _Graph, x: str) -> int | None:
    """The rank of ``x`` from the layer that produces it, when shape inference gave none."""
    layer = g.producer.get(x)
    if layer is None:
        return None
    if layer.op_type in ("Conv", "ConvTranspose"):
        w = g.constant(layer.input[1])
        return None if w is None else w.ndim
    return 2 if layer.op_type == "Gemm" else None


def _to_affine(bn: onnx.NodeProto, g: _Graph) -> None:
    """Replace ``bn`` by x * s + (B - mean * s), s and the shift shaped to broadcast along axis 1."""
    x, y = bn.input[0], bn.output[0]
    rank = g.rank(x) or g.rank(y) or _producer_rank(g, x)
    x_type = g.elem_type(x) or g.elem_type(y)
    nodes: list[onnx.NodeProto] = []
    if all(g.constant(n) is not None for n in bn.input[1:5]):
        stats = [g.value(n) for n in bn.input[1:5]]
        s, mean, bias = _scale(stats, _eps(bn))
        dtype = helper.tensor_dtype_to_np_dtype(x_type) if x_type else stats[0].dtype
        shape = (-1,) if rank is None else (-1,) + (1,) * (rank - 2)
        factors = [
            g.add_initializer(f"{bn.name}_scale", s.reshape(shape).astype(dtype)),
            g.add_initializer(f"{bn.name}_shift", (bias - mean * s).reshape(shape).astype(dtype)),
        ]
        if rank is None:
            factors, nodes = _along_channels(g, factors, rank, x, bn.name)
    else:  # the same map computed in the graph, every statistic first cast to the input's type
        inputs = []
        for name in bn.input[1:5]:
            if x_type and g.elem_type(name) and g.elem_type(name) != x_type:
                nodes.append(g.node("Cast", [name], f"{bn.name}_cast", to=x_type))
                name = nodes[-1].output[0]
            inputs.append(name)
        scale, bias, mean, var = inputs
        eps_dtype = helper.tensor_dtype_to_np_dtype(x_type or g.elem_type(var) or TensorProto.FLOAT)
        eps = g.add_initializer(f"{bn.name}_epsilon", np.array(_eps(bn), dtype=eps_dtype))
        nodes.append(g.node("Add", [var, eps], f"{bn.name}_var_eps"))
        nodes.append(g.node("Sqrt", [nodes[-1].output[0]], f"{bn.name}_std"))
        nodes.append(g.node("Div", [scale, nodes[-1].output[0]], f"{bn.name}_scale"))
        s = nodes[-1].output[0]
        nodes.append(g.node("Mul", [mean, s], f"{bn.name}_mean_scaled"))
        nodes.append(g.node("Sub", [bias, nodes[-1].output[0]], f"{bn.name}_shift"))
        factors, broadcast = _along_channels(g, [s, nodes[-1].output[0]], rank, x, bn.name)
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
    result = OnnxFoldResult(_copy(model))
    g = _Graph(result.model)
    for bn in [n for n in g.nodes if _is_batchnorm(n)]:
        _check_inference_form(bn, g)
        target = _fold_target(bn, g)
        if isinstance(target, _Target):
            _fold(bn, target, g)
            result.folds.append(OnnxFold(target.layer.name, bn.name, f"{target.kind}+BatchNormalization"))
        else:
            _to_affine(bn, g)
            result.unfoldable.append(OnnxUnfoldable(bn.name, target))
    result.model = g.finish()
    result.unfoldable += _nested_batchnorms(result.model)
    return result


# ---------------------------------------------------------------------------------------------------------
# Inputs and outputs


def onnx_datatype(elem_type: int) -> str:
    """The Open Inference Protocol datatype ("FP32", "INT64", ...) of an ONNX ``TensorProto`` element type.

    Raises:
        OnnxImportError: the type has no fixed-size datatype normserve serves (strings, bfloat16, ...).
    """
    if elem_type not in ONNX_DATATYPES:
        name = TensorProto.DataType.Name(elem_type) if elem_type in TensorProto.DataType.values() else "unknown"
        raise OnnxImportError(
            f"ONNX element type {name} ({elem_type}) has no Open Inference Protocol datatype; expected one of "
            f"{', '.join(TensorProto.DataType.Name(t) for t in ONNX_DATATYPES)}"
        )
    return ONNX_DATATYPES[elem_type]


def _dims(tensor_type: onnx.TypeProto.Tensor) -> list[int | str | None]:
    """Each axis: its size, its symbolic name, or None when the file says nothing (or a size below 1, as -1)."""
    dims: list[int | str | None] = []
    for d in tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or None)
    return dims


def graph_specs(model: onnx.ModelProto, max_batch_size: int = 64) -> tuple[list[TensorSpec], list[TensorSpec], int]:
    """The inputs, outputs and maximum batch size of ``model``'s config, read from the graph.

    Inputs are the graph inputs that are not initializers. When the first axis of every input and
    output is symbolic (or unknown), it is the batch axis: it becomes -1 and the maximum batch size is
    ``max_batch_size``; otherwise the model takes no batch axis and the maximum batch size is 0.

    Raises:
        OnnxImportError: a tensor is not a tensor, has a datatype normserve does not serve, has no shape,
            or has a symbolic or unknown axis other than the batch axis (one sample's shape must be fixed).
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    types = _inferred_types(model)
    initializers = {t.name for t in model.graph.initializer}
    tensors = [("input", v.name) for v in model.graph.input if v.name not in initializers]
    tensors += [("output", v.name) for v in model.graph.output]
    if not any(kind == "input" for kind, _ in tensors):
        raise OnnxImportError("the graph has no input besides its initializers; expected at least one")
    shapes: dict[str, list[int | str | None]] = {}
    datatypes: dict[str, str] = {}
    for kind, name in tensors:
        t = types.get(name)
        if t is None or t.WhichOneof("value") != "tensor_type":
            got = "of unknown type" if t is None else f"a {t.WhichOneof('value')}"
            raise OnnxImportError(f"{kind} {name!r} is {got}; expected a tensor")
        try:
            datatypes[name] = onnx_datatype(t.tensor_type.elem_type)
        except OnnxImportError as e:
            raise OnnxImportError(f"{kind} {name!r}: {e}") from e
        if not t.tensor_type.HasField("shape"):
            raise OnnxImportError(f"{kind} {name!r} has no shape (its rank is unknown); expected a declared shape")
        shapes[name] = _dims(t.tensor_type)
    batched = all(len(shapes[name]) >= 1 and not isinstance(shapes[name][0], int) for _, name in tensors)
    specs: dict[str, list[TensorSpec]] = {"input": [], "output": []}
    for kind, name in tensors:
        dims = shapes[name]
        for axis, d in enumerate(dims[1:] if batched else dims, start=1 if batched else 0):
            if not isinstance(d, int):
                what = f"symbolic ({d!r})" if d else "of unknown size"
                batch = " (a symbolic first axis is the batch axis only when every input and output has one)"
                raise OnnxImportError(
                    f"{kind} {name!r} axis {axis} is {what}; normserve serves a fixed shape per sample, expected a "
                    f"fixed size{batch if axis == 0 else ''}"
                )
        shape = [d if isinstance(d, int) else -1 for d in dims]  # only the batch axis is not an int by now
        specs[kind].append(TensorSpec.model_validate({"name": name, "datatype": datatypes[name], "shape": shape}))
    return specs["input"], specs["output"], max_batch_size if batched else 0


# ---------------------------------------------------------------------------------------------------------
# The batch-statistics graph


def _run_exposed(
    model: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray]
) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """Run ``model`` on ``feeds`` with the tensors ``names`` exposed as extra outputs.

    Returns the model's own outputs and the exposed tensors by name.
    """
    exposed = _copy(model)
    types = _inferred_types(model)
    outputs = [o.name for o in model.graph.output]
    for name in dict.fromkeys(names):
        if name not in outputs:
            info = onnx.ValueInfoProto(name=name)
            if name in types:
                info.type.CopyFrom(types[name])
            exposed.graph.output.append(info)
    try:
        session = _session(exposed)
        values = session.run(None, feeds)
    except Exception as e:  # onnxruntime's errors share no base class but Exception
        raise OnnxImportError(f"onnxruntime cannot run the graph on the given inputs: {e}") from e
    by_name = dict(zip([o.name for o in exposed.graph.output], values, strict=True))
    return values[: len(outputs)], by_name


def _main_batchnorms(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if _is_batchnorm(n)]


def _stat_names(i: int) -> tuple[str, str]:
    return f"batch_mean.{i}", f"batch_var.{i}"


def _batch_norm_nodes(bn: onnx.NodeProto, g: _Graph, rank: int, x_type: int) -> tuple[list[Any], str, str]:
    """The nodes that normalize ``bn``'s input with its batch's statistics; and where its mean and var are."""
    x, name = bn.input[0], bn.name
    dtype = helper.tensor_dtype_to_np_dtype(x_type)
    axes = [0, *range(2, rank)]
    nodes: list[onnx.NodeProto] = []
    axes_name = g.add_initializer(f"{name}_axes", np.array(axes, dtype=np.int64)) if g.opset >= 18 else ""

    def reduce_mean(t: str, hint: str) -> str:
        if axes_name:  # from opset 18 ReduceMean takes its axes as an input
            nodes.append(g.node("ReduceMean", [t, axes_name], hint, keepdims=1))
        else:
            nodes.append(g.node("ReduceMean", [t], hint, axes=axes, keepdims=1))
        return str(nodes[-1].output[0])

    mean = reduce_mean(x, f"{name}_batch_mean")  # (1, C, 1, ...)
    nodes.append(g.node("Sub", [x, mean], f"{name}_centred"))
    centred = nodes[-1].output[0]
    nodes.append(g.node("Mul", [centred, centred], f"{name}_squared"))
    var = reduce_mean(nodes[-1].output[0], f"{name}_batch_var")  # biased, as train() normalizes
    eps = g.add_initializer(f"{name}_epsilon", np.array(_eps(bn), dtype=dtype))
    nodes.append(g.node("Add", [var, eps], f"{name}_var_eps"))
    nodes.append(g.node("Sqrt", [nodes[-1].output[0]], f"{name}_std"))
    nodes.append(g.node("Div", [centred, nodes[-1].output[0]], f"{name}_normalized"))
    normalized = nodes[-1].output[0]
    factors = []
    for role, t in zip(("scale", "B"), bn.input[1:3], strict=True):
        value = g.constant(t)
        if value is not None:
            factors.append(g.add_initializer(f"{name}_{role}", value.astype(dtype).reshape(-1, *[1] * (rank - 2))))
            continue
        if g.elem_type(t) != x_type:
            nodes.append(g.node("Cast", [t], f"{name}_{role}_cast", to=x_type))
            t = nodes[-1].output[0]
        shaped, reshape = _along_channels(g, [t], rank, x, f"{name}_{role}")
        nodes += reshape
        factors.append(shaped[0])
    nodes.append(g.node("Mul", [normalized, factors[0]], f"{name}_mul"))
    nodes.append(helper.make_node("Add", [nodes[-1].output[0], factors[1]], [bn.output[0]], g.fresh(f"{name}_add")))
    return nodes, mean, var


def batch_stats_graph(
    model: onnx.ModelProto, example: dict[str, np.ndarray]
) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """The batch-statistics graph of an imported model (before folding), and its BatchNorm layers.

    Every main-graph BatchNormalization normalizes with the statistics of the batch in front of it, as
    PyTorch's ``train()`` mode does; after the model's outputs the graph returns ``batch_mean.<i>`` and
    ``batch_var.<i>``, each (C,), for BatchNorm i in graph order.

    Args:
        model: a self-contained model with BatchNormalization nodes; it is not modified.
        example: feeds for every input; run once to learn each BatchNorm input's rank and positions.

    Returns:
        The graph, and per BatchNorm a dict with the fields of ``repository.schema.BatchNormLayer``.

    Raises:
        OnnxImportError: the model has no BatchNormalization, one sits inside a subgraph or function,
            one is not in the inference form or has statistics computed in the graph, a name
            ``batch_mean.<i>`` is taken, or the example does not run.
    """
    nested = _nested_batchnorms(model)
    if nested:
        raise OnnxImportError(
            f"BatchNormalization {nested[0].norm!r}: {nested[0].reason}; expected every one in the main graph"
        )
    if not _main_batchnorms(model):
        raise OnnxImportError(
            "the model has no BatchNormalization node; expected at least one (a batch-statistics graph would "
            "equal the served one)"
        )
    out = _copy(model)
    g = _Graph(out)
    bns = [n for n in g.nodes if _is_batchnorm(n)]
    for bn in bns:
        _check_inference_form(bn, g)
        for role, name in zip(_STAT_ROLES[2:], bn.input[3:5], strict=True):
            if g.constant(name) is None:
                raise OnnxImportError(
                    f"BatchNormalization {bn.name!r}'s running {role} {name!r} is computed in the graph; "
                    "expected a constant"
                )
    for i in range(len(bns)):
        taken = [n for n in _stat_names(i) if n in g.taken]
        if taken:
            raise OnnxImportError(f"the graph already has a tensor {taken[0]!r}; expected the name free for statistics")
    _, seen = _run_exposed(model, [bn.input[0] for bn in bns], example)
    layers: list[dict[str, Any]] = []
    for i, bn in enumerate(bns):
        x = seen[bn.input[0]]
        running_mean, running_var = g.value(bn.input[3]), g.value(bn.input[4])
        channels = running_mean.size
        if x.ndim < 2 or x.shape[1] != channels:
            raise OnnxImportError(
                f"BatchNormalization {bn.name!r} receives shape {list(x.shape)}; expected (N, {channels}, ...)"
            )
        x_type = helper.np_dtype_to_tensor_dtype(x.dtype)
        nodes, mean, var = _batch_norm_nodes(bn, g, x.ndim, x_type)
        mean_name, var_name = _stat_names(i)
        flat = g.add_initializer(f"{bn.name}_flat", np.array([channels], dtype=np.int64))
        nodes.append(helper.make_node("Reshape", [mean, flat], [mean_name], g.fresh(f"{bn.name}_mean_out")))
        nodes.append(helper.make_node("Reshape", [var, flat], [var_name], g.fresh(f"{bn.name}_var_out")))
        g.taken.update((mean_name, var_name))
        g.replace(bn, nodes)
        out.graph.output.extend(helper.make_tensor_value_info(n, x_type, [channels]) for n in (mean_name, var_name))
        g.outputs.update((mean_name, var_name))
        layers.append(
            {
                "name": bn.name,
                "type": "BatchNormalization",
                "channels": channels,
                "channel_axis": 1,
                "reduced_over": _REDUCED_OVER.get(x.ndim, "every axis but 1"),
                "positions": int(np.prod(x.shape[2:], dtype=np.int64)),
                "eps": _f32(_eps(bn)),
                "momentum": _f32(1.0 - _f32(_attr(bn, "momentum", 0.9))),  # PyTorch weighs the new value
                "running_mean": running_mean.astype(np.float64).reshape(-1).tolist(),
                "running_var": running_var.astype(np.float64).reshape(-1).tolist(),
                "mean_output": mean_name,
                "var_output": var_name,
            }
        )
    return g.finish(), layers


def _within(got: list[np.ndarray], want: list[np.ndarray]) -> tuple[float, float]:
    """The largest |got - want|, and the largest |got - want| / (atol + rtol |want|); inf on a shape mismatch."""
    diff = worst = 0.0
    for a, b in zip(got, want, strict=True):
        if a.shape != b.shape:
            return float("inf"), float("inf")
        d = np.abs(a.astype(np.float64) - b.astype(np.float64))
        if d.size:
            diff = max(diff, float(d.max()))
            worst = max(worst, float((d / (STATS_ATOL + STATS_RTOL * np.abs(b.astype(np.float64)))).max()))
    return diff, worst


def _channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance of ``x`` over every axis but 1, in float64."""
    axes = (0, *range(2, x.ndim))
    x64 = x.astype(np.float64)
    return x64.mean(axis=axes), x64.var(axis=axes)


def check_batch_stats_graph(
    original: onnx.ModelProto, graph: onnx.ModelProto, feeds: dict[str, np.ndarray], batched: bool = True
) -> dict[str, Any]:
    """Prove that ``graph`` (from ``batch_stats_graph``) normalizes with the batch's statistics and reports them.

    Four checks on the batch ``feeds`` (every input batched along axis 0, more than one row):

    - ``statistics``: onnxruntime runs ``original`` with each BatchNorm's running mean and variance
      replaced by those ``graph`` reports; numpy's float64 mean and biased variance of each BatchNorm's
      input there must equal the reported ones. In that run the first BatchNorm's input is the batch's
      own, so its statistics must be right; given those, the second's input is the train()-mode one,
      and so on: every reported pair is the true train()-mode statistics.
    - ``train_mode_output``: the model's outputs from ``graph`` equal that run's, where onnxruntime's own
      BatchNormalization kernel normalizes with the batch's statistics.
    - ``differs_from_running``: ``graph``'s first output differs from ``original``'s (running statistics)
      by at least ``DIFFERENCE_FACTOR`` times the tolerance.
    - ``repeated_sample``: the first sample repeated twice gives the same statistics and rows as that
      sample alone, as the biased variance (not the unbiased one) does. Not for a graph without a batch
      axis (``batched=False``): its one fixed-size input cannot be repeated.

    Returns:
        {"passed": bool, "detail": str, "figures": {check: figures, ...}}; tolerance |diff| <= 1e-4 + 1e-5 |ref|.
    """
    bns = _main_batchnorms(original)
    count = len(original.graph.output)
    got, _ = _run_exposed(graph, [], feeds)
    outputs, stats = got[:count], got[count:]
    figures: dict[str, Any] = {"atol": STATS_ATOL, "rtol": STATS_RTOL, "layers": len(bns)}
    if len(stats) != 2 * len(bns):
        detail = f"the graph returns {len(stats)} statistics after the model's outputs, expected {2 * len(bns)}"
        return {"passed": False, "detail": detail, "figures": figures}

    reference = _copy(original)
    taken = _names(reference.graph)
    dtypes = {t.name: helper.tensor_dtype_to_np_dtype(t.data_type) for t in reference.graph.initializer}
    for i, bn in enumerate(n for n in reference.graph.node if _is_batchnorm(n)):
        for k, value in zip((3, 4), stats[2 * i : 2 * i + 2], strict=True):
            name = f"{bn.input[k]}_batch.{i}"
            while name in taken:
                name += "_"
            taken.add(name)
            reference.graph.initializer.append(
                numpy_helper.from_array(value.astype(dtypes.get(bn.input[k], value.dtype)), name)
            )
            bn.input[k] = name
    ref_outputs, seen = _run_exposed(reference, [bn.input[0] for bn in bns], feeds)
    expected = [s for bn in bns for s in _channel_stats(seen[bn.input[0]])]
    diff, worst = _within(stats, expected)
    figures["statistics"] = {"max_abs_diff": diff, "worst_diff_over_tolerance": worst}
    checks = {
        "statistics": (
            worst <= 1.0,
            f"batch mean/variance of {len(bns)} layer(s) within {worst:.3g} of the allowed tolerance of numpy's "
            "on each layer's train()-mode input (expected <= 1)",
        )
    }
    diff, worst = _within(outputs, ref_outputs)
    figures["train_mode_output"] = {"max_abs_diff": diff, "worst_diff_over_tolerance": worst}
    checks["train_mode_output"] = (
        worst <= 1.0 and all(bool(np.isfinite(o).all()) for o in outputs),
        f"outputs within {worst:.3g} of the allowed tolerance of onnxruntime's BatchNormalization run with the "
        "batch's statistics (expected <= 1)",
    )

    rows = min((len(v) for v in feeds.values() if v.ndim), default=0)
    running, _ = _run_exposed(original, [], feeds)
    diff, worst = _within(outputs[:1], running[:1])
    figures["differs_from_running"] = {"rows": rows, "max_abs_diff": diff, "diff_over_tolerance": worst}
    checks["differs_from_running"] = (
        rows > 1 and worst >= DIFFERENCE_FACTOR,
        f"on {rows} rows, the first output differs from the running-statistics one by {worst:.3g}x the tolerance "
        f"(expected a batch of more than 1 row and >= {DIFFERENCE_FACTOR:g}x)",
    )

    if not batched:
        return _verdict(checks, figures)
    alone, _ = _run_exposed(graph, [], {k: v[:1] for k, v in feeds.items()})
    twice, _ = _run_exposed(graph, [], {k: np.concatenate([v[:1], v[:1]]) for k, v in feeds.items()})
    rows_twice = [o[i : i + 1] for o in twice[:count] for i in (0, 1)]
    rows_alone = [o for o in alone[:count] for _ in (0, 1)]
    diff, worst = _within(rows_twice + twice[count:], rows_alone + alone[count:])
    figures["repeated_sample"] = {"max_abs_diff": diff, "worst_diff_over_tolerance": worst}
    checks["repeated_sample"] = (
        worst <= 1.0,
        f"a sample repeated twice against the sample alone: outputs and statistics within {worst:.3g} of the "
        "allowed tolerance (expected <= 1)",
    )
    return _verdict(checks, figures)


def _verdict(checks: dict[str, tuple[bool, str]], figures: dict[str, Any]) -> dict[str, Any]:
    passed = all(ok for ok, _ in checks.values())
    detail = "; ".join(f"{name}: {text}" for name, (_, text) in checks.items())
    figures["passed"] = {name: ok for name, (ok, _) in checks.items()}
    return {"passed": passed, "detail": detail, "figures": figures}
