"""What a sample's answer depends on at inference: measured on the exported graphs, as they are served.

Every figure here runs the version folders that the exporter wrote: ``model.onnx`` (BatchNorm folded:
running statistics) and, for a model with BatchNorm, ``batch_stats.onnx`` (the model as ``train()``
mode normalizes: the statistics of the batch in front of it), in onnxruntime, as the service runs
them. The padded-token experiment alone runs the PyTorch model (``models/vit.py``), because
padding is a property of sequences that the image graphs do not take.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from experiments.training import batch_statistics_copy
from export.batch_stats import batchnorm_layers
from export.onnx_export import INPUT_NAME, OUTPUT_NAME
from export.verify import cpu_session
from repository import BATCH_STATS_FILE, MODEL_FILE

__all__ = [
    "Graphs",
    "batch_size_accuracy",
    "companions",
    "consecutive_batches",
    "padded_tokens",
    "skewed_batches",
]

BRIGHTNESS = 0.4  # added to every pixel of a shifted batch (pixels are in [0, 1]; the sum is clipped at 1)


class Graphs:
    """The served graph of one exported version and, when it has BatchNorm, its batch-statistics graph."""

    def __init__(self, version: Path) -> None:
        self.version = version

    @cached_property
    def _running(self) -> Any:
        return cpu_session(onnx.load(self.version / MODEL_FILE))

    @cached_property
    def _batch(self) -> Any:
        return cpu_session(onnx.load(self.version / BATCH_STATS_FILE))

    @property
    def has_batch_stats(self) -> bool:
        return (self.version / BATCH_STATS_FILE).exists()

    def running(self, x: np.ndarray) -> np.ndarray:
        """Logits with the running statistics: the answer ``infer`` gives."""
        return self._running.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, np.float32)})[0]

    def batch(self, x: np.ndarray) -> np.ndarray:
        """Logits with the statistics of ``x`` itself, as one batch: what train() mode would answer."""
        return self._batch.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, np.float32)})[0]


def consecutive_batches(n: int, size: int) -> Iterator[tuple[np.ndarray, int]]:
    """Rows of each batch of exactly ``size`` and how many of them are new: the split is cut in its
    order, and the last batch is filled up from its start (those rows were counted already)."""
    for start in range(0, n, size):
        yield (start + np.arange(size)) % n, min(size, n - start)


def _accuracy(graphs: Graphs, x: np.ndarray, y: np.ndarray, size: int, batch_stats: bool) -> float:
    run = graphs.batch if batch_stats else graphs.running
    correct = 0
    for rows, new in consecutive_batches(len(x), size):
        correct += int((run(x[rows]).argmax(1)[:new] == y[rows][:new]).sum())
    return correct / len(x)


def batch_size_accuracy(graphs: Graphs, x: np.ndarray, y: np.ndarray, sizes: list[int]) -> dict[str, list[float]]:
    """Held-out accuracy at each normalization batch size, with running and (where there are) batch statistics."""
    out = {"running": [_accuracy(graphs, x, y, s, batch_stats=False) for s in sizes]}
    if graphs.has_batch_stats:
        out["batch"] = [_accuracy(graphs, x, y, s, batch_stats=True) for s in sizes]
    return out


def _skews(x: np.ndarray, y: np.ndarray, size: int) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Batches of ``size`` (the split's order; each class alone; brightened), as (inputs, labels) pairs."""
    mixed = [(rows[:new], rows[:new]) for rows, new in consecutive_batches(len(x), size)]
    one_class = [
        (idx[i : i + size], idx[i : i + size])
        for c in np.unique(y)
        for idx in [np.flatnonzero(y == c)]
        for i in range(0, len(idx), size)
    ]
    bright = np.minimum(x + BRIGHTNESS, 1.0)
    return {
        "mixed": [(x[a], y[b]) for a, b in mixed],
        "one class": [(x[a], y[b]) for a, b in one_class],
        f"brightness +{BRIGHTNESS:g}": [(bright[a], y[b]) for a, b in mixed],
    }


def skewed_batches(graphs: Graphs, x: np.ndarray, y: np.ndarray, size: int) -> dict[str, dict[str, float]]:
    """Accuracy on batches that hold one class each, or are brightened, against mixed batches."""
    out = {}
    for kind, batches in _skews(x, y, size).items():
        n = sum(len(labels) for _, labels in batches)
        out[kind] = {
            "running": sum(int((graphs.running(b).argmax(1) == t).sum()) for b, t in batches) / n,
            "batch": sum(int((graphs.batch(b).argmax(1) == t).sum()) for b, t in batches) / n,
        }
    return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def companions(graphs: Graphs, x: np.ndarray, y: np.ndarray, sample: int, count: int) -> dict[str, Any]:
    """One sample's probability of its own class as 0..``count`` companions join its batch.

    Three kinds of companion: held-out digits of the same class, of other classes, and brightened
    digits of other classes. Under running statistics the answer cannot move; under batch statistics
    it does.
    """
    label = int(y[sample])
    same = np.flatnonzero((y == label) & (np.arange(len(y)) != sample))[:count]
    other = np.flatnonzero(y != label)[:count]
    pools = {"same class": x[same], "other classes": x[other], "brightened": np.minimum(x[other] + BRIGHTNESS, 1.0)}
    out: dict[str, Any] = {"sample": sample, "label": label, "counts": list(range(count + 1)), "curves": {}}
    for kind, pool in pools.items():
        curves: dict[str, list[float]] = {"running": [], "batch": []}
        for k in range(count + 1):
            batch = np.concatenate([x[sample : sample + 1], pool[:k]])
            curves["running"].append(float(_softmax(graphs.running(batch))[0, label]))
            curves["batch"].append(float(_softmax(graphs.batch(batch))[0, label]))
        out["curves"][kind] = curves
    return out


@torch.no_grad()
def padded_tokens(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, pads: list[int], size: int) -> dict[str, Any]:
    """A ViT's answers on batches padded to a common length: accuracy, and how far one sequence's
    logits move from its unpadded logits, with ``pad`` zero tokens after every sequence.

    For a BatchNorm model both are measured with batch statistics (``train()`` mode, where the pads
    join the statistics) and with running statistics (``eval()``).
    """
    runner = batch_statistics_copy(model)  # its train() mode leaves the running statistics alone
    modes = ["eval", "train"] if batchnorm_layers(runner) else ["eval"]
    out: dict[str, Any] = {"pads": pads}
    first = torch.tensor(x[:size])
    for mode in modes:
        runner.train(mode == "train")
        accuracy, shift = [], []
        reference = runner.forward_padded(first, 0)[0]
        for pad in pads:
            correct = 0
            for rows, new in consecutive_batches(len(x), size):
                logits = runner.forward_padded(torch.tensor(x[rows]), pad)
                correct += int((logits.argmax(1).numpy()[:new] == y[rows][:new]).sum())
            accuracy.append(correct / len(x))
            shift.append(float((runner.forward_padded(first, pad)[0] - reference).abs().max()))
        out[mode] = {"accuracy": accuracy, "max_logit_change": shift}
    return out
