"""A plain CNN whose depth follows its input's size: torch.fx cannot trace it, torch.export can.

Imitates a VGG-style stack of Conv2d + BatchNorm2d + ReLU with stride-2 downsampling, written the
way resolution-agnostic models often are: the forward keeps downsampling *while the feature map is
wider than 4 pixels* (``if x.shape[-1] <= min_size: break``), with stages that keep the width, so
a 16x16 input runs both downsampling stages, an 8x8 one would run one, and a 32x32 one would stop
after the two there are. 0.02M parameters, 10 classes.

Why fx fails and export works: ``torch.fx.symbolic_trace`` runs the forward on Proxy objects,
whose ``x.shape[-1]`` is itself a Proxy, and Python's ``if`` asks it for a ``bool``, so tracing
raises ``TraceError: symbolically traced variables cannot be used as inputs to control flow``.
``torch.export`` (``torch.onnx.export(..., dynamo=True)``) traces with real sizes: only the batch
axis is dynamic, the width is the static 16, the ``if`` is decided once at export, and the graph
holds the two stages that run. The condition reads a shape, not a value, on purpose: a branch on a
value such as ``x.mean() > 0`` would be decided for a whole batch at once (``torch.cond`` takes one
scalar), so a sample's output would depend on the batch it came in, which the verification refuses.
Since fx cannot trace it, normserve cannot fold it in PyTorch and folds at the ONNX level instead,
after export.

BatchNorms (4): ``stem.1``, ``downs.0.1``, ``downs.1.1`` and ``mix.1``, each directly after a
bias-free Conv2d, so in the exported graph each ``BatchNormalization`` follows its ``Conv`` and folds
into it.

Input: one image tensor, ``--input input:FP32:3,16,16``; output: (N, 10) logits. ::

    normserve export examples/untraceable.py:build --name untraceable-cnn --input input:FP32:3,16,16
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from examples._calibrate import build_calibrated, gaussian_batches

__all__ = ["INPUTS", "AdaptiveDepthConfig", "AdaptiveDepthCNN", "build"]

INPUTS = ("input:FP32:3,16,16",)


@dataclass(frozen=True)
class AdaptiveDepthConfig:
    in_channels: int = 3
    image_size: int = 16
    num_classes: int = 10
    width: int = 32  # the stem's and every downsampling stage's channels
    downs: int = 2  # downsampling stages at most
    min_size: int = 4  # stop downsampling once the feature map is this wide
    head_width: int = 64


def conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Conv (no bias) + BatchNorm2d + ReLU."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU())


class AdaptiveDepthCNN(nn.Module):
    def __init__(self, cfg: AdaptiveDepthConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.stem = conv_bn_relu(cfg.in_channels, cfg.width, 3)
        self.downs = nn.ModuleList(conv_bn_relu(cfg.width, cfg.width, 3, stride=2) for _ in range(cfg.downs))
        self.mix = conv_bn_relu(cfg.width, cfg.head_width, 1)
        self.head = nn.Linear(cfg.head_width, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (N, width, H, W)
        for down in self.downs:
            if x.shape[-1] <= self.cfg.min_size:  # Python control flow on a size: fx cannot trace this
                break
            x = down(x)  # (N, width, H / 2, W / 2)
        x = self.mix(x)  # (N, head_width, 4, 4) for a 16x16 input
        x = x.mean(dim=(2, 3))  # (N, head_width)
        return self.head(x)  # (N, num_classes)


def build(seed: int = 0) -> nn.Module:
    """The CNN with seeded random weights and calibrated running statistics, in eval mode."""
    cfg = AdaptiveDepthConfig()
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    return build_calibrated(lambda: AdaptiveDepthCNN(cfg), lambda g: gaussian_batches(shape, g), seed)
