"""A user's ONNX file read whole, its inputs and outputs, and the graph look-ups the ONNX passes share.

The ONNX side of bringing your own model (``export.onnx_fold`` folds its BatchNorms,
``export.onnx_batch_stats`` builds its batch-statistics graph). It imports neither torch nor onnxscript:
the serving install has onnx, onnxruntime and numpy.

Loading. A file saved with external data keeps its weights in side files named by each tensor's
``external_data`` (location, offset, length), relative to the model's folder. ``load_onnx`` reads them
into the tensors (``onnx.load_external_data_for_model``), so the proto it returns is self-contained and
can be serialized as one message: that is what the repository stores and onnxruntime is given. A
protobuf message cannot exceed 2 GB, so a model whose weights would is refused before they are read.

Inputs and outputs (``graph_specs``). The config is completed from the graph: names, datatypes, dims.
A first axis that is symbolic or -1 on every input and output is the batch axis; otherwise the model
has none and is served with ``max_batch_size`` 0, its shapes as declared.

Constants are initializers, even those the graph also lists as inputs (old exporters did: normserve
feeds only the inputs ``graph_specs`` reports, which leaves initializers out), Constant nodes, and what
nodes compute from those alone, evaluated once in onnxruntime: the zero bias that torch's unoptimized
dynamo export builds for a bias-less Conv with Shape, Expand and CastLike is one. Nodes that a rewrite
leaves unread are removed, with the initializers only they read.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
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
    "DEFAULT_DOMAINS",
    "MAX_PROTO_BYTES",
    "ONNX_DATATYPES",
    "STAT_ROLES",
    "GraphIndex",
    "OnnxImportError",
    "as_f32",
    "bn_epsilon",
    "check_inference_form",
    "copy_proto",
    "graph_names",
    "graph_specs",
    "inferred_types",
    "is_batchnorm",
    "load_onnx",
    "node_attr",
    "node_subgraphs",
    "onnx_datatype",
    "ort_session",
    "set_node_attr",
]

MAX_PROTO_BYTES = 2**31 - 1  # protobuf refuses to serialize or parse a larger message
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
DEFAULT_DOMAINS = ("", "ai.onnx")
STAT_ROLES = ("scale", "B", "mean", "var")  # BatchNormalization's inputs after X, in order
_RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}


class OnnxImportError(ValueError):
    """An ONNX file or graph normserve refuses; the message says what it found and what it expected."""


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
            for _, g in node_subgraphs(node):
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


def ort_session(model: onnx.ModelProto) -> ort.InferenceSession:
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
        ort_session(model)
    except Exception as e:  # onnxruntime's errors (Fail, InvalidGraph, ...) share no base class but Exception
        raise OnnxImportError(f"onnxruntime cannot load {path}: {e}") from e
    return model


# ---------------------------------------------------------------------------------------------------------
# Graph look-ups shared by the passes


def is_batchnorm(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in DEFAULT_DOMAINS


def node_attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def set_node_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def _opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in DEFAULT_DOMAINS:
            return int(o.version)
    raise OnnxImportError(f"the model imports opsets {[o.domain for o in model.opset_import]}, expected ai.onnx")


def node_subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        for g in attr.graphs:
            yield attr.name, g


def _nested_reads(nodes: Any) -> Counter[str]:
    """Names read by nodes inside the subgraphs of ``nodes`` (an If branch may read an outer tensor)."""
    reads: Counter[str] = Counter()
    for node in nodes:
        for _, g in node_subgraphs(node):
            reads.update(i for n in g.node for i in n.input if i)
            reads.update(o.name for o in g.output)
            reads += _nested_reads(g.node)
    return reads


def graph_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor and node name in ``graph`` and its subgraphs."""
    names = {v.name for v in itertools.chain(graph.input, graph.output, graph.value_info, graph.initializer)}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
        for _, g in node_subgraphs(node):
            names |= graph_names(g)
    return names


def inferred_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
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
        values = ort_session(single).run(None, feeds)
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


def copy_proto(message: _Message) -> _Message:
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


class GraphIndex:
    """The main graph of a model as a list of nodes, with the look-ups the passes need.

    The model's nodes and initializers are taken out of it on construction; ``finish`` puts the
    rewritten ones back, without the initializers and Constant nodes that nothing reads any more.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.opset = _opset(model)
        self.types = inferred_types(model)
        self.taken = graph_names(model.graph)
        self.outputs = {o.name for o in model.graph.output}
        self.nodes = [copy_proto(n) for n in model.graph.node]
        self.initializers = {t.name: copy_proto(t) for t in model.graph.initializer}
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
        if node is None or node.domain not in DEFAULT_DOMAINS:
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


def check_inference_form(bn: onnx.NodeProto, g: GraphIndex) -> None:
    """Refuse a BatchNormalization that is not the inference form: it has no fixed affine map."""
    if node_attr(bn, "training_mode", 0):
        raise OnnxImportError(
            f"BatchNormalization {bn.name!r} has training_mode=1; expected the inference form (training_mode 0)"
        )
    if not node_attr(bn, "spatial", 1):
        raise OnnxImportError(
            f"BatchNormalization {bn.name!r} has spatial=0 (statistics per activation); expected per-channel ones"
        )
    used = [o for o in bn.output[1:] if o and not g.unread(o)]
    if used:
        raise OnnxImportError(
            f"BatchNormalization {bn.name!r} has its outputs {used} read; expected the inference form (one output)"
        )


def bn_epsilon(bn: onnx.NodeProto) -> float:
    return float(node_attr(bn, "epsilon", 1e-5))


def as_f32(x: float) -> float:
    """A float32 attribute as the shortest decimal that reads back to it (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(x)))


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
    types = inferred_types(model)
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
