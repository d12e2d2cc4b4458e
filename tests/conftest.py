"""Tiny models shared by the tests: a few thousand parameters, seconds to train and export.

Under pytest-xdist (``make test`` runs one worker per core) each worker is a process of its own, with its
own temporary folders (``tmp_path``), its own session fixtures and servers on free ports of their own, and
torch's threads cut to its share of the cores: two workers of two threads each on two cores would spend
their time preempting one another.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from models.cnn import CNNConfig
from models.vit import ViTConfig
from models.zoo import ModelSpec, TrainConfig

# Every server a test starts (in process or as ``python -m service``) serves HTTP only, on a free port, unless
# the test asks for gRPC on a free port of its own: the default, 8001, would be taken by the first of the
# servers that run at once under xdist.
os.environ.setdefault("NORMSERVE_GRPC_PORT", "0")


def tiny_cnn_spec(norm: str = "bn", steps_epochs: int = 1) -> ModelSpec:
    return ModelSpec(
        name=f"tiny-cnn-{norm}",
        arch="cnn",
        config=CNNConfig(widths=(8, 16), blocks=(1, 1), norm=norm, groups=4),
        train=TrainConfig(epochs=steps_epochs, batch_size=32),
        max_batch_size=16,
        description="tiny test CNN",
    )


def tiny_vit_spec(norm: str = "bn") -> ModelSpec:
    return ModelSpec(
        name=f"tiny-vit-{norm}",
        arch="vit",
        config=ViTConfig(dim=16, depth=1, heads=2, norm=norm),
        train=TrainConfig(epochs=1, batch_size=32),
        max_batch_size=16,
        description="tiny test ViT",
    )


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
                m.weight.copy_(torch.randn(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g))
    return model.eval()


@pytest.fixture
def cnn_spec() -> ModelSpec:
    return tiny_cnn_spec()


@pytest.fixture
def vit_spec() -> ModelSpec:
    return tiny_vit_spec()


def pytest_configure(config: pytest.Config) -> None:
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))
