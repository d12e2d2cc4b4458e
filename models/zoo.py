"""The default model set and how to rebuild a model from its stored config."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from models.cnn import RESNET18, CNNConfig, ResNet
from models.vit import ViT, ViTConfig

__all__ = ["TrainConfig", "ModelSpec", "DEFAULT_MODELS", "build_model", "config_to_dict", "spec_fields"]

ARCHS: dict[str, tuple[type, type[nn.Module]]] = {"cnn": (CNNConfig, ResNet), "vit": (ViTConfig, ViT)}


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    max_shift: int = 1  # augmentation: random translation by up to this many pixels
    seed: int = 0
    bn_momentum: float = 0.1  # every BatchNorm's (and Switchable Norm's) running-statistics momentum


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: str
    config: CNNConfig | ViTConfig
    train: TrainConfig | None  # None: untrained, random weights with calibrated BatchNorm statistics
    max_batch_size: int = 64
    description: str = ""
    min_test_accuracy: float | None = None  # the export is refused below this, on the held-out digits


def _cnn(norm: str) -> ModelSpec:
    return ModelSpec(
        name=f"cnn-{norm}",
        arch="cnn",
        config=CNNConfig(norm=norm),
        train=TrainConfig(epochs=30),
        min_test_accuracy=0.97,
        description=f"ResNet-style CNN (2 stages, 32/64 channels) with {norm.upper()} on 8x8 digits",
    )


def _vit(norm: str) -> ModelSpec:
    return ModelSpec(
        name=f"vit-{norm}",
        arch="vit",
        config=ViTConfig(norm=norm),
        train=TrainConfig(epochs=60, lr=2e-3, weight_decay=5e-2, label_smoothing=0.1),
        min_test_accuracy=0.95,
        description=f"ViT (2x2 patches, dim 64, depth 4, pre-norm) with {norm.upper()} on 8x8 digits",
    )


DEFAULT_MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        *(_cnn(norm) for norm in ("bn", "gn", "in", "ln", "sn")),
        _vit("ln"),
        _vit("bn"),
        ModelSpec(
            name="resnet18-bn",
            arch="cnn",
            config=RESNET18,
            train=None,
            max_batch_size=32,
            description="ResNet-18 with BatchNorm at 3x224x224, untrained (for latency work)",
        ),
    ]
}


def config_to_dict(config: CNNConfig | ViTConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def spec_fields(spec: ModelSpec) -> dict[str, Any]:
    """What a checkpoint records of its spec, as plain values: a changed spec means a stale checkpoint."""
    return {
        "arch": spec.arch,
        "config": config_to_dict(spec.config),
        "trained": spec.train is not None,
        "train_config": asdict(spec.train) if spec.train else None,
        "max_batch_size": spec.max_batch_size,
        "description": spec.description,
        "min_test_accuracy": spec.min_test_accuracy,
    }


def build_model(arch: str, config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from the ``arch`` name and config dict stored in a checkpoint."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
    config_cls, model_cls = ARCHS[arch]
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return model_cls(config_cls(**values))
