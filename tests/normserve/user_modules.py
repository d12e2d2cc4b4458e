"""Tiny user modules for the command's tests, loaded as ``tests/normserve/user_modules.py:NAME``."""

from __future__ import annotations

import torch
from torch import nn

from tests.conftest import randomize_batchnorms

VOCAB = 16
TOKENS = 8


@torch.no_grad()
def _calibrated(model: nn.Module, *inputs: torch.Tensor) -> nn.Module:
    """Random BatchNorm affines, then running statistics averaged over one train() pass of ``inputs``."""
    randomize_batchnorms(model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()(*inputs)
    return model.eval()


class TinyCNN(nn.Module):
    """Conv+BN (folds), ReLU, BN (folds forward into the unpadded 1x1 conv), pool, linear: 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.bn_after_relu = nn.BatchNorm2d(4)
        self.mix = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 2, 6, 6) -> (B, 3)
        y = self.mix(self.bn_after_relu(torch.relu(self.bn(self.conv(x)))))
        return self.head(y.mean(dim=(2, 3)))


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return _calibrated(TinyCNN(), torch.randn(32, 2, 6, 6) * 2 + 1)


class TinyText(nn.Module):
    """Token ids and a mask: embedding, a 1x1 Conv1d + BatchNorm1d over the features, masked mean, 3 logits;
    also returns the number of tokens attended as a second (INT64) output."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 6)
        self.proj = nn.Conv1d(6, 6, 1)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, token_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.bn(self.proj(self.embed(token_ids).transpose(1, 2)))  # (B, D, T)
        mask = attention_mask.unsqueeze(1).to(h.dtype)  # (B, 1, T)
        pooled = (h * mask).sum(2) / mask.sum(2).clamp(min=1.0)
        return self.head(pooled), attention_mask.sum(1)


def text_inputs(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, TOKENS), generator=g)
    lengths = torch.randint(1, TOKENS + 1, (rows, 1), generator=g)
    return ids, torch.arange(TOKENS)[None, :] < lengths


def tiny_text() -> nn.Module:
    torch.manual_seed(1)
    return _calibrated(TinyText(), *text_inputs(32, seed=1))


def raises() -> nn.Module:
    raise FileNotFoundError("weights.pt is missing")


def not_a_module() -> object:
    return {"state_dict": {}}


class Noisy(nn.Module):
    """Adds fresh noise on every call: its export cannot match it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + torch.rand_like(x[:, :2])


def noisy() -> nn.Module:
    return Noisy()
