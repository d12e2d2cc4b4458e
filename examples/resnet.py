"""A small ResNet of bottleneck blocks for 32x32 RGB images, 10 classes.

Imitates torchvision's ``Bottleneck`` ResNet (ResNet-50's block, v1.5: the stride sits on the 3x3
conv): 1x1 reduce -> 3x3 -> 1x1 expand, each conv followed by BatchNorm2d, a projection shortcut
(1x1 conv + BatchNorm2d) where the shape changes, the residual add, then ReLU. The stem is the
CIFAR one (one 3x3 conv, no max pool). Three stages of 32, 64 and 128 channels, 0.04M parameters.

BatchNorms (19): every one follows a bias-free conv directly, so all fold into it: ``stem.0.1``, and
in each block ``bn1``, ``bn2``, ``bn3`` and, where there is one, ``shortcut.1``. None sits after the
residual add (the add is followed by ReLU only), so nothing is left unfolded.

Input: one image tensor, ``--input input:FP32:3,32,32``; output: (N, 10) logits. ::

    normserve export examples/resnet.py:build --name resnet-bottleneck --input input:FP32:3,32,32
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from examples._calibrate import build_calibrated, gaussian_batches

__all__ = ["INPUTS", "ResNetConfig", "Bottleneck", "ResNet", "build"]

INPUTS = ("input:FP32:3,32,32",)


@dataclass(frozen=True)
class ResNetConfig:
    in_channels: int = 3
    image_size: int = 32
    num_classes: int = 10
    stem_width: int = 16
    widths: tuple[int, ...] = (8, 16, 32)  # the 3x3 conv's width in each stage
    blocks: tuple[int, ...] = (2, 2, 1)
    expansion: int = 4  # a block's output has expansion * width channels


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Conv (no bias: the BatchNorm's shift replaces it) followed by BatchNorm2d."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand, each with BatchNorm; residual add, then ReLU."""

    def __init__(self, c_in: int, width: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut = conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))  # (N, width, H, W)
        out = self.relu(self.bn2(self.conv2(out)))  # (N, width, H', W')
        out = self.bn3(self.conv3(out))  # (N, C_out, H', W')
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        if len(cfg.widths) != len(cfg.blocks):
            raise ValueError(f"widths and blocks need one entry per stage, got {cfg.widths} and {cfg.blocks}")
        self.cfg = cfg
        self.stem = nn.Sequential(conv_bn(cfg.in_channels, cfg.stem_width, 3), nn.ReLU())
        stages: list[nn.Module] = []
        c_in = cfg.stem_width
        for i, (width, n_blocks) in enumerate(zip(cfg.widths, cfg.blocks, strict=True)):
            c_out = width * cfg.expansion
            blocks = []
            for j in range(n_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(Bottleneck(c_in, width, c_out, stride))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c_in, cfg.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (N, C0, 32, 32)
        x = self.stages(x)  # (N, C_last, 8, 8)
        x = x.mean(dim=(2, 3))  # (N, C_last)
        return self.head(x)  # (N, num_classes)


def build(seed: int = 0) -> nn.Module:
    """The ResNet with seeded random weights and calibrated running statistics, in eval mode."""
    cfg = ResNetConfig()
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    return build_calibrated(lambda: ResNet(cfg), lambda g: gaussian_batches(shape, g), seed)
