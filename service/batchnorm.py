"""The BatchNorm demonstration: one batch normalized with running statistics and with its own.

A served BatchNorm model answers with the running mean and variance fixed at training time, so a
sample's answer does not depend on its batch. Its batch-statistics graph normalizes each channel
with the mean and (biased) variance of the batch in front of it, as ``train()`` mode does, so the
answer moves with the company a sample keeps. ``compare`` puts the two side by side, per sample
(probabilities, predicted class) and per layer (the running statistics, this batch's, and how far
apart they are).

The distance of a layer is the root mean square, over its channels, of the 2-Wasserstein distance
between the Gaussians N(batch mean, batch variance) and N(running mean, running variance), in units
of the running standard deviation::

    d = sqrt(mean_c(((m_b - m_r)^2 + (s_b - s_r)^2) / (v_r + eps)))

0 when the batch's statistics are the running ones; about 1 when the batch's means sit one
running standard deviation away.

Only numpy here: the route parses and queues, the runtime runs the graphs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from repository import BatchNormLayer, BatchNormStats, ModelVersion

__all__ = ["DISTANCE", "ONE_SAMPLE_NOTE", "compare", "layer_distance", "no_batch_stats_reason", "softmax"]

DISTANCE = (
    "per layer, the root mean square over channels of the 2-Wasserstein distance between N(batch mean, batch "
    "variance) and N(running mean, running variance), in running standard deviations: "
    "sqrt(mean_c(((m_b - m_r)^2 + (s_b - s_r)^2) / (v_r + eps))); 0 when the batch matches the running statistics"
)
ONE_SAMPLE_NOTE = (
    "a batch of one sample: its batch statistics are that sample's own mean and variance per channel, over its "
    "positions only (H, W of an image layer, the tokens T of a token layer), so BatchNorm acts as InstanceNorm "
    "on it and removes each channel's overall level and contrast. The answer then depends on the sample alone, "
    "but it is not the answer the model was trained to give, which uses the running statistics. (A layer with "
    "one value per channel would divide 0 by sqrt(eps): PyTorch refuses such a batch in train() mode.)"
)


def no_batch_stats_reason(version: ModelVersion) -> str:
    """Why a served version has no batch-statistics graph for the batchnorm endpoint, and what it would need:
    the reason its report gives (an exporter that could not build the graph says why), else what its norm
    layers say."""
    config = version.config
    norms = ", ".join(f"{kind} x{count}" for kind, count in config.norm_layers.items()) or "none recorded"
    if (reason := version.report.batch_stats_unavailable) is not None:
        return (
            f"model {config.name} version {version.number} has no batch-statistics graph (its norm layers: {norms}): "
            f"{reason}"
        )
    if any("BatchNorm" in kind for kind in config.norm_layers):
        return (
            f"model {config.name} version {version.number} was exported without a batch-statistics graph "
            f"(its norm layers: {norms}); export it again with its batch-statistics graph (for the default models, "
            "`python -m export.build --force`)"
        )
    return (
        f"model {config.name} has no BatchNorm layer (its norm layers: {norms}), so it has no running statistics "
        "to compare with batch statistics: GroupNorm, InstanceNorm and LayerNorm normalize each sample on its own. "
        "Expected a BatchNorm model"
    )


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, classes) scores, computed stably in float64."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e: np.ndarray = np.exp(z)
    probabilities: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return probabilities


def layer_distance(batch_mean: np.ndarray, batch_var: np.ndarray, layer: BatchNormLayer) -> float:
    """The layer's distance between this batch's statistics and its running ones (see the module docstring)."""
    running_mean = np.asarray(layer.running_mean, dtype=np.float64)
    running_var = np.asarray(layer.running_var, dtype=np.float64)
    batch_var = np.maximum(batch_var.astype(np.float64), 0.0)
    shift = (batch_mean.astype(np.float64) - running_mean) ** 2
    spread = (np.sqrt(batch_var) - np.sqrt(running_var)) ** 2
    return float(np.sqrt(np.mean((shift + spread) / (running_var + layer.eps))))


def _side(logits: np.ndarray) -> dict[str, Any]:
    return {"logits": logits, "probabilities": softmax(logits), "predictions": logits.argmax(axis=1).tolist()}


def compare(
    running_logits: np.ndarray,
    batch_outputs: Mapping[str, np.ndarray],
    stats: BatchNormStats,
    labels: Sequence[str] = (),
) -> dict[str, Any]:
    """The endpoint's answer for one batch.

    Args:
        running_logits: (N, classes) from the served graph (running statistics): the 2-D output
            ``stats.logits_output``, class scores or any other 2-D output (a regression head's
            probabilities and predictions mean nothing, but are still given).
        batch_outputs: the batch-statistics graph's outputs by name: the logits and, per layer,
            its batch mean and variance, each (C,).
        stats: the model's BatchNorm layers and their running statistics.
        labels: the class names, if the model has them.
    """
    batch_logits = batch_outputs[stats.logits_output]
    running, batch = _side(running_logits), _side(batch_logits)
    layers = []
    for layer in stats.layers:
        mean, var = batch_outputs[layer.mean_output], batch_outputs[layer.var_output]
        layers.append(
            {
                "name": layer.name,
                "type": layer.type,
                "channels": layer.channels,
                "reduced_over": layer.reduced_over,
                "values_per_channel": len(running_logits) * layer.positions,
                "running_mean": layer.running_mean,
                "running_var": layer.running_var,
                "batch_mean": mean,
                "batch_var": var,
                "distance": layer_distance(mean, var, layer),
            }
        )
    answer: dict[str, Any] = {
        "batch_size": len(running_logits),
        "output": stats.logits_output,
        "labels": list(labels),
        "running": running,
        "batch": batch,
        "changed": [r != b for r, b in zip(running["predictions"], batch["predictions"], strict=True)],
        "layers": layers,
        "distance": DISTANCE,
    }
    if len(running_logits) == 1:
        answer["note"] = ONE_SAMPLE_NOTE
    return answer
