"""A small DenseNet-BC for 32x32 RGB images, 10 classes.

Imitates torchvision's ``densenet121`` (and the paper's DenseNet-BC for CIFAR): in a dense block
each layer reads the concatenation of the block's input and every earlier layer's output, and
adds ``growth`` new channels through BN -> ReLU -> 1x1 conv (to ``bn_size * growth``) -> BN -> ReLU
-> 3x3 conv; the block returns the concatenation of them all. Between blocks a transition
BN -> ReLU -> 1x1 conv (halving the channels) -> 2x2 average pool; after the last block a final BN
and ReLU before pooling. The stem is a stride-2 3x3 conv + BN + ReLU (ImageNet DenseNets downsample
in the stem too, with a 7x7/2 conv and a max pool), so the blocks run at 16, 8 and 4 pixels square.
0.07M parameters.

BatchNorms (22), in pre-activation order, so most of them cannot fold into the layer before:

- fold (10): ``features.norm0`` after the stem conv, and each dense layer's ``norm2``, which
  directly follows its 1x1 ``conv1``;
- cannot fold (12): each dense layer's ``norm1``, each transition's ``norm`` and the final
  ``features.norm5`` read a ``torch.cat`` of feature maps (in a block's first layer, of the one map
  the block was given), not a conv's output; the maps are read by later layers too, so the convs
  that made them cannot absorb a BN's scale either, and the ReLU after each such BN stops it folding
  forward into the next conv. normserve keeps them as a per-channel multiply and add.

Input: one image tensor, ``--input input:FP32:3,32,32``; output: (N, 10) logits. ::

    normserve export examples/densenet.py:build --name densenet-bc --input input:FP32:3,32,32
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from examples._calibrate import build_calibrated, gaussian_batches

__all__ = ["INPUTS", "DenseNetConfig", "DenseLayer", "DenseBlock", "Transition", "DenseNet", "build"]

INPUTS = ("input:FP32:3,32,32",)


@dataclass(frozen=True)
class DenseNetConfig:
    in_channels: int = 3
    image_size: int = 32
    num_classes: int = 10
    growth: int = 12  # channels each dense layer adds (k)
    block_layers: tuple[int, ...] = (3, 3, 3)
    bn_size: int = 4  # the 1x1 bottleneck conv has bn_size * growth channels
    compression: float = 0.5  # a transition keeps this fraction of the channels


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv-BN-ReLU-3x3 conv over the concatenation of all earlier feature maps."""

    def __init__(self, c_in: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)  # (N, C_in, H, W)
        x = self.conv1(self.relu1(self.norm1(x)))  # (N, bn_size * growth, H, W)
        return self.conv2(self.relu2(self.norm2(x)))  # (N, growth, H, W)


class DenseBlock(nn.Module):
    def __init__(self, n_layers: int, c_in: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(c_in + i * growth, growth, bn_size) for i in range(n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)  # (N, C_in + n_layers * growth, H, W)


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv-2x2 average pool: fewer channels, half the resolution."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(c_in)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.pool = nn.AvgPool2d(2, stride=2)


class DenseNet(nn.Module):
    def __init__(self, cfg: DenseNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = 2 * cfg.growth
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(cfg.in_channels, c, 3, stride=2, padding=1, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(c))
        self.features.add_module("relu0", nn.ReLU())
        for i, n_layers in enumerate(cfg.block_layers):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(n_layers, c, cfg.growth, cfg.bn_size))
            c += n_layers * cfg.growth
            if i != len(cfg.block_layers) - 1:
                c_out = int(c * cfg.compression)
                self.features.add_module(f"transition{i + 1}", Transition(c, c_out))
                c = c_out
        self.features.add_module(f"norm{len(cfg.block_layers) + 2}", nn.BatchNorm2d(c))
        self.relu = nn.ReLU()
        self.classifier = nn.Linear(c, cfg.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.features(x))  # (N, C_last, 4, 4)
        x = x.mean(dim=(2, 3))  # (N, C_last)
        return self.classifier(x)  # (N, num_classes)


def build(seed: int = 0) -> nn.Module:
    """The DenseNet with seeded random weights and calibrated running statistics, in eval mode."""
    cfg = DenseNetConfig()
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    return build_calibrated(lambda: DenseNet(cfg), lambda g: gaussian_batches(shape, g), seed)
