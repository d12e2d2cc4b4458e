"""What the PyTorch and the ONNX paths of the exporter share about graphs, without torch: the default
tensor names, the opset, the operator count, and the files a batch-statistics graph is written as (the
import path and the serving install have no torch)."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

import onnx

from repository import BATCH_STATS_FILE, BN_STATS_FILE, BatchNormStats, TensorSpec

__all__ = [
    "INPUT_NAME",
    "OPSET",
    "OUTPUT_NAME",
    "TRAIN_MODE_NOTE",
    "Unfoldable",
    "batch_stats_artifacts",
    "not_comparable",
    "op_histogram",
]

OPSET = 21  # GroupNorm exports as one GroupNormalization node from opset 21
INPUT_NAME = "input"  # the default models' one input
OUTPUT_NAME = "logits"  # and their one output


@dataclass(frozen=True)
class Unfoldable:
    """A BatchNorm left unfolded, by the PyTorch pass or the ONNX one: its name, why, and what computes it
    in the served graph (the report's ``unfoldable``)."""

    norm: str
    reason: str
    replaced_by: str


TRAIN_MODE_NOTE = (
    "normalizes with the statistics of the batch it is given, as PyTorch train() mode does; "
    "served by the batchnorm endpoint only, never by infer"
)


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


def not_comparable(output: TensorSpec) -> str | None:
    """Why the batchnorm endpoint could not compare ``output`` (it needs (rows, values)), or None."""
    if len(output.shape) == 2:
        return None
    return f"its first output {output.name!r} has shape {output.shape}; the comparison needs (rows, values)"


def batch_stats_artifacts(
    graph: onnx.ModelProto, logits_output: str, layers: list[dict[str, Any]], note: str = TRAIN_MODE_NOTE
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """A batch-statistics graph and its layers' statistics as the files written beside model.onnx
    (``batch_stats.onnx``, ``bn_stats.json``), and what the report says of them."""
    stats = BatchNormStats.model_validate({"logits_output": logits_output, "layers": layers})
    files = {BATCH_STATS_FILE: graph.SerializeToString(), BN_STATS_FILE: stats.model_dump_json(indent=1).encode()}
    described = {
        "file": BATCH_STATS_FILE,
        "statistics_file": BN_STATS_FILE,
        "layers": [layer.name for layer in stats.layers],
        "outputs": [o.name for o in graph.graph.output],
        "ops": op_histogram(graph),
        "note": note,
    }
    return files, described
