"""A small EfficientNet of MBConv blocks with squeeze-and-excitation, for 32x32 RGB images, 10 classes.

Imitates torchvision's ``efficientnet_b0``: MBConv blocks of a 1x1 expand conv + BatchNorm2d + SiLU
(left out when the expansion is 1), a kxk depthwise conv + BatchNorm2d + SiLU, squeeze-and-excitation
(global average pool, 1x1 conv reduce + SiLU, 1x1 conv expand, sigmoid, multiply the features by
it), and a 1x1 project conv + BatchNorm2d with no activation, plus the residual add when the block
keeps its shape (stochastic depth is the identity at inference, so it is left out). A stride-1 3x3
stem for 32x32 inputs, a 1x1 head conv + BatchNorm2d + SiLU before pooling. 0.09M parameters.

BatchNorms (16): every one follows a bias-free conv directly and folds into it: ``stem.1``, in each
block ``expand.1`` (where there is one), ``depthwise.1`` and ``project.1``, and ``last.1``. The SE
convs have biases and no BatchNorm; the SE multiply comes after the depthwise BatchNorm and SiLU,
and the residual add after the project BatchNorm, so neither stands between a conv and its BatchNorm.

Input: one image tensor, ``--input input:FP32:3,32,32``; output: (N, 10) logits. ::

    normserve export examples/efficientnet.py:build --name efficientnet-mbconv --input input:FP32:3,32,32
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from examples._calibrate import build_calibrated, gaussian_batches

__all__ = ["INPUTS", "EfficientNetConfig", "SqueezeExcite", "MBConv", "EfficientNet", "build"]

INPUTS = ("input:FP32:3,32,32",)


@dataclass(frozen=True)
class EfficientNetConfig:
    in_channels: int = 3
    image_size: int = 32
    num_classes: int = 10
    stem_width: int = 16
    # (expansion, kernel, first block's stride, output channels, blocks), as in B0's table
    stages: tuple[tuple[int, int, int, int, int], ...] = (
        (1, 3, 1, 16, 1),
        (6, 3, 2, 24, 2),
        (6, 5, 2, 40, 1),
        (6, 3, 2, 64, 1),
    )
    se_ratio: float = 0.25  # SE bottleneck width, as a fraction of the block's input channels
    last_width: int = 256


def conv_bn_silu(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias) + BatchNorm2d + SiLU, torchvision's ``Conv2dNormActivation``."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.SiLU())


class SqueezeExcite(nn.Module):
    """Reweight each channel by a gate computed from the global average of all channels."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
        s = self.expand(self.act(self.reduce(s)))  # (N, C, 1, 1)
        return x * torch.sigmoid(s)  # (N, C, H, W)


class MBConv(nn.Module):
    """Expand (1x1), depthwise (kxk), squeeze-and-excite, project (1x1, linear); residual when shape is kept."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expansion: int, se_ratio: float) -> None:
        super().__init__()
        hidden = c_in * expansion
        self.use_residual = stride == 1 and c_in == c_out
        self.expand = conv_bn_silu(c_in, hidden, 1) if expansion != 1 else nn.Identity()
        self.depthwise = conv_bn_silu(hidden, hidden, kernel, stride, groups=hidden)
        self.se = SqueezeExcite(hidden, max(1, int(c_in * se_ratio)))
        self.project = nn.Sequential(nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(x)  # (N, hidden, H, W)
        out = self.se(self.depthwise(out))  # (N, hidden, H', W')
        out = self.project(out)  # (N, C_out, H', W')
        return x + out if self.use_residual else out


class EfficientNet(nn.Module):
    def __init__(self, cfg: EfficientNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.stem = conv_bn_silu(cfg.in_channels, cfg.stem_width, 3)
        blocks: list[nn.Module] = []
        c_in = cfg.stem_width
        for expansion, kernel, stride, c_out, n in cfg.stages:
            for i in range(n):
                blocks.append(MBConv(c_in, c_out, kernel, stride if i == 0 else 1, expansion, cfg.se_ratio))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.last = conv_bn_silu(c_in, cfg.last_width, 1)
        self.head = nn.Linear(cfg.last_width, cfg.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (N, 16, 32, 32)
        x = self.blocks(x)  # (N, 64, 4, 4)
        x = self.last(x)  # (N, last_width, 4, 4)
        x = x.mean(dim=(2, 3))  # (N, last_width)
        return self.head(x)  # (N, num_classes)


def build(seed: int = 0) -> nn.Module:
    """The EfficientNet with seeded random weights and calibrated running statistics, in eval mode."""
    cfg = EfficientNetConfig()
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    return build_calibrated(lambda: EfficientNet(cfg), lambda g: gaussian_batches(shape, g), seed)
