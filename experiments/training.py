"""What training leaves in a BatchNorm: accuracy against training batch size, EMA against precise
statistics, the train-test inconsistency, the running statistics step by step, and Switchable
Norm's learned mixture. Every figure is computed from the runs' checkpoints and training logs with
the project's own code (``models.train``, ``export.precise``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from export.batch_stats import batchnorm_layers
from export.precise import precise_statistics, with_precise_statistics
from models.data import load_splits
from models.norms import SwitchableNorm2d
from models.train import evaluate, load_checkpoint

__all__ = ["batch_statistics_copy", "momentum_rule", "run_figures", "switchable_mixture", "train_mode_accuracy"]


def batch_statistics_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in ``train()`` mode whose BatchNorm (and Switchable Norm) layers normalize with
    batch statistics but never update their running ones (momentum 0)."""
    runner = copy.deepcopy(model).train()
    for m in runner.modules():
        if isinstance(m, _BatchNorm | SwitchableNorm2d):
            m.momentum = 0.0
    return runner


@torch.no_grad()
def train_mode_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int) -> float:
    """Accuracy in ``train()`` mode (batch statistics), in consecutive batches of ``batch_size``;
    the running statistics are left as they are."""
    runner = batch_statistics_copy(model)
    correct = seen = 0
    for start in range(0, len(x), batch_size):
        if len(x[start : start + batch_size]) < 2:
            continue  # as in training: a batch of one has no batch statistics
        logits = runner(torch.tensor(x[start : start + batch_size]))
        correct += int((logits.argmax(1).numpy() == y[start : start + batch_size]).sum())
        seen += len(logits)
    return correct / seen


def run_figures(checkpoint: Path) -> dict[str, Any]:
    """One run's held-out accuracy with the EMA statistics and, for BatchNorm, with precise ones,
    and its accuracy on the training split in ``train()`` and ``eval()`` mode."""
    model, meta = load_checkpoint(checkpoint)
    data = load_splits()
    tc = meta["train_config"]
    out: dict[str, Any] = {
        "name": meta["name"],
        "seed": tc["seed"],
        "batch_size": tc["batch_size"],
        "momentum": tc["bn_momentum"],
        "test_ema": evaluate(model, data.x_test, data.y_test)[1],
    }
    if batchnorm_layers(model):
        precise = with_precise_statistics(model, precise_statistics(model, data.x_train, tc["batch_size"]))
        out["test_precise"] = evaluate(precise, data.x_test, data.y_test)[1]
        out["train_eval"] = evaluate(model, data.x_train, data.y_train)[1]
        out["train_train_mode"] = train_mode_accuracy(model, data.x_train, data.y_train, tc["batch_size"])
    return out


def momentum_rule(run_dir: Path, channels: int = 3) -> dict[str, Any]:
    """From a run's ``bn_history.npz``: each layer's values per channel, how closely the running
    statistics follow ``running <- (1 - m) running + m batch`` with the unbiased and with the biased
    batch variance, and a few channels' statistics step by step for the plot."""
    history = np.load(run_dir / "bn_history.npz")
    log = json.loads((run_dir / "training_log.json").read_text())
    layers, traces = [], {}
    for name, info in log["batchnorm"].items():
        m = info["momentum"]
        bm, bv = history[f"{name}.batch_mean"], history[f"{name}.batch_var"]
        rm, rv, n = history[f"{name}.running_mean"], history[f"{name}.running_var"], history[f"{name}.count"]
        prev_mean = np.concatenate([np.zeros_like(rm[:1]), rm[:-1]])  # a fresh layer holds mean 0, variance 1
        prev_var = np.concatenate([np.ones_like(rv[:1]), rv[:-1]])
        unbiased = bv * (n / (n - 1))[:, None]
        layers.append(
            {
                "layer": name,
                "channels": info["channels"],
                "momentum": m,
                "values_per_channel": sorted({int(v) for v in n}),
                "mean_rule_error": float(np.abs(rm - ((1 - m) * prev_mean + m * bm)).max()),
                "var_rule_error_unbiased": float(np.abs(rv - ((1 - m) * prev_var + m * unbiased)).max()),
                "var_rule_error_biased": float(np.abs(rv - ((1 - m) * prev_var + m * bv)).max()),
            }
        )
        if not traces:  # the first layer: the one whose input is the image itself
            traces = {
                "layer": name,
                "batch_mean": bm[:, :channels].tolist(),
                "batch_var": bv[:, :channels].tolist(),
                "running_mean": rm[:, :channels].tolist(),
                "running_var": rv[:, :channels].tolist(),
            }
    return {"model": log["name"], "steps": log["steps"], "layers": layers, "trace": traces}


def switchable_mixture(checkpoint: Path) -> list[dict[str, Any]]:
    """Each Switchable Norm layer's learned weights of the IN, LN and BN statistics."""
    model, _ = load_checkpoint(checkpoint)
    return [{"layer": name, **m.mixture()} for name, m in model.named_modules() if isinstance(m, SwitchableNorm2d)]
