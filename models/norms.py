"""Normalization layers, chosen by name.

Four kinds, each a config string:

- ``bn``: BatchNorm. Normalizes each channel with statistics of the whole batch while training
  and with its running statistics at inference, so it can be folded into the layer before it.
- ``gn``: GroupNorm. Normalizes each sample over groups of channels; no batch dependence.
- ``in``: InstanceNorm. Normalizes each sample's channels separately over (H, W).
- ``ln``: LayerNorm. On token features (B, T, D) it normalizes each token over D (``nn.LayerNorm``).
  On image features (N, C, H, W) it normalizes each spatial position's C-vector, as ConvNeXt does:
  the mean and variance are taken over C alone, at every (h, w) of every sample, and the affine
  parameters are per channel. (It is not ``nn.LayerNorm([C, H, W])``, which pools over C, H and W
  like a GroupNorm with one group and would tie the layer to one image size.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NORM_KINDS", "ChannelLayerNorm", "TokenBatchNorm", "bn_channel_dim", "make_norm2d", "make_token_norm"]

NORM_KINDS = ("bn", "gn", "in", "ln")


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
