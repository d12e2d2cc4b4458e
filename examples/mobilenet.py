"""A small MobileNetV2 for 32x32 RGB images, 10 classes.

Imitates torchvision's ``mobilenet_v2``: inverted residual blocks of a 1x1 expand conv + BatchNorm2d
+ ReLU6 (left out when the expansion is 1), a 3x3 depthwise conv (``groups`` = channels) +
BatchNorm2d + ReLU6, and a linear 1x1 project conv + BatchNorm2d (no activation), with the residual
add when the block keeps its shape (stride 1, same channels). The stem is a stride-1 3x3 conv for
32x32 inputs; a 1x1 conv + BatchNorm2d + ReLU6 widens the features before pooling. 0.13M parameters.

BatchNorms (22): every one follows a bias-free conv directly and folds into it, the depthwise ones
included (folding scales each depthwise filter by its own channel's factor): ``stem.1``, each block's
``conv.*.1`` and its last ``conv.N``, and ``last.1``. None follows the residual add: the add comes
after the project conv's BatchNorm.

Input: one image tensor, ``--input input:FP32:3,32,32``; output: (N, 10) logits. ::

    normserve export examples/mobilenet.py:build --name mobilenet-v2 --input input:FP32:3,32,32
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from examples._calibrate import build_calibrated, gaussian_batches

__all__ = ["INPUTS", "MobileNetConfig", "InvertedResidual", "MobileNetV2", "build"]

INPUTS = ("input:FP32:3,32,32",)


@dataclass(frozen=True)
class MobileNetConfig:
    in_channels: int = 3
    image_size: int = 32
    num_classes: int = 10
    stem_width: int = 16
    # (expansion t, output channels c, blocks n, first block's stride s), as in the paper's Table 2
    settings: tuple[tuple[int, int, int, int], ...] = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 2))
    last_width: int = 256


def conv_bn_relu6(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias) + BatchNorm2d + ReLU6, torchvision's ``Conv2dNormActivation``."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU6())


class InvertedResidual(nn.Module):
    """Expand (1x1), filter (3x3 depthwise), project (1x1, linear); residual when the shape is kept."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        self.use_residual = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(conv_bn_relu6(c_in, hidden, 1))
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)  # (N, C_out, H', W')
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    def __init__(self, cfg: MobileNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.stem = conv_bn_relu6(cfg.in_channels, cfg.stem_width, 3)
        blocks: list[nn.Module] = []
        c_in = cfg.stem_width
        for t, c, n, s in cfg.settings:
            for i in range(n):
                blocks.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.last = conv_bn_relu6(c_in, cfg.last_width, 1)
        self.head = nn.Linear(cfg.last_width, cfg.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (N, 16, 32, 32)
        x = self.blocks(x)  # (N, 64, 4, 4)
        x = self.last(x)  # (N, last_width, 4, 4)
        x = x.mean(dim=(2, 3))  # (N, last_width)
        return self.head(x)  # (N, num_classes)


def build(seed: int = 0) -> nn.Module:
    """The MobileNetV2 with seeded random weights and calibrated running statistics, in eval mode."""
    cfg = MobileNetConfig()
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    return build_calibrated(lambda: MobileNetV2(cfg), lambda g: gaussian_batches(shape, g), seed)
