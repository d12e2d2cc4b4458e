"""The PNG plots of docs/batchnorm.md, drawn from the measured results (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.mlp import VARIANTS  # noqa: E402

__all__ = ["draw_all"]

COLORS = {
    "bn": "tab:red",
    "gn": "tab:blue",
    "in": "tab:green",
    "ln": "tab:purple",
    "sn": "tab:orange",
}


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def _band(ax: Any, x: Any, runs: list[list[float]], label: str, color: str | None = None, **kw: Any) -> None:
    a = np.array(runs, dtype=float)
    mean, std = a.mean(0), a.std(0, ddof=1) if len(a) > 1 else np.zeros(a.shape[1])
    ax.plot(x, mean, label=label, color=color, **kw)
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)


def batch_size(r: dict[str, Any], path: Path) -> str:
    sizes = r["sizes"]
    labels = [str(s) if s != max(sizes) else f"all ({s})" for s in sizes]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, arch in zip(axes, ("cnn", "vit"), strict=True):
        for name, seeds in r["models"].items():
            if not name.startswith(arch):
                continue
            norm = name.split("-")[1]
            x = np.arange(len(sizes))
            _band(ax, x, [100 * np.array(s["running"]) for s in seeds], f"{name}, running statistics", COLORS[norm])
            if "batch" in seeds[0]:
                runs = [100 * np.array(s["batch"]) for s in seeds]
                _band(ax, x, runs, f"{name}, batch statistics", COLORS[norm], linestyle="--", marker="o")
        ax.set(xticks=np.arange(len(sizes)), xticklabels=labels, xlabel="normalization batch size at inference")
        ax.set(title="CNNs" if arch == "cnn" else "ViTs", ylabel="held-out accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="lower right")
    return _save(fig, path)


def skewed(r: dict[str, Any], path: Path) -> str:
    fig, axes = plt.subplots(1, len(r), figsize=(11, 3.8), sharey=True)
    for ax, (name, seeds) in zip(np.atleast_1d(axes), r.items(), strict=True):
        kinds = list(seeds[0])
        x = np.arange(len(kinds))
        for i, stats in enumerate(("running", "batch")):
            values = np.array([[100 * s[k][stats] for k in kinds] for s in seeds])
            err = values.std(0, ddof=1) if len(values) > 1 else None
            ax.bar(x + (i - 0.5) * 0.38, values.mean(0), 0.38, yerr=err, label=f"{stats} statistics", capsize=3)
        ax.set(xticks=x, xticklabels=kinds, title=name, ylabel="held-out accuracy (%)", ylim=(0, 100))
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize="small", loc="lower left")
    return _save(fig, path)


def companions(r: dict[str, Any], path: Path) -> str:
    kinds = list(next(iter(r.values()))["curves"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(12, 3.6), sharey=True)
    for ax, kind in zip(axes, kinds, strict=True):
        for name, one in r.items():
            color = "tab:red" if name.startswith("cnn") else "tab:brown"
            ax.plot(one["counts"], one["curves"][kind]["running"], color=color, label=f"{name}, running")
            ax.plot(
                one["counts"],
                one["curves"][kind]["batch"],
                color=color,
                linestyle="--",
                marker=".",
                label=f"{name}, batch",
            )
        ax.set(
            title=f"companions: {kind}", xlabel="companions in the batch", ylabel="p(its own class)", ylim=(-0.02, 1.02)
        )
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    return _save(fig, path)


def padding(r: dict[str, Any], path: Path) -> str:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, seeds in r.items():
        pads = seeds[0]["pads"]
        for mode, style in (("eval", "-"), ("train", "--")):
            if mode not in seeds[0]:
                continue
            label = f"{name}, " + ("batch statistics (train())" if mode == "train" else "eval()")
            color = (
                "tab:red"
                if name == "vit-bn" and mode == "train"
                else ("tab:purple" if name == "vit-ln" else "tab:gray")
            )
            _band(
                ax1,
                pads,
                [100 * np.array(s[mode]["accuracy"]) for s in seeds],
                label,
                color,
                linestyle=style,
                marker="o",
            )
            _band(ax2, pads, [s[mode]["max_logit_change"] for s in seeds], label, color, linestyle=style, marker="o")
    ax1.set(xlabel="padding tokens after each 17-token sequence", ylabel="held-out accuracy (%)", title="accuracy")
    ax2.set(
        xlabel="padding tokens after each 17-token sequence", ylabel="max |logit change|", title="one sequence's logits"
    )
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def train_batch_size(rows: list[dict[str, Any]], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    sizes = sorted({r["batch_size"] for r in rows}, reverse=True)
    x = np.arange(len(sizes))
    for norm, key, label, style in (
        ("bn", "test_ema", "BatchNorm (EMA statistics)", "-"),
        ("bn", "test_precise", "BatchNorm (precise statistics)", ":"),
        ("gn", "test_ema", "GroupNorm", "-"),
    ):
        runs = [[100 * (1 - r[key]) for r in rows if r["name"].startswith(f"sweep-cnn-{norm}-b{b}-")] for b in sizes]
        a = np.array(runs)  # (sizes, seeds)
        ax.errorbar(
            x,
            a.mean(1),
            yerr=a.std(1, ddof=1) if a.shape[1] > 1 else None,
            label=label,
            color=COLORS[norm],
            linestyle=style,
            marker="o",
            capsize=3,
        )
    ax.set(xticks=x, xticklabels=[str(s) for s in sizes], xlabel="training batch size (images per batch)")
    ax.set(ylabel="held-out error (%)", title="error against training batch size (as the GN paper's Fig. 1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def ema_precise(momentum_rows: list[dict[str, Any]], sweep_rows: list[dict[str, Any]], path: Path) -> str:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, rows, key, xlabel in (
        (ax1, momentum_rows, "momentum", "BatchNorm momentum (training batch 16)"),
        (ax2, [r for r in sweep_rows if r["name"].startswith("sweep-cnn-bn")], "batch_size", "training batch size"),
    ):
        values = sorted({r[key] for r in rows})
        x = np.arange(len(values))
        for stat, label in (("test_ema", "EMA statistics"), ("test_precise", "precise statistics")):
            a = np.array([[100 * r[stat] for r in rows if r[key] == v] for v in values])
            ax.errorbar(
                x, a.mean(1), yerr=a.std(1, ddof=1) if a.shape[1] > 1 else None, marker="o", capsize=3, label=label
            )
        ax.set(xticks=x, xticklabels=[f"{v:g}" for v in values], xlabel=xlabel, ylabel="held-out accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    ax1.set_title("cnn-bn: EMA against precise, by momentum")
    ax2.set_title("cnn-bn: EMA against precise, by training batch size")
    return _save(fig, path)


def running_stats(r: dict[str, Any], path: Path) -> str:
    trace = r["trace"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, stat in ((ax1, "mean"), (ax2, "var")):
        batch, running = np.array(trace[f"batch_{stat}"]), np.array(trace[f"running_{stat}"])
        steps = np.arange(1, len(batch) + 1)
        for c in range(batch.shape[1]):
            color = f"C{c}"
            ax.scatter(steps, batch[:, c], s=3, alpha=0.35, color=color)
            ax.plot(steps, running[:, c], color=color, label=f"channel {c}: running")
        ax.set(xlabel="training step", ylabel=stat, title=f"{trace['layer']}: batch {stat} (dots) and running {stat}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def fold(r: dict[str, Any], path: Path) -> str:
    ch = r["channel"]
    before, after = np.array(ch["weight_before"])[0], np.array(ch["weight_after"])[0]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1, 1, 2]})
    fig.suptitle(f"{r['model']}: {ch['conv']} folded with {ch['norm']}", fontsize=10)
    for ax, w, title in ((axes[0], before, "before folding"), (axes[1], after, "after folding")):
        im = ax.imshow(w, cmap="coolwarm")
        for (i, j), v in np.ndenumerate(w):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set(title=f"channel 0, {title}", xticks=[], yticks=[])
        fig.colorbar(im, ax=ax, fraction=0.046)
    names = list(next(iter(r["latency_seconds"].values())))
    short = ["unfolded\nopt. off", "unfolded\nopt. on", "folded\nopt. off", "folded\nopt. on"]
    x = np.arange(len(names))
    for i, (batch, lat) in enumerate(r["latency_seconds"].items()):
        base = lat[names[0]]
        axes[2].bar(x + (i - 0.5) * 0.38, [lat[n] / base for n in names], 0.38, label=f"batch {batch}")
    axes[2].set(xticks=x, xticklabels=short[: len(names)], ylabel="latency / unfolded with opt. off")
    axes[2].set_title("median latency, relative (one thread)")
    axes[2].grid(alpha=0.3, axis="y")
    axes[2].legend(fontsize="small")
    return _save(fig, path)


def switchable(seeds: list[list[dict[str, Any]]], path: Path) -> str:
    layers = [row["layer"] for row in seeds[0]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), sharey=True)
    for ax, stat in zip(axes, ("mean", "var"), strict=True):
        bottom = np.zeros(len(layers))
        for source, color in (("in", COLORS["in"]), ("ln", COLORS["ln"]), ("bn", COLORS["bn"])):
            w = np.array([[row[stat][source] for row in seed] for seed in seeds]).mean(0)
            ax.bar(np.arange(len(layers)), w, bottom=bottom, color=color, label=source.upper())
            bottom += w
        ax.set(xticks=np.arange(len(layers)), title=f"cnn-sn: weights of the {stat} (mean over seeds)")
        ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
        ax.set(ylabel="softmax weight", ylim=(0, 1))
        ax.legend(fontsize="small")
    return _save(fig, path)


def mlp(runs: list[dict[str, Any]], path: Path) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for variant, color in zip(VARIANTS, ("tab:gray", "tab:green", "tab:red"), strict=True):
        mine = [r for r in runs if r["variant"] == variant]
        epochs = np.arange(1, len(mine[0]["val_loss"]) + 1)
        for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
            _band(ax, epochs, [r[f"train_{metric}"] for r in mine], f"{variant}: train", color, linestyle=":")
            _band(ax, epochs, [r[f"val_{metric}"] for r in mine], f"{variant}: validation", color)
    axes[0].set(xlabel="epoch", ylabel="binary cross-entropy", title="loss")
    axes[1].set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize="x-small")
    return _save(fig, path)


def draw_all(results: dict[str, Any], folder: Path) -> dict[str, str]:
    """Every plot, by section; returns the file names written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "inference_batch_size": batch_size(results["inference_batch_size"], folder / "inference_batch_size.png"),
        "skewed": skewed(results["skewed"], folder / "skewed_batches.png"),
        "companions": companions(results["companions"], folder / "companions.png"),
        "padding": padding(results["padding"], folder / "padded_tokens.png"),
        "train_batch_size": train_batch_size(results["train_batch_size"], folder / "training_batch_size.png"),
        "ema_precise": ema_precise(results["momentum"], results["train_batch_size"], folder / "ema_vs_precise.png"),
        "running_stats": running_stats(results["running_stats"]["cnn-bn"], folder / "running_statistics.png"),
        "fold": fold(results["fold"], folder / "fold.png"),
        "switchable": switchable(results["switchable"], folder / "switchable_mixture.png"),
        "mlp": mlp(results["mlp"], folder / "classic_mlp.png"),
    }
