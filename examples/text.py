"""A small text classifier on token ids: a BERT-style encoder with BatchNorm for LayerNorm, 2 classes.

Imitates a BERT encoder (token and learned position embeddings, post-norm layers
``x = norm(x + sublayer(x))``, mean pooling over the real tokens, a linear classifier) in the
"Transformer-BN" form of Shen et al., "PowerNorm: Rethinking Batch Normalization in Transformers"
(2020): BatchNorm1d over the D features where BERT has LayerNorm, applied to (B, D, T) through a
transpose. The MLP also has a BatchNorm1d over its hidden features, applied to the (B*T, 4D) rows
right after its first Linear. Attention is written out: scores of padded keys (``attention_mask``
False) are set to -1e9 before the softmax, so a row of padding gets no weight and a row with no
real token at all still gives finite numbers. Two layers, D = 64, 4 heads; 0.17M parameters.

BatchNorms (6), three per layer:

- fold (2): ``layers.*.mlp.bn`` directly follows the bias-free Linear ``layers.*.mlp.fc1`` on
  (B*T, 4D) rows, so it folds into it;
- cannot fold (4): ``layers.*.norm1`` and ``layers.*.norm2`` normalize a residual sum
  (``x + attn(x)``, ``x + mlp(x)``), reached through a transpose, and their output, transposed
  back, feeds the next residual sum as well as the next sublayer (or the pooling), so they fold
  neither back nor forward; normserve keeps them as a per-channel multiply and add.

Inputs: ``token_ids`` (B, 32) int64 with 0 as padding, and ``attention_mask`` (B, 32) bool, True on
real tokens; ``forward(token_ids, attention_mask)``; output: (N, 2) logits. ``samples()`` gives 16
padded rows for ``--samples`` (save them with ``np.savez("text_samples.npz", **samples())``). ::

    normserve export examples/text.py:build --name text-bn-encoder \\
        --input token_ids:INT64:32 --input attention_mask:BOOL:32

The forward has no data-dependent Python control flow, so torch.fx traces it, and
``torch.onnx.export(..., dynamo=True)`` exports it with a dynamic batch axis on both inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from examples._calibrate import BATCH_SIZE, BATCHES, build_calibrated

__all__ = ["INPUTS", "MASKED", "TextConfig", "SelfAttention", "MLP", "EncoderLayer", "TextEncoder", "build", "samples"]

INPUTS = ("token_ids:INT64:32", "attention_mask:BOOL:32")
MASKED = -1e9  # the score of a padded key: exp() of it is 0, and a row of them stays finite (no -inf - -inf)


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 1000
    seq_len: int = 32
    num_classes: int = 2
    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    pad_id: int = 0


class SelfAttention(nn.Module):
    """Multi-head self-attention in which padded keys get no weight."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        if cfg.dim % cfg.heads:
            raise ValueError(f"dim must be divisible by heads, got dim={cfg.dim} and heads={cfg.heads}")
        self.heads = cfg.heads
        self.scale = (cfg.dim // cfg.heads) ** -0.5
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, T, d)
        scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, h, T, T)
        scores = scores.masked_fill(~attention_mask[:, None, None, :], MASKED)
        y = F.softmax(scores, dim=-1) @ v  # (B, h, T, d)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class MLP(nn.Module):
    """Linear -> BatchNorm1d -> GELU -> Linear on every token, as (B*T, D) rows."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        hidden = cfg.mlp_ratio * cfg.dim
        self.fc1 = nn.Linear(cfg.dim, hidden, bias=False)  # the BatchNorm's shift replaces the bias
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.fc1(x.flatten(0, 1)))  # (B*T, 4D)
        return self.fc2(F.gelu(h)).reshape_as(x)  # (B, T, D)


class EncoderLayer(nn.Module):
    """Post-norm encoder layer: x = norm1(x + attn(x)), then x = norm2(x + mlp(x))."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.norm1 = nn.BatchNorm1d(cfg.dim)
        self.mlp = MLP(cfg)
        self.norm2 = nn.BatchNorm1d(cfg.dim)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1((x + self.attn(x, attention_mask)).transpose(1, 2)).transpose(1, 2)  # (B, T, D)
        return self.norm2((x + self.mlp(x)).transpose(1, 2)).transpose(1, 2)  # (B, T, D)


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.seq_len, cfg.dim) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.depth))
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        nn.init.normal_(self.tok_embed.weight, std=0.02)

    def forward(self, token_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.tok_embed(token_ids) + self.pos_embed  # (B, T, D)
        for layer in self.layers:
            x = layer(x, attention_mask)
        keep = attention_mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        x = (x * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)  # (B, D), the mean of the real tokens
        return self.head(x)  # (B, num_classes)


def padded_tokens(cfg: TextConfig, generator: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (B, T) and their mask (B, T): each row real for a random length, padding after."""
    lengths = torch.randint(cfg.seq_len // 4, cfg.seq_len + 1, (batch,), generator=generator)  # (B,)
    mask = torch.arange(cfg.seq_len) < lengths[:, None]  # (B, T)
    ids = torch.randint(1, cfg.vocab_size, (batch, cfg.seq_len), generator=generator)
    return ids.masked_fill(~mask, cfg.pad_id), mask


def _calibration_batches(cfg: TextConfig, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for _ in range(BATCHES):
        yield padded_tokens(cfg, generator, BATCH_SIZE)


def build(seed: int = 0) -> nn.Module:
    """The encoder with seeded random weights and calibrated running statistics, in eval mode."""
    cfg = TextConfig()
    return build_calibrated(lambda: TextEncoder(cfg), lambda g: _calibration_batches(cfg, g), seed)


def samples(seed: int = 1) -> dict[str, np.ndarray]:
    """16 padded rows: ``token_ids`` (16, 32) int64 and ``attention_mask`` (16, 32) bool."""
    ids, mask = padded_tokens(TextConfig(), torch.Generator().manual_seed(seed), 16)
    return {"token_ids": ids.numpy(), "attention_mask": mask.numpy()}
