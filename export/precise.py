"""Precise BatchNorm statistics: population statistics recomputed after training, with the weights frozen.

During training each BatchNorm keeps an exponential moving average (EMA) of its batches'
statistics, ``running = (1 - momentum) * running + momentum * batch``. The average trails the
weights, which kept changing while it was gathered, and weighs the last few hundred steps most.
Wu & Johnson ("Rethinking 'Batch' in BatchNorm", 2021) recompute the statistics instead once
training is done ("PreciseBN"): run the frozen model over the training data in ``train()`` mode,
so that every layer sees the inputs it saw while training, and pool what each layer saw::

    mean_c = sum(x_c) / n,   var_c = sum(x_c^2) / n - mean_c^2      (over every batch, n values)

``torch.optim.swa_utils.update_bn`` runs the same passes but averages the batches' variances, which
leaves out how much the batch means spread (the population variance is the mean of the batch
variances plus the variance of the batch means), so the sums are pooled here, in float64. The
result is stored as PyTorch stores running statistics: the mean and the unbiased variance.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from export.batch_stats import batchnorm_layers
from models.norms import bn_channel_dim

__all__ = ["PreciseStatistics", "precise_statistics", "with_precise_statistics"]


@dataclass(frozen=True)
class PreciseStatistics:
    mean: np.ndarray  # (C,) float64
    var: np.ndarray  # (C,) float64, biased: the population variance of the values pooled
    count: int  # values per channel pooled over every batch

    @property
    def unbiased_var(self) -> np.ndarray:
        return self.var * self.count / (self.count - 1)


@torch.no_grad()
def precise_statistics(model: nn.Module, x: np.ndarray, batch_size: int) -> dict[str, PreciseStatistics]:
    """Each BatchNorm's population statistics over ``x``, seen in ``train()``-mode batches of ``batch_size``.

    Args:
        model: a model with BatchNorm layers; it is not changed (a copy runs).
        x: the inputs, in the order they are cut into consecutive batches (a last batch of
            fewer than two samples is dropped, as training drops it).
        batch_size: the training batch size, so each layer sees the batch statistics it trained with.

    Returns:
        By layer name, the mean and biased variance of every value the layer normalized.
    """
    if batch_size < 2:
        raise ValueError(f"precise statistics need batches of at least 2 samples, got batch_size={batch_size}")
    runner = copy.deepcopy(model).train()
    layers = batchnorm_layers(runner)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer to recompute")
    sums = {name: [0.0, 0.0, 0] for name in layers}

    def hook(name: str, bn: _BatchNorm, args: tuple[torch.Tensor, ...]) -> None:
        dim = bn_channel_dim(bn)
        flat = args[0].detach().movedim(dim, 0).reshape(args[0].shape[dim], -1).double()  # (C, n)
        acc = sums[name]
        acc[0] = acc[0] + flat.sum(1)
        acc[1] = acc[1] + (flat * flat).sum(1)
        acc[2] += flat.shape[1]

    handles = [bn.register_forward_pre_hook(lambda m, a, n=name: hook(n, m, a)) for name, bn in layers.items()]
    try:
        for start in range(0, len(x), batch_size):
            batch = x[start : start + batch_size]
            if len(batch) >= 2:
                runner(torch.tensor(batch))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, (total, squares, count) in sums.items():
        mean = (total / count).numpy()
        out[name] = PreciseStatistics(mean=mean, var=np.maximum((squares / count).numpy() - mean**2, 0.0), count=count)
    return out


def with_precise_statistics(model: nn.Module, stats: dict[str, PreciseStatistics]) -> nn.Module:
    """A copy of ``model`` in eval mode whose BatchNorm running statistics are ``stats``."""
    out = copy.deepcopy(model).eval()
    layers = batchnorm_layers(out)
    if set(layers) != set(stats):
        raise ValueError(f"statistics for layers {sorted(stats)}, but the model's BatchNorms are {sorted(layers)}")
    for name, bn in layers.items():
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"{name} keeps no running statistics (track_running_stats=False)")
        bn.running_mean.copy_(torch.from_numpy(stats[name].mean))
        bn.running_var.copy_(torch.from_numpy(stats[name].unbiased_var))
    return out
