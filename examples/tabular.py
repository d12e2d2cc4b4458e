"""A tabular MLP over 20 numeric features with a 2-target regression head.

Imitates the MLP of fastai's ``TabularModel`` for continuous features (no categorical embeddings):
a BatchNorm1d that standardizes the raw features (``bn_input``), hidden blocks of a bias-free
Linear + BatchNorm1d + ReLU, and a linear head. fastai orders its blocks Linear -> ReLU -> BatchNorm
by default, which would not fold; these blocks use the Linear -> BatchNorm -> ReLU order, which does.
The head is a regression one: two real-valued targets per row, no activation, so the outputs are
predictions, not logits. 0.05M parameters.

BatchNorms (4):

- fold (3): ``blocks.0.1``, ``blocks.1.1`` and ``blocks.2.1``, each directly after a bias-free
  Linear with (N, C) output;
- cannot fold into a layer before it (1): ``bn_input`` reads the model's input itself. It feeds the
  first Linear alone, so it can fold *forward* into it (``W diag(scale)``, ``b + W shift``) where the
  folder does that.

Input: one feature vector per row, ``--input features:FP32:20``; output: (N, 2) predictions. ::

    normserve export examples/tabular.py:build --name tabular-mlp --input features:FP32:20
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from examples._calibrate import build_calibrated, gaussian_batches

__all__ = ["INPUTS", "TabularConfig", "TabularMLP", "build"]

INPUTS = ("features:FP32:20",)


@dataclass(frozen=True)
class TabularConfig:
    n_features: int = 20
    n_targets: int = 2
    hidden: tuple[int, ...] = (256, 128, 64)


def linear_bn_relu(d_in: int, d_out: int) -> nn.Sequential:
    """Linear (no bias: the BatchNorm's shift replaces it) + BatchNorm1d + ReLU."""
    return nn.Sequential(nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU())


class TabularMLP(nn.Module):
    def __init__(self, cfg: TabularConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.bn_input = nn.BatchNorm1d(cfg.n_features)
        d_ins = (cfg.n_features, *cfg.hidden[:-1])
        self.blocks = nn.Sequential(*(linear_bn_relu(d_in, d) for d_in, d in zip(d_ins, cfg.hidden, strict=True)))
        self.head = nn.Linear(cfg.hidden[-1], cfg.n_targets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn_input(x)  # (N, n_features), standardized
        x = self.blocks(x)  # (N, hidden[-1])
        return self.head(x)  # (N, n_targets)


def build(seed: int = 0) -> nn.Module:
    """The MLP with seeded random weights and calibrated running statistics, in eval mode."""
    cfg = TabularConfig()
    return build_calibrated(lambda: TabularMLP(cfg), lambda g: gaussian_batches((cfg.n_features,), g), seed)
