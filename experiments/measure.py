"""Every measurement behind docs/batchnorm.md, from the trained and exported runs, as plain JSON values."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from experiments import anatomy, inference, mlp, training
from experiments.plan import Plan
from experiments.runs import Located, Run, parallel
from models.data import load_splits
from models.train import load_checkpoint
from repository import REPORT_FILE

__all__ = ["measure"]

BN_MODELS = ("cnn-bn", "vit-bn")


def _version(located: dict[str, Located], run: Run) -> Path:
    version = located[run.name].version
    if version is None:
        raise ValueError(f"{run.name} was not exported")
    return version


def _graphs(located: dict[str, Located], run: Run) -> inference.Graphs:
    return inference.Graphs(_version(located, run))


def _report(located: dict[str, Located], run: Run) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((_version(located, run) / REPORT_FILE).read_text())
    return report


def _model_row(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "test_accuracy": report["test_accuracy"],
        "norm_layers": report["norm_layers"],
        "bn_statistics": report["bn_statistics"],
        "served_ops": sum(report["ops"]["served"].values()),
    }


def _figures(args: tuple[str, str]) -> dict[str, Any]:
    return training.run_figures(Path(args[1])) | {"group": args[0]}


def _mlp(args: tuple[str, int, int]) -> dict[str, Any]:
    return mlp.train_mlp(args[0], args[1], epochs=args[2])


def measure(plan: Plan, located: dict[str, Located], jobs: int = 2) -> dict[str, Any]:
    """Run every section; returns ``{section: figures}``."""
    s = plan.settings
    data = load_splits()
    x, y = np.array(data.x_test), np.array(data.y_test)
    models = plan.model_runs()
    sizes = [size or len(x) for size in s.inference_batch_sizes]
    first = {name: runs[0] for name, runs in models.items()}
    out: dict[str, Any] = {"settings": {k: v for k, v in vars(s).items()}, "test_samples": len(x)}

    sections: dict[str, Callable[[], Any]] = {
        "models": lambda: {name: [_model_row(_report(located, r)) for r in runs] for name, runs in models.items()},
        "inference_batch_size": lambda: {
            "sizes": sizes,
            "models": {
                name: [inference.batch_size_accuracy(_graphs(located, r), x, y, sizes) for r in runs]
                for name, runs in models.items()
            },
        },
        "skewed": lambda: {
            name: [inference.skewed_batches(_graphs(located, r), x, y, s.skew_batch_size) for r in models[name]]
            for name in BN_MODELS
        },
        "companions": lambda: {
            name: inference.companions(_graphs(located, first[name]), x, y, 0, s.companions) for name in BN_MODELS
        },
        "padding": lambda: {
            name: [
                inference.padded_tokens(
                    load_checkpoint(located[r.name].checkpoint)[0], x, y, list(s.paddings), s.skew_batch_size
                )
                for r in models[name]
            ]
            for name in ("vit-bn", "vit-ln")
        },
        "train_batch_size": lambda: parallel(
            _figures,
            [(group, str(located[r.name].checkpoint)) for group, runs in plan.sweep_runs().items() for r in runs],
            jobs=jobs,
            desc="training batch size: precise statistics and train() accuracy",
        ),
        "momentum": lambda: parallel(
            _figures,
            [(group, str(located[r.name].checkpoint)) for group, runs in plan.momentum_runs().items() for r in runs],
            jobs=jobs,
            desc="momentum: precise statistics",
        ),
        "running_stats": lambda: {
            name: training.momentum_rule(located[first[name].name].checkpoint.parent) for name in BN_MODELS
        },
        "mlp": lambda: parallel(
            _mlp,
            [(v, seed, s.mlp_epochs) for v in mlp.VARIANTS for seed in s.seeds],
            jobs=jobs,
            desc="the classic MLP",
        ),
        "fold": lambda: anatomy.fold_figures(
            located[first["cnn-bn"].name].checkpoint, _version(located, first["cnn-bn"]), s.latency_rounds
        ),
        "axes": lambda: anatomy.norm_axes(
            {name: load_checkpoint(located[run.name].checkpoint)[0] for name, run in first.items()}
        ),
        "switchable": lambda: [training.switchable_mixture(located[r.name].checkpoint) for r in models["cnn-sn"]],
    }
    bar = tqdm(sections.items(), desc="experiments: measure", unit="section")
    for name, section in bar:
        bar.set_postfix_str(name)
        out[name] = section()
    return out
