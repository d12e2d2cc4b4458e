"""
Train one model of the default set on the handwritten digits.

    python -m models.train cnn-bn                  # -> artifacts/cnn-bn/
    python -m models.train vit-ln --epochs 80
    python -m models.train resnet18-bn             # untrained: random weights, calibrated BN statistics
    python -m models.train --list

Writes, under <out>/<name>/:
    checkpoint.pt         config + weights; torch.load(path, weights_only=True) reads it
    training_log.json     loss and accuracy per epoch, final validation and test accuracy
    bn_history.npz        for each BatchNorm layer and training step: the batch mean and (biased)
                          variance it normalized with, and its running mean and (unbiased) variance
                          after that step's update; keys "<layer>.<stat>", arrays (steps, C)
    learning_curves.png
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm import tqdm

from models.data import load_splits
from models.norms import SwitchableNorm2d, bn_channel_dim
from models.zoo import DEFAULT_MODELS, ModelSpec, build_model, config_to_dict, spec_fields

__all__ = [
    "CHECKPOINT_FORMAT",
    "BatchNormRecorder",
    "checkpoint_matches",
    "evaluate",
    "load_checkpoint",
    "random_shift",
    "train_model",
    "init_untrained",
    "make_checkpoint",
]

CHECKPOINT_FORMAT = "normserve.checkpoint/1"
BN_STATS = ("batch_mean", "batch_var", "running_mean", "running_var")


class BatchNormRecorder:
    """Records every BatchNorm layer's batch and running statistics at each training forward pass.

    Use as a context manager around training; ``arrays()`` returns ``{"<layer>.<stat>": (steps, C)}``
    plus ``"<layer>.count"`` (steps,): the number of values per channel in that step's batch.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
        self.history: dict[str, dict[str, list[torch.Tensor]]] = {
            name: {stat: [] for stat in (*BN_STATS, "count")} for name in self.layers
        }
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> BatchNormRecorder:
        for name, bn in self.layers.items():
            self._handles.append(bn.register_forward_pre_hook(self._before(name)))
            self._handles.append(bn.register_forward_hook(self._after(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _before(self, name: str) -> Callable[[_BatchNorm, tuple[torch.Tensor, ...]], None]:
        def hook(bn: _BatchNorm, args: tuple[torch.Tensor, ...]) -> None:
            if not bn.training:
                return
            x = args[0].detach()
            flat = x.movedim(bn_channel_dim(bn), 0).reshape(x.shape[bn_channel_dim(bn)], -1)  # (C, n)
            rec = self.history[name]
            rec["batch_mean"].append(flat.mean(1))
            rec["batch_var"].append(flat.var(1, unbiased=False))
            rec["count"].append(torch.tensor(flat.shape[1]))

        return hook

    def _after(self, name: str) -> Callable[[_BatchNorm, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(bn: _BatchNorm, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not bn.training or bn.running_mean is None or bn.running_var is None:
                return  # a BatchNorm without running statistics has only batch statistics to record
            self.history[name]["running_mean"].append(bn.running_mean.detach().clone())
            self.history[name]["running_var"].append(bn.running_var.detach().clone())

        return hook

    def arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for name, rec in self.history.items():
            for stat, values in rec.items():
                if values:
                    out[f"{name}.{stat}"] = torch.stack(values).numpy()
        return out


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of (N, C, H, W) by up to ``max_shift`` pixels, filling with zeros."""
    if max_shift == 0:
        return x
    n, c, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p))  # (N, C, H + 2p, W + 2p)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (N, 1, 1, W)
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (put in eval mode) on (x, y)."""
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        xb, yb = torch.tensor(x[i : i + batch_size]), torch.tensor(y[i : i + batch_size])
        logits = model(xb)
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    return loss / len(x), correct / len(x)


def make_checkpoint(spec: ModelSpec, model: nn.Module, metrics: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint dict of plain values and tensors (so ``weights_only=True`` loads it)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "name": spec.name,
        **spec_fields(spec),
        "metrics": metrics,
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


def checkpoint_matches(path: str | Path, spec: ModelSpec) -> bool:
    """Whether the checkpoint at ``path`` was made from ``spec`` as it stands now."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {k: ckpt.get(k) for k in spec_fields(spec)} == spec_fields(spec)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model stored at ``path`` in eval mode; returns (model, checkpoint without weights)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {ckpt.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    model = build_model(ckpt["arch"], ckpt["config"])
    model.load_state_dict(ckpt.pop("state_dict"), strict=True)
    return model.eval(), ckpt


def train_model(
    spec: ModelSpec, out_dir: str | Path, *, max_steps: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Train ``spec`` on the digits and write checkpoint, log, BN history and curves to ``out_dir``.

    The weights kept are those of the epoch with the best validation accuracy.
    ``max_steps`` stops early (for tests). Returns the training log.
    """
    if spec.train is None:
        raise ValueError(f"{spec.name} has no training config; use init_untrained()")
    tc = spec.train
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed)
    data = load_splits()
    x_train, y_train = torch.tensor(data.x_train), torch.tensor(data.y_train)
    model = build_model(spec.arch, config_to_dict(spec.config))
    for m in model.modules():
        if isinstance(m, _BatchNorm | SwitchableNorm2d):
            m.momentum = tc.bn_momentum
    steps_per_epoch = math.ceil(len(x_train) / tc.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tc.lr, total_steps=tc.epochs * steps_per_epoch)

    epochs: list[dict[str, float]] = []
    best_acc, best_state = -1.0, {k: v.clone() for k, v in model.state_dict().items()}
    step, start = 0, time.perf_counter()
    bar = tqdm(range(tc.epochs), desc=f"train {spec.name}", unit="epoch", disable=not progress, leave=False)
    with BatchNormRecorder(model) as recorder:
        for epoch in bar:
            model.train()
            order = torch.randperm(len(x_train), generator=gen)
            loss_sum, correct, seen = 0.0, 0, 0
            for i in range(0, len(order), tc.batch_size):
                idx = order[i : i + tc.batch_size]
                if len(idx) < 2:  # BatchNorm needs more than one value per channel
                    continue
                xb, yb = random_shift(x_train[idx], tc.max_shift, gen), y_train[idx]
                logits = model(xb)
                loss = F.cross_entropy(logits, yb, label_smoothing=tc.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.item() * len(idx)
                correct += (logits.argmax(1) == yb).sum().item()
                seen += len(idx)
                step += 1
                if max_steps is not None and step >= max_steps:
                    break
            val_loss, val_acc = evaluate(model, data.x_val, data.y_val)
            epochs.append(
                {
                    "epoch": epoch + 1,
                    "step": step,
                    "train_loss": loss_sum / seen,
                    "train_accuracy": correct / seen,
                    "val_loss": val_loss,
                    "val_accuracy": val_acc,
                    "lr": sched.get_last_lr()[0],
                    "seconds": time.perf_counter() - start,
                }
            )
            bar.set_postfix(loss=f"{epochs[-1]['train_loss']:.3f}", val_acc=f"{val_acc:.3f}")
            if val_acc > best_acc:
                best_acc, best_state = val_acc, {k: v.clone() for k, v in model.state_dict().items()}
            if max_steps is not None and step >= max_steps:
                break
        bn_arrays = recorder.arrays()

    model.load_state_dict(best_state)
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
    log = {
        "name": spec.name,
        "train_config": asdict(tc),
        "epochs": epochs,
        "best_val_accuracy": best_acc,
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "steps": step,
        "seconds": time.perf_counter() - start,
        "batchnorm": {
            name: {"momentum": bn.momentum, "eps": bn.eps, "channels": bn.num_features}
            for name, bn in recorder.layers.items()
        },
    }
    metrics = {"val_accuracy": best_acc, "test_accuracy": test_acc, "steps": step}
    torch.save(make_checkpoint(spec, model, metrics), out / "checkpoint.pt")
    (out / "training_log.json").write_text(json.dumps(log, indent=2))
    if bn_arrays:
        np.savez_compressed(out / "bn_history.npz", **bn_arrays)
    plot_learning_curves(log, out / "learning_curves.png")
    return log


@torch.no_grad()
def init_untrained(spec: ModelSpec, out_dir: str | Path, *, calibration_batches: int = 4, batch_size: int = 8) -> None:
    """Save a randomly initialized ``spec`` whose BatchNorm running statistics are real.

    Fresh BatchNorm layers hold mean 0 and variance 1, which would make folding trivial; instead
    each layer's statistics are averaged (momentum=None) over a few batches of seeded random images.
    """
    torch.manual_seed(0)
    model = build_model(spec.arch, config_to_dict(spec.config))
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    cfg = spec.config
    for _ in range(calibration_batches):
        model(torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size))
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"calibration_images": calibration_batches * batch_size}
    torch.save(make_checkpoint(spec, model.eval(), metrics), out / "checkpoint.pt")


def plot_learning_curves(log: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [e["epoch"] for e in log["epochs"]]
    tc = log["train_config"]
    how = [f"shifts up to {tc['max_shift']} px"] if tc["max_shift"] else []
    how += [f"label smoothing {tc['label_smoothing']:g}"] if tc["label_smoothing"] else []
    train_label = f"train ({', '.join(how)})" if how else "train"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(ep, [e["train_loss"] for e in log["epochs"]], label=train_label)
    ax1.plot(ep, [e["val_loss"] for e in log["epochs"]], label="validation")
    ax1.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax2.plot(ep, [e["train_accuracy"] for e in log["epochs"]], label=train_label)
    ax2.plot(ep, [e["val_accuracy"] for e in log["epochs"]], label="validation")
    ax2.set(xlabel="epoch", ylabel="accuracy", title=f"accuracy (test {log['test_accuracy']:.2%})")
    for ax, where in ((ax1, "upper right"), (ax2, "lower right")):
        ax.grid(alpha=0.3)
        ax.legend(loc=where, fontsize="small")
    fig.suptitle(log["name"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="model of the default set")
    parser.add_argument("--out", default="artifacts", help="parent folder of the model's output folder")
    parser.add_argument("--epochs", type=int, help="override the model's number of epochs")
    parser.add_argument("--seed", type=int, help="override the model's seed")
    parser.add_argument("--list", action="store_true", help="list the default models and exit")
    args = parser.parse_args(argv)
    if args.list or not args.name:
        for spec in DEFAULT_MODELS.values():
            print(f"{spec.name:14s} {spec.description}")
        return
    if args.name not in DEFAULT_MODELS:
        parser.error(f"unknown model {args.name!r}; expected one of {', '.join(DEFAULT_MODELS)}")
    spec = DEFAULT_MODELS[args.name]
    out = Path(args.out) / spec.name
    if spec.train is None:
        init_untrained(spec, out)
        print(f"{spec.name}: untrained checkpoint written to {out}")
        return
    overrides = {k: v for k, v in (("epochs", args.epochs), ("seed", args.seed)) if v is not None}
    spec = replace(spec, train=replace(spec.train, **overrides))
    log = train_model(spec, out)
    print(f"{spec.name}: test accuracy {log['test_accuracy']:.2%} in {log['seconds']:.0f} s, written to {out}")


if __name__ == "__main__":
    main()
