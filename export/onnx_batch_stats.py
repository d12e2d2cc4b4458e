"""The batch-statistics graph of an imported ONNX model, built from its BatchNormalization nodes' own statistics.

What ``export.batch_stats`` does for a PyTorch module, for an ONNX graph (before folding), without torch.

The batch-statistics graph (``batch_stats_graph``) replaces each BatchNorm by what PyTorch's
``train()`` mode computes, over every axis but 1 with the biased variance::

    mean_c = E[x_c],  var_c = E[(x_c - mean_c)^2],  y_c = (x_c - mean_c) / sqrt(var_c + eps) * scale_c + B_c

and returns each layer's batch mean and variance after the model's own outputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from export.onnx_fold import along_channels, nested_batchnorms
from export.onnx_graph import (
    STAT_ROLES,
    GraphIndex,
    OnnxImportError,
    as_f32,
    bn_epsilon,
    check_inference_form,
    copy_proto,
    graph_names,
    inferred_types,
    is_batchnorm,
    node_attr,
    ort_session,
)

__all__ = ["DIFFERENCE_FACTOR", "STATS_ATOL", "STATS_RTOL", "batch_stats_graph", "check_batch_stats_graph"]

# The parity tolerance of export.verify (not imported: it imports torch): |got - ref| <= atol + rtol * |ref|.
STATS_ATOL = 1e-4
STATS_RTOL = 1e-5
DIFFERENCE_FACTOR = 100.0  # as export.batch_stats: batch and running outputs must differ by 100x the tolerance
_REDUCED_OVER = {2: "N", 3: "N, L", 4: "N, H, W", 5: "N, D, H, W"}


# ---------------------------------------------------------------------------------------------------------
# The batch-statistics graph


def _run_exposed(
    model: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray]
) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """Run ``model`` on ``feeds`` with the tensors ``names`` exposed as extra outputs.

    Returns the model's own outputs and the exposed tensors by name.
    """
    exposed = copy_proto(model)
    types = inferred_types(model)
    outputs = [o.name for o in model.graph.output]
    for name in dict.fromkeys(names):
        if name not in outputs:
            info = onnx.ValueInfoProto(name=name)
            if name in types:
                info.type.CopyFrom(types[name])
            exposed.graph.output.append(info)
    try:
        session = ort_session(exposed)
        values = session.run(None, feeds)
    except Exception as e:  # onnxruntime's errors share no base class but Exception
        raise OnnxImportError(f"onnxruntime cannot run the graph on the given inputs: {e}") from e
    by_name = dict(zip([o.name for o in exposed.graph.output], values, strict=True))
    return values[: len(outputs)], by_name


def _main_batchnorms(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if is_batchnorm(n)]


def _stat_names(i: int) -> tuple[str, str]:
    return f"batch_mean.{i}", f"batch_var.{i}"


def _batch_norm_nodes(bn: onnx.NodeProto, g: GraphIndex, rank: int, x_type: int) -> tuple[list[Any], str, str]:
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
    eps = g.add_initializer(f"{name}_epsilon", np.array(bn_epsilon(bn), dtype=dtype))
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
        shaped, reshape = along_channels(g, [t], rank, x, f"{name}_{role}")
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
    nested = nested_batchnorms(model)
    if nested:
        raise OnnxImportError(
            f"BatchNormalization {nested[0].norm!r}: {nested[0].reason}; expected every one in the main graph"
        )
    if not _main_batchnorms(model):
        raise OnnxImportError(
            "the model has no BatchNormalization node; expected at least one (a batch-statistics graph would "
            "equal the served one)"
        )
    out = copy_proto(model)
    g = GraphIndex(out)
    bns = [n for n in g.nodes if is_batchnorm(n)]
    for bn in bns:
        check_inference_form(bn, g)
        for role, name in zip(STAT_ROLES[2:], bn.input[3:5], strict=True):
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
                "eps": as_f32(bn_epsilon(bn)),
                "momentum": as_f32(1.0 - as_f32(node_attr(bn, "momentum", 0.9))),  # PyTorch weighs the new value
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

    reference = copy_proto(original)
    taken = graph_names(reference.graph)
    dtypes = {t.name: helper.tensor_dtype_to_np_dtype(t.data_type) for t in reference.graph.initializer}
    for i, bn in enumerate(n for n in reference.graph.node if is_batchnorm(n)):
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
