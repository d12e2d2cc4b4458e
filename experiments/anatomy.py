"""The mechanics: what folding does to a graph, its weights and its latency, and which axes each
norm reduces over, checked on the models' own layers and activations.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from experiments.training import batch_statistics_copy
from export.build import NORM_TYPES
from export.fold import fold_batchnorms
from export.onnx_export import INPUT_NAME, export_onnx, op_histogram
from models.data import load_splits
from models.norms import SwitchableNorm2d
from models.train import load_checkpoint
from repository import MODEL_FILE

__all__ = ["AXES_4D", "AXES_3D", "fold_figures", "norm_axes"]

AXES_4D: dict[str, tuple[int, ...] | str] = {
    "N, H, W": (0, 2, 3),
    "H, W": (2, 3),
    "C": (1,),
    "C, H, W": (1, 2, 3),
    "C/G, H, W (each group)": "groups",
}
AXES_3D: dict[str, tuple[int, ...] | str] = {"B, T": (0, 1), "T": (1,), "D": (2,)}


def _session(model: onnx.ModelProto, optimize: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = 1  # one thread for every graph, so that the comparison is of the graphs
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _latencies(sessions: dict[str, ort.InferenceSession], x: np.ndarray, rounds: int) -> dict[str, float]:
    """Median seconds per run of each session, the sessions interleaved round by round."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, {INPUT_NAME: x})  # warm-up
    for _ in range(rounds):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, {INPUT_NAME: x})
            times[name].append(time.perf_counter() - start)
    return {k: float(np.median(v)) for k, v in times.items()}


@torch.no_grad()
def fold_figures(
    checkpoint: Path, version: Path, rounds: int, batch_sizes: tuple[int, ...] = (1, 64)
) -> dict[str, Any]:
    """Operator counts, latencies and one channel's weights of a BatchNorm model, unfolded and folded."""
    model, meta = load_checkpoint(checkpoint)
    x = load_splits().x_test
    example = torch.tensor(x[:2])
    folded = fold_batchnorms(model, example)
    unfolded_graph = export_onnx(model, example, optimize=False)
    served = onnx.load(version / MODEL_FILE)
    sessions = {
        "unfolded, onnxruntime optimizations off": _session(unfolded_graph, optimize=False),
        "unfolded, onnxruntime optimizations on": _session(unfolded_graph, optimize=True),
        "folded (served), optimizations off": _session(served, optimize=False),
        "folded (served), optimizations on": _session(served, optimize=True),
    }
    latency = {str(b): _latencies(sessions, np.ascontiguousarray(x[:b]), rounds) for b in batch_sizes}
    reference = model(torch.tensor(x)).numpy()
    fold = folded.folds[0]
    conv, bn = model.get_submodule(fold.layer), model.get_submodule(fold.norm)
    folded_conv = folded.model.get_submodule(fold.layer)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return {
        "model": meta["name"],
        "ops": {
            "unfolded": op_histogram(unfolded_graph),
            "folded": op_histogram(export_onnx(folded.model, example, optimize=False)),
            "served": op_histogram(served),
        },
        "folds": len(folded.folds),
        "latency_seconds": latency,
        "max_abs_error": {
            "folded PyTorch vs unfolded": float(np.abs(folded.model(torch.tensor(x)).numpy() - reference).max()),
            "served graph (onnxruntime) vs unfolded": float(
                np.abs(sessions["folded (served), optimizations on"].run(None, {INPUT_NAME: x})[0] - reference).max()
            ),
        },
        "channel": {
            "conv": fold.layer,
            "norm": fold.norm,
            "weight_before": conv.weight[0].tolist(),
            "bias_before": 0.0 if conv.bias is None else float(conv.bias[0]),
            "gamma": float(bn.weight[0]),
            "beta": float(bn.bias[0]),
            "running_mean": float(bn.running_mean[0]),
            "running_var": float(bn.running_var[0]),
            "eps": bn.eps,
            "weight_after": folded_conv.weight[0].tolist(),
            "bias_after": float(folded_conv.bias[0]),
            "formula_error": float(
                max(
                    (folded_conv.weight[0] - conv.weight[0] * scale[0]).abs().max(),
                    (folded_conv.bias[0] - (bn.bias[0] - bn.running_mean[0] * scale[0])).abs(),
                )
            ),
        },
    }


def _normalize(x: torch.Tensor, axes: tuple[int, ...] | str, eps: float, groups: int) -> torch.Tensor:
    if axes == "groups":
        g = x.reshape(x.shape[0], groups, -1)
        mean, var = g.mean(-1, keepdim=True), g.var(-1, unbiased=False, keepdim=True)
        return ((g - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    mean, var = x.mean(axes, keepdim=True), x.var(axes, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def _affine(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    if weight is None:
        return y
    shape = [1] * y.ndim
    shape[1 if y.ndim == 4 and not isinstance(layer, nn.LayerNorm) else -1] = -1
    return y * weight.view(shape) + bias.view(shape)


@torch.no_grad()
def norm_axes(models: dict[str, nn.Module], samples: int = 16) -> list[dict[str, Any]]:
    """For each model's first norm layer: which axes its statistics are taken over, found by trying
    every candidate against the layer's own output on the activations it really receives.

    A BatchNorm is run with batch statistics (``train()`` mode, running statistics untouched), the
    statistics it reduces for. Switchable Norm mixes three candidates, so it is checked against its
    mixture formula instead.
    """
    x = torch.tensor(load_splits().x_test[:samples])
    rows = []
    for name, model in models.items():
        layer_name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, NORM_TYPES))
        seen: list[torch.Tensor] = []
        handle = layer.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0]))
        model.eval()(x)
        handle.remove()
        activations = seen[0]
        probe = batch_statistics_copy(layer)
        output = probe(activations)
        candidates = AXES_4D if activations.ndim == 4 else AXES_3D
        eps = float(getattr(layer, "eps", 1e-5))
        groups = getattr(layer, "num_groups", 1)
        errors = {
            label: float((_affine(layer, _normalize(activations, axes, eps, groups)) - output).abs().max())
            for label, axes in candidates.items()
        }
        best = min(errors, key=errors.__getitem__)
        row = {
            "model": name,
            "layer": f"{layer_name} ({type(layer).__name__})",
            "input": "(" + ", ".join(str(d) for d in activations.shape) + ")",
            "reduces_over": best,
            "error": errors[best],
            "next_best_error": min(v for k, v in errors.items() if k != best),
        }
        if isinstance(layer, SwitchableNorm2d):
            row["reduces_over"] = "mixture of H, W (IN), C, H, W (LN) and N, H, W (BN)"
            row["error"] = _switchable_error(probe, activations, output)
            row["next_best_error"] = min(errors.values())
        rows.append(row)
    return rows


def _switchable_error(layer: SwitchableNorm2d, x: torch.Tensor, output: torch.Tensor) -> float:
    mix = layer.mixture()
    sources = {"in": (2, 3), "ln": (1, 2, 3), "bn": (0, 2, 3)}
    mean = sum(mix["mean"][k] * x.mean(a, keepdim=True) for k, a in sources.items())
    var = sum(mix["var"][k] * x.var(a, unbiased=False, keepdim=True) for k, a in sources.items())
    y = (x - mean) / torch.sqrt(var + layer.eps)
    return float((_affine(layer, y) - output).abs().max())
