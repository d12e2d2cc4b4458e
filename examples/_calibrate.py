"""Seeded weights and calibrated running statistics for the example models.

The examples stand in for trained models, so their BatchNorms must look trained: a BatchNorm fresh
from ``__init__`` has ``running_mean = 0``, ``running_var = 1``, ``weight = 1`` and ``bias = 0``, and
folding it changes nothing that a test could see. ``build_calibrated`` gives every BatchNorm

- random affine parameters, ``weight ~ U(0.5, 1.5)`` and ``bias ~ N(0, 0.1^2)``, and
- running statistics measured on seeded random inputs: the model runs in ``train()`` mode under
  ``torch.no_grad()`` over a few batches with each BatchNorm's ``momentum`` set to ``None``, so that
  ``running_mean`` and ``running_var`` end as the plain average of the batches' statistics
  (``momentum`` is put back afterwards).

The inputs have a fixed mean and scale per channel, drawn once per model, so the statistics differ
from channel to channel the way a real data set's do. Everything is drawn from generators seeded by
``seed``, and the global RNG is restored after the weights are drawn, so ``build()`` called twice
returns identical models and leaves the caller's random state alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BATCHES", "BATCH_SIZE", "build_calibrated", "calibrate", "gaussian_batches", "randomize_batchnorms"]

BATCHES = 8  # calibration batches; with momentum=None the statistics are their average
BATCH_SIZE = 32


def randomize_batchnorms(model: nn.Module, generator: torch.Generator) -> None:
    """Draw every BatchNorm's ``weight`` from U(0.5, 1.5) and ``bias`` from N(0, 0.1^2), in place."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.affine:
                m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.1)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, ...]]) -> nn.Module:
    """Set every BatchNorm's running statistics to their average over ``batches``.

    Args:
        model: the module; its BatchNorms are reset and measured, nothing else changes.
        batches: tuples of positional arguments for ``model``'s forward, each a batch of at least 2.

    Returns:
        ``model`` itself, in eval mode.

    Raises:
        ValueError: ``batches`` is empty, which would leave the statistics at their defaults.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
    model.train()
    seen = 0
    try:
        for args in batches:
            model(*args)
            seen += 1
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    if seen == 0:
        raise ValueError("calibration got no batches; expected at least one")
    return model


def gaussian_batches(
    shape: tuple[int, ...], generator: torch.Generator, batches: int = BATCHES, batch_size: int = BATCH_SIZE
) -> Iterator[tuple[torch.Tensor]]:
    """Yield ``batches`` float inputs of shape (batch_size, *shape), one argument each.

    Axis 0 of ``shape`` is the channel axis (the features of a vector input); each channel is
    Gaussian with its own mean, drawn from N(0, 1), and scale, drawn from U(0.5, 2), fixed across batches.
    """
    channels = shape[0]
    view = (1, channels) + (1,) * (len(shape) - 1)
    mean = torch.randn(channels, generator=generator).view(view)
    scale = (torch.rand(channels, generator=generator) * 1.5 + 0.5).view(view)
    for _ in range(batches):
        yield (torch.randn((batch_size, *shape), generator=generator) * scale + mean,)


def build_calibrated(
    make_model: Callable[[], nn.Module],
    make_batches: Callable[[torch.Generator], Iterable[tuple[torch.Tensor, ...]]],
    seed: int = 0,
) -> nn.Module:
    """Build a model with seeded weights, random BatchNorm affines and calibrated statistics.

    Args:
        make_model: constructs the model; its initializers draw from the global RNG, seeded here
            with ``seed`` and restored afterwards.
        make_batches: given a generator seeded with ``seed``, the calibration batches.
        seed: the one seed everything is drawn from.

    Returns:
        The model, in eval mode.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model()
    generator = torch.Generator().manual_seed(seed)
    randomize_batchnorms(model, generator)
    return calibrate(model, make_batches(generator))
