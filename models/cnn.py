"""A ResNet-style CNN whose normalization layer is a config choice.

The same class builds the small digit classifiers (8x8 grayscale, two stages) and a ResNet-18
(3x224x224, four stages, ImageNet stem) used for latency work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.norms import make_norm2d

__all__ = ["CNNConfig", "ResNet", "BasicBlock", "RESNET18"]


@dataclass(frozen=True)
class CNNConfig:
    in_channels: int = 1
    image_size: int = 8
    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64)
    blocks: tuple[int, ...] = (2, 2)
    norm: str = "bn"
    groups: int = 8  # for GroupNorm
    stem: str = "small"  # "small": one 3x3 conv; "imagenet": 7x7/2 conv + 3x3/2 max pool


RESNET18 = CNNConfig(
    in_channels=3,
    image_size=224,
    num_classes=1000,
    widths=(64, 128, 256, 512),
    blocks=(2, 2, 2, 2),
    norm="bn",
    groups=32,
    stem="imagenet",
)


def conv_norm(cfg: CNNConfig, c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Conv (no bias: the norm's shift replaces it) followed by the configured norm."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    return nn.Sequential(conv, make_norm2d(cfg.norm, c_out, cfg.groups))


class BasicBlock(nn.Module):
    """Two 3x3 conv-norm layers with a residual connection (ResNet v1)."""

    def __init__(self, cfg: CNNConfig, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_norm(cfg, c_in, c_out, 3, stride)
        self.conv2 = conv_norm(cfg, c_out, c_out, 3)
        self.shortcut = conv_norm(cfg, c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.conv1(x))  # (N, C_out, H', W')
        out = self.conv2(out)
        return self.act(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, cfg: CNNConfig) -> None:
        super().__init__()
        if len(cfg.widths) != len(cfg.blocks):
            raise ValueError(f"widths and blocks need one entry per stage, got {cfg.widths} and {cfg.blocks}")
        self.cfg = cfg
        w0 = cfg.widths[0]
        if cfg.stem == "small":
            self.stem = nn.Sequential(conv_norm(cfg, cfg.in_channels, w0, 3), nn.ReLU())
        elif cfg.stem == "imagenet":
            self.stem = nn.Sequential(
                conv_norm(cfg, cfg.in_channels, w0, 7, stride=2), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1)
            )
        else:
            raise ValueError(f"unknown stem {cfg.stem!r}; expected 'small' or 'imagenet'")
        stages: list[nn.Module] = []
        c_in = w0
        for i, (width, n_blocks) in enumerate(zip(cfg.widths, cfg.blocks, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = [
                BasicBlock(cfg, c_in if j == 0 else width, width, stride if j == 0 else 1) for j in range(n_blocks)
            ]
            stages.append(nn.Sequential(*blocks))
            c_in = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c_in, cfg.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (N, C0, H, W)
        x = self.stages(x)  # (N, C_last, H', W')
        x = x.mean(dim=(2, 3))  # (N, C_last)
        return self.head(x)  # (N, num_classes)
