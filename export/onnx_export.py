"""Export a PyTorch model to ONNX with the dynamo exporter and a dynamic batch dimension."""

from __future__ import annotations

import contextlib
import gc
import inspect
import io
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import onnx
import torch
from torch import nn

from export.graphs import INPUT_NAME, OPSET, OUTPUT_NAME, op_histogram

__all__ = ["OPSET", "INPUT_NAME", "OUTPUT_NAME", "export_onnx", "fold_constants", "op_histogram"]


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress prints, its log lines about optional packages (torchvision) and
    one deprecation inside torch's own pytree code; other warnings and errors still surface."""
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)", FutureWarning)
            # Several inputs share the one batch Dim, and the exporter says it keeps one name for it.
            warnings.filterwarnings("ignore", r"# The axis name: .* will not be used", UserWarning)
            yield
    finally:
        onnx_logger.setLevel(level)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Keep the cyclic garbage collector from running inside the export.

    The exporter parses the source of every torchlib function (``ast.parse``) on each export, and Python 3.11's
    ``ast.parse`` is not re-entrant: a collection that starts inside a parse runs finalizers, and one that formats a
    traceback parses again (3.11's traceback parses the failing line to place its carets; logging an exception does
    it, as does pytest's hook for errors in finalizers). The outer parse then fails with "SystemError: AST
    constructor recursion depth mismatch". Paused, the collector runs after the export, whatever garbage the
    process holds.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _batch_axes(model: nn.Module, count: int, batch: Any) -> tuple[Any, ...]:
    """torch.export's dynamic shapes for ``count`` inputs whose axis 0 is the batch, following the
    structure of ``forward``'s signature: one entry per parameter, a tuple of them for ``*args``."""
    axes = tuple({0: batch} for _ in range(count))
    parameters = list(inspect.signature(model.forward).parameters.values())
    if parameters and parameters[0].kind is inspect.Parameter.VAR_POSITIONAL:
        return (axes,)
    return axes


def export_onnx(
    model: nn.Module,
    example: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    optimize: bool = True,
    opset: int = OPSET,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
) -> onnx.ModelProto:
    """Export ``model`` (eval mode) to a self-contained ONNX model with inputs (batch, ...) -> outputs.

    Args:
        model: the module to export; it is put in eval mode.
        example: an input with a batch of at least 2 rows (a batch of 1 would be specialized), or a
            tuple of them, one per argument of ``forward``, all with the same rows.
        optimize: run the exporter's graph optimizer. It folds BatchNorm into a preceding
            Conv/Gemm by itself, so export with ``optimize=False`` to see the graph as the model is.
        opset: ONNX opset version.
        input_names: the graph's inputs, in ``forward``'s order (default: one, ``input``).
        output_names: the graph's outputs, in the order forward returns them (default: one, ``logits``;
            an empty list keeps the names the exporter gives them).
    """
    examples = example if isinstance(example, tuple) else (example,)
    if examples[0].shape[0] < 2:
        raise ValueError(
            f"example batch must have at least 2 rows to keep the batch dynamic, got {examples[0].shape[0]}"
        )
    batch = torch.export.Dim("batch", min=1)
    with _quiet_exporter(), _collector_paused():
        program = torch.onnx.export(
            model.eval(),
            examples,
            dynamo=True,
            opset_version=opset,
            optimize=optimize,
            input_names=input_names or [INPUT_NAME],
            output_names=[OUTPUT_NAME] if output_names is None else (output_names or None),
            dynamic_shapes=_batch_axes(model, len(examples), batch),
            verbose=False,
        )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    return proto


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every value computed from constants alone replaced by a constant (onnxscript's own
    constant folding, without its rewrite rules, so every BatchNormalization node stays).

    An export with ``optimize=False`` computes, for example, a bias-free Conv's zero bias from Shape,
    Expand and CastLike nodes; onnxruntime does not fold those, and then cannot fuse the Conv with its
    BatchNorm either. Folded this way, the graph is the model as it is, as an exporter would write it.
    """
    import onnx_ir
    import onnxscript.optimizer

    ir_model = onnx_ir.from_proto(model)
    onnxscript.optimizer.fold_constants(ir_model)
    onnxscript.optimizer.remove_unused_nodes(ir_model)
    folded = onnx_ir.to_proto(ir_model)
    onnx.checker.check_model(folded, full_check=True)
    return folded
