"""A ViT-style transformer over image patches with pre-norm blocks.

``norm="ln"`` is the usual transformer (LayerNorm before attention and before the MLP);
``norm="bn"`` puts BatchNorm over the token features in every place LayerNorm would be.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.norms import make_token_norm

__all__ = ["ViTConfig", "ViT"]


@dataclass(frozen=True)
class ViTConfig:
    in_channels: int = 1
    image_size: int = 8
    patch_size: int = 2
    num_classes: int = 10
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 2
    norm: str = "ln"
    dropout: float = 0.0


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        if cfg.dim % cfg.heads:
            raise ValueError(f"dim must be divisible by heads, got dim={cfg.dim} and heads={cfg.heads}")
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """``keys``: optional (1, T) bool, the tokens that may be attended to (False: padding)."""
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, h, T, d)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=keys)  # (B, h, T, d)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim)
        self.fc2 = nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = make_token_norm(cfg.norm, cfg.dim)
        self.attn = Attention(cfg)
        self.norm2 = make_token_norm(cfg.norm, cfg.dim)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), keys)
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size must be divisible by patch_size, got {cfg.image_size} and {cfg.patch_size}")
        self.cfg = cfg
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Conv2d(cfg.in_channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n_patches + 1, cfg.dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.depth)])
        self.norm = make_token_norm(cfg.norm, cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self._tokens(x))
        return self.head(self.norm(x)[:, 0])  # (B, num_classes)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, T, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.pos_embed  # (B, T + 1, D)

    def forward_padded(self, x: torch.Tensor, pad: int) -> torch.Tensor:
        """Logits of images ``x`` with ``pad`` zero tokens after every sequence, as a batch of sequences
        padded to a common length holds them. Attention never reads them, so per-token norms
        (LayerNorm) give the logits ``forward`` gives, but a BatchNorm in ``train()`` mode pools them
        into its batch statistics.
        """
        x = self._tokens(x)
        x = torch.cat([x, x.new_zeros(x.shape[0], pad, x.shape[2])], dim=1)  # (B, T + 1 + pad, D)
        keys = (torch.arange(x.shape[1], device=x.device) < x.shape[1] - pad)[None, :]  # (1, T + 1 + pad)
        for block in self.blocks:
            x = block(x, keys)
        return self.head(self.norm(x)[:, 0])
