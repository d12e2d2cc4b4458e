"""A fully convolutional network for 2-channel signals of 128 steps, 5 classes.

Imitates the FCN baseline for time-series classification (Wang, Yan and Oates, "Time Series
Classification from Scratch with Deep Neural Networks", 2017): three Conv1d + BatchNorm1d + ReLU
blocks with "same" padding, global average pooling over time, and a linear classifier. The paper's
kernels 8, 5, 3 become 7, 5, 3 (an odd kernel pads both ends alike; PyTorch warns that an even one
may copy the input to pad it), and its 128-256-128 filters are halved to 64-128-64. 0.07M parameters.

BatchNorms (3): ``blocks.0.1``, ``blocks.1.1`` and ``blocks.2.1``, each directly after a bias-free
Conv1d, so all three fold into their conv.

Input: one signal tensor of 2 channels by 128 steps, ``--input signal:FP32:2,128``; output: (N, 5)
logits. ::

    normserve export examples/conv1d.py:build --name fcn-signal --input signal:FP32:2,128
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from examples._calibrate import build_calibrated, gaussian_batches

__all__ = ["INPUTS", "FCNConfig", "FCN", "build"]

INPUTS = ("signal:FP32:2,128",)


@dataclass(frozen=True)
class FCNConfig:
    in_channels: int = 2
    steps: int = 128
    num_classes: int = 5
    widths: tuple[int, ...] = (64, 128, 64)
    kernels: tuple[int, ...] = (7, 5, 3)  # odd, so "same" padding is symmetric


def conv_bn_relu(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    """Conv1d (no bias, "same" padding: odd kernels) + BatchNorm1d + ReLU."""
    conv = nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm1d(c_out), nn.ReLU())


class FCN(nn.Module):
    def __init__(self, cfg: FCNConfig) -> None:
        super().__init__()
        if len(cfg.widths) != len(cfg.kernels):
            raise ValueError(f"widths and kernels need one entry per block, got {cfg.widths} and {cfg.kernels}")
        self.cfg = cfg
        c_ins = (cfg.in_channels, *cfg.widths[:-1])
        self.blocks = nn.Sequential(
            *(conv_bn_relu(c_in, c_out, k) for c_in, c_out, k in zip(c_ins, cfg.widths, cfg.kernels, strict=True))
        )
        self.head = nn.Linear(cfg.widths[-1], cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)  # (N, C_last, T)
        x = x.mean(dim=2)  # (N, C_last)
        return self.head(x)  # (N, num_classes)


def build(seed: int = 0) -> nn.Module:
    """The FCN with seeded random weights and calibrated running statistics, in eval mode."""
    cfg = FCNConfig()
    return build_calibrated(lambda: FCN(cfg), lambda g: gaussian_batches((cfg.in_channels, cfg.steps), g), seed)
