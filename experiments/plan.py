"""What the experiments train and measure: the settings of a full run and of a smoke run, and the runs."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from experiments.runs import Run, shrink
from models.zoo import DEFAULT_MODELS, ModelSpec

__all__ = ["FULL", "SMOKE", "MODELS", "Plan", "ExperimentSettings"]

MODELS = ("cnn-bn", "cnn-gn", "cnn-in", "cnn-ln", "cnn-sn", "vit-bn", "vit-ln")  # every trained default model


@dataclass(frozen=True)
class ExperimentSettings:
    seeds: tuple[int, ...] = (0, 1, 2)
    inference_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 0)  # 0: the whole held-out split
    skew_batch_size: int = 32
    companions: int = 31
    paddings: tuple[int, ...] = (0, 1, 2, 4, 8, 17, 34)  # zero tokens after each sequence of 17
    # Training batch size: every run has the same number of epochs (as in the GN paper), and Adam's
    # learning rate scales with the square root of the batch size, lr = sweep_lr * sqrt(B / 64).
    sweep_batch_sizes: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    sweep_epochs: int = 5
    sweep_lr: float = 6e-3
    momenta: tuple[float, ...] = (0.01, 0.1, 0.5)
    momentum_batch_size: int = 16
    mlp_epochs: int = 50
    latency_rounds: int = 300
    smoke: bool = False
    max_steps: int | None = None  # stop every training after this many steps (smoke)


FULL = ExperimentSettings()
SMOKE = ExperimentSettings(
    seeds=(0, 1),
    inference_batch_sizes=(1, 2, 0),
    companions=3,
    paddings=(0, 4),
    sweep_batch_sizes=(2, 16),
    sweep_epochs=1,
    momenta=(0.01, 0.1),
    mlp_epochs=2,
    latency_rounds=3,
    smoke=True,
    max_steps=3,
)


@dataclass(frozen=True)
class Plan:
    settings: ExperimentSettings

    def _base(self, name: str) -> ModelSpec:
        spec = DEFAULT_MODELS[name]
        return shrink(spec) if self.settings.smoke else spec

    def model(self, name: str, seed: int) -> Run:
        """A default model at ``seed``; at its own seed it is the served model itself."""
        base = self._base(name)
        if base.train is None:
            raise ValueError(f"{name} is not trained; the experiments need trained models")
        spec = base if seed == base.train.seed else replace(base, name=f"{name}-seed{seed}")
        return Run(replace(spec, train=replace(base.train, seed=seed)), export=True, max_steps=self.settings.max_steps)

    def sweep(self, norm: str, batch_size: int, seed: int, momentum: float = 0.1) -> Run:
        """cnn-``norm`` trained at ``batch_size`` for the sweep's fixed number of epochs."""
        s = self.settings
        base = self._base(f"cnn-{norm}")
        if base.train is None:
            raise ValueError(f"cnn-{norm} is not trained; the experiments need trained models")
        train = replace(
            base.train,
            batch_size=batch_size,
            epochs=s.sweep_epochs,
            lr=s.sweep_lr * math.sqrt(batch_size / 64),
            seed=seed,
            bn_momentum=momentum,
        )
        tag = f"b{batch_size}" + ("" if momentum == 0.1 else f"-m{momentum:g}")
        spec = replace(base, name=f"sweep-cnn-{norm}-{tag}-seed{seed}", train=train, min_test_accuracy=None)
        return Run(spec, max_steps=s.max_steps)

    def model_runs(self) -> dict[str, list[Run]]:
        return {name: [self.model(name, seed) for seed in self.settings.seeds] for name in MODELS}

    def sweep_runs(self) -> dict[str, list[Run]]:
        s = self.settings
        return {
            f"cnn-{norm}-b{b}": [self.sweep(norm, b, seed) for seed in s.seeds]
            for norm in ("bn", "gn")
            for b in s.sweep_batch_sizes
        }

    def momentum_runs(self) -> dict[str, list[Run]]:
        s = self.settings
        return {
            f"m{m:g}": [self.sweep("bn", s.momentum_batch_size, seed, momentum=m) for seed in s.seeds]
            for m in s.momenta
        }

    def all_runs(self) -> list[Run]:
        groups = [self.model_runs(), self.sweep_runs(), self.momentum_runs()]
        unique = {run.name: run for group in groups for runs in group.values() for run in runs}
        return list(unique.values())
