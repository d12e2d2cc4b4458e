"""Normalization layers, chosen by name.

Five kinds, each a config string:

- ``bn``: BatchNorm. Normalizes each channel with statistics of the whole batch while training
  and with its running statistics at inference, so it can be folded into the layer before it.
- ``gn``: GroupNorm. Normalizes each sample over groups of channels; no batch dependence.
- ``in``: InstanceNorm. Normalizes each sample's channels separately over (H, W).
- ``ln``: LayerNorm. On token features (B, T, D) it normalizes each token over D (``nn.LayerNorm``).
  On image features (N, C, H, W) it normalizes each spatial position's C-vector, as ConvNeXt does:
  the mean and variance are taken over C alone, at every (h, w) of every sample, and the affine
  parameters are per channel. (It is not ``nn.LayerNorm([C, H, W])``, which pools over C, H and W
  like a GroupNorm with one group and would tie the layer to one image size.)
- ``sn``: Switchable Normalization (Luo et al., "Differentiable Learning-to-Normalize via Switchable
  Normalization", 2018). Each layer computes the IN, LN and BN statistics of its input and
  normalizes with a learned softmax mixture of them, one mixture for the mean and one for the
  variance. Its BN part keeps running statistics like BatchNorm, so at inference a sample's output
  does not depend on its batch; the mixture cannot be folded into the convolution, so the graph
  keeps explicit reductions (and no ``BatchNormalization`` node).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "NORM_KINDS",
    "SWITCHABLE_SOURCES",
    "ChannelLayerNorm",
    "SwitchableNorm2d",
    "TokenBatchNorm",
    "bn_channel_dim",
    "make_norm2d",
    "make_token_norm",
]

NORM_KINDS = ("bn", "gn", "in", "ln", "sn")
SWITCHABLE_SOURCES = ("in", "ln", "bn")  # the order of SwitchableNorm2d's mixture weights


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of (N, C, H, W) features, at each spatial position."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (N, H, W, C)
        x = F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (N, C, H, W)


class SwitchableNorm2d(nn.Module):
    """Switchable Normalization of (N, C, H, W) features: a learned mixture of IN, LN and BN statistics.

    With the biased variances of each sample's channels over (H, W)::

        mu_in  = E_hw[x],           var_in = E_hw[(x - mu_in)^2]                     # (N, C)
        mu_ln  = E_c[mu_in],        var_ln = E_c[var_in + mu_in^2] - mu_ln^2           # (N,)
        mu_bn  = E_n[mu_in],        var_bn = E_n[var_in + mu_in^2] - mu_bn^2           # (C,), train()
        mu     = sum_k softmax(mean_logits)_k mu_k,   var = sum_k softmax(var_logits)_k var_k
        y      = (x - mu) / sqrt(var + eps) * weight + bias

    so LN's and BN's statistics are those of all the values they pool, computed from IN's. In
    ``train()`` mode the BN part uses the batch's statistics and updates ``running_mean`` and
    ``running_var`` as BatchNorm does (``momentum``, unbiased variance); in ``eval()`` mode it uses
    them. The mixture logits start equal (the paper's initialization), so each source weighs 1/3.
    """

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = channels, eps, momentum
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.mean_logits = nn.Parameter(torch.ones(len(SWITCHABLE_SOURCES)))
        self.var_logits = nn.Parameter(torch.ones(len(SWITCHABLE_SOURCES)))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def mixture(self) -> dict[str, dict[str, float]]:
        """The learned weights, ``{"mean": {"in": w, "ln": w, "bn": w}, "var": {...}}``, each summing to 1."""
        return {
            stat: dict(zip(SWITCHABLE_SOURCES, F.softmax(logits.detach(), 0).tolist(), strict=True))
            for stat, logits in (("mean", self.mean_logits), ("var", self.var_logits))
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        mean_in = x.mean((2, 3), keepdim=True)  # (N, C, 1, 1)
        var_in = x.var((2, 3), keepdim=True, unbiased=False)
        square_in = var_in + mean_in**2  # E_hw[x^2]
        mean_ln = mean_in.mean(1, keepdim=True)  # (N, 1, 1, 1)
        var_ln = square_in.mean(1, keepdim=True) - mean_ln**2
        if self.training:
            mean_bn = mean_in.mean(0, keepdim=True)  # (1, C, 1, 1)
            var_bn = square_in.mean(0, keepdim=True) - mean_bn**2
            with torch.no_grad():
                count = n * h * w
                unbiased = var_bn.flatten() * (count / max(count - 1, 1))
                self.running_mean.lerp_(mean_bn.flatten(), self.momentum)
                self.running_var.lerp_(unbiased, self.momentum)
        else:
            mean_bn = self.running_mean.view(1, c, 1, 1)
            var_bn = self.running_var.view(1, c, 1, 1)
        wm, wv = F.softmax(self.mean_logits, 0), F.softmax(self.var_logits, 0)
        mean = wm[0] * mean_in + wm[1] * mean_ln + wm[2] * mean_bn
        var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
        y = (x - mean) / torch.sqrt(var + self.eps)
        return y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the feature axis of (B, T, D) tokens.

    Each of the D features is normalized with statistics taken over every token of every sample
    in the batch (B * T values) while training, and with running statistics at inference.
    """

    channel_dim = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)  # (B, T, D)


def make_norm2d(kind: str, channels: int, groups: int = 8) -> nn.Module:
    """Return a normalization layer for (N, C, H, W) features.

    Args:
        kind: one of ``NORM_KINDS``.
        channels: C, the number of feature channels.
        groups: number of groups for ``gn``; must divide ``channels``.
    """
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        if channels % groups:
            raise ValueError(f"GroupNorm needs channels divisible by groups, got {channels=} and {groups=}")
        return nn.GroupNorm(groups, channels)
    if kind == "in":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "ln":
        return ChannelLayerNorm(channels)
    if kind == "sn":
        return SwitchableNorm2d(channels)
    raise ValueError(f"unknown norm kind {kind!r}; expected one of {NORM_KINDS}")


def make_token_norm(kind: str, dim: int) -> nn.Module:
    """Return a normalization layer for (B, T, D) token features: ``ln`` or ``bn``."""
    if kind == "ln":
        return nn.LayerNorm(dim)
    if kind == "bn":
        return TokenBatchNorm(dim)
    raise ValueError(f"unknown token norm kind {kind!r}; expected 'ln' or 'bn'")


def bn_channel_dim(bn: nn.modules.batchnorm._BatchNorm) -> int:
    """The axis of a BatchNorm's input that holds its channels: 1, or -1 for ``TokenBatchNorm``."""
    return getattr(bn, "channel_dim", 1)
