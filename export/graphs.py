"""What the PyTorch and the ONNX paths of the exporter share about graphs, without torch: the default
tensor names, the opset, and the operator count (the import path and the serving install have no torch)."""

from __future__ import annotations

import collections

import onnx

__all__ = ["INPUT_NAME", "OPSET", "OUTPUT_NAME", "op_histogram"]

OPSET = 21  # GroupNorm exports as one GroupNormalization node from opset 21
INPUT_NAME = "input"  # the default models' one input
OUTPUT_NAME = "logits"  # and their one output


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Count the operators of the main graph, of its subgraphs and of its local functions."""
    counts: collections.Counter[str] = collections.Counter()

    def walk(nodes: list[onnx.NodeProto]) -> None:
        for node in nodes:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(list(attr.g.node))
                for g in attr.graphs:
                    walk(list(g.node))

    walk(list(model.graph.node))
    for fn in model.functions:
        walk(list(fn.node))
    return dict(sorted(counts.items()))
