"""The batch-statistics graph: the model as BatchNorm runs it in ``train()`` mode, exported on purpose.

At inference a BatchNorm normalizes each channel with its running statistics, fixed at training
time: ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``. In ``train()`` mode it
uses the statistics of the batch in front of it instead, over every axis but the channel axis
(N, H, W for images; B, T for tokens), with the biased variance::

    mean_c = E[x_c],  var_c = E[(x_c - mean_c)^2],  y_c = (x_c - mean_c) / sqrt(var_c + eps) * weight_c + bias_c

so a sample's output depends on which other samples share its batch. The dynamo exporter exports a
``train()``-mode model with running statistics anyway, so this module replaces every BatchNorm by
``BatchStatsNorm``, which computes those statistics with explicit reductions, and makes the graph
return each layer's batch mean and variance beside the logits: the service can show them without
torch. ``verify_batch_stats`` proves the graph equals PyTorch's ``train()`` output and differs from
the eval output on a batch whose statistics are not the running ones.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from export.onnx_export import OUTPUT_NAME, export_onnx
from export.verify import (
    PARITY_ATOL,
    PARITY_RTOL,
    Check,
    Feeds,
    as_feeds,
    cpu_session,
    flatten_outputs,
    rows,
    take,
)
from models.norms import bn_channel_dim

__all__ = [
    "BATCH_SIZES",
    "DIFFERENCE_FACTOR",
    "BatchStatsModel",
    "BatchStatsNorm",
    "batchnorm_layers",
    "export_batch_stats",
    "running_statistics",
    "verify_batch_stats",
]

BATCH_SIZES = (1, 2, 64)  # the batch sizes the graph is checked at against PyTorch train()
DIFFERENCE_FACTOR = 100.0  # on a skewed batch, batch and running outputs must differ by 100x the parity tolerance


def batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """Every BatchNorm of ``model`` by qualified name, in definition order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}


def _reduced_axes(ndim: int, channel_dim: int) -> list[int]:
    return [d for d in range(ndim) if d != channel_dim % ndim]


def reduced_over(shape: torch.Size, channel_dim: int) -> str:
    """The axes of an input of ``shape`` that one channel's statistics are taken over, as words for people."""
    if channel_dim % len(shape) == len(shape) - 1 and len(shape) == 3:
        return "B, T"  # tokens (B, T, D)
    names = {2: "N", 3: "N, L", 4: "N, H, W", 5: "N, D, H, W"}
    return names.get(len(shape), f"every axis but {channel_dim}")


class _Sink:
    """Where each BatchStatsNorm leaves its statistics during a forward pass. A plain object, not a
    tensor attribute: the exporter refuses tensor attributes assigned during forward."""

    def __init__(self) -> None:
        self.stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


class BatchStatsNorm(nn.Module):
    """A BatchNorm that always normalizes with the statistics of its input batch (biased variance).

    Each call leaves its batch mean and variance, each (C,), in ``sink``, for ``BatchStatsModel`` to
    return as graph outputs; a layer called twice in one forward pass is refused, since one pair of
    outputs could not hold both calls' statistics.
    """

    def __init__(self, bn: _BatchNorm, sink: _Sink) -> None:
        super().__init__()
        self.sink = sink
        self.channel_dim = bn_channel_dim(bn)
        self.eps = bn.eps
        self.weight = None if bn.weight is None else nn.Parameter(bn.weight.detach().clone())
        self.bias = None if bn.bias is None else nn.Parameter(bn.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes = _reduced_axes(x.ndim, self.channel_dim)
        mean = x.mean(dim=axes, keepdim=True)  # (1, C, 1, 1) or (1, 1, D)
        var = (x - mean).square().mean(dim=axes, keepdim=True)  # biased, as train() normalizes
        y = (x - mean) * torch.rsqrt(var + self.eps)
        shape = [1] * x.ndim
        shape[self.channel_dim] = -1
        if self.weight is not None:
            y = y * self.weight.reshape(shape)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        if id(self) in self.sink.stats:
            raise ValueError("a BatchNorm called twice in one forward pass has two sets of batch statistics")
        self.sink.stats[id(self)] = (mean.flatten(), var.flatten())
        return y


class BatchStatsModel(nn.Module):
    """``model`` with each BatchNorm replaced by ``BatchStatsNorm``.

    forward takes the model's inputs and returns ``(logits, mean_0, var_0, mean_1, var_1, ...)``: the
    model's first output, then one pair per BatchNorm in ``layer_names`` order.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        self.layer_names = list(batchnorm_layers(self.model))
        self.sink = _Sink()
        self.norms: list[BatchStatsNorm] = []
        for name in self.layer_names:
            parent, _, child = name.rpartition(".")
            norm = BatchStatsNorm(self.model.get_submodule(name), self.sink)  # type: ignore[arg-type]
            setattr(self.model.get_submodule(parent), child, norm)
            self.norms.append(norm)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.sink.stats.clear()
        logits = flatten_outputs(self.model(*inputs))[0]
        stats: list[torch.Tensor] = []
        for name, norm in zip(self.layer_names, self.norms, strict=True):
            if id(norm) not in self.sink.stats:
                raise RuntimeError(f"BatchNorm {name!r} was not called by forward; its statistics are unknown")
            stats.extend(self.sink.stats[id(norm)])
        return (logits, *stats)


def stat_output_names(count: int) -> list[str]:
    """The graph's outputs after the logits: ``batch_mean.<i>`` and ``batch_var.<i>`` per layer."""
    return [f"batch_{stat}.{i}" for i in range(count) for stat in ("mean", "var")]


def export_batch_stats(
    model: nn.Module,
    example: torch.Tensor | tuple[torch.Tensor, ...],
    input_names: list[str] | None = None,
    logits_output: str = OUTPUT_NAME,
) -> tuple[onnx.ModelProto, list[str]]:
    """Export the batch-statistics graph of ``model``; returns it and its BatchNorm layer names.

    Args:
        model: the unfolded model, eval mode.
        example: its input batch (a tuple for several inputs).
        input_names: the graph's inputs, as the served graph names them.
        logits_output: the name of the model's first output, which the graph returns before the statistics.

    Raises:
        ValueError: the model has no BatchNorm.
    """
    wrapped = BatchStatsModel(model)
    if not wrapped.layer_names:
        raise ValueError("the model has no BatchNorm layer; a batch-statistics graph would equal the served one")
    names = [logits_output, *stat_output_names(len(wrapped.layer_names))]
    proto = export_onnx(wrapped, example, input_names=input_names, output_names=names)
    return proto, wrapped.layer_names


@torch.no_grad()
def _input_shapes(
    model: nn.Module, layer_names: list[str], example: torch.Tensor | tuple[torch.Tensor, ...]
) -> dict[str, torch.Size]:
    """The shape of what each named BatchNorm receives when ``model`` (eval mode) runs ``example``."""
    shapes: dict[str, torch.Size] = {}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _, args, name=name: shapes.__setitem__(name, args[0].shape)
        )
        for name in layer_names
    ]
    try:
        model.eval()(*(example if isinstance(example, tuple) else (example,)))
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def running_statistics(
    model: nn.Module, layer_names: list[str], example: torch.Tensor | tuple[torch.Tensor, ...]
) -> list[dict[str, Any]]:
    """Per BatchNorm: what the service shows beside the batch's statistics (bn_stats.json), with the
    axes its statistics pool and how many values per channel one sample gives them (from ``example``)."""
    shapes = _input_shapes(model, layer_names, example)
    layers = []
    for i, name in enumerate(layer_names):
        bn = model.get_submodule(name)
        if not isinstance(bn, _BatchNorm) or bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"{name!r} is not a BatchNorm with running statistics")
        shape = shapes[name]
        layers.append(
            {
                "name": name,
                "type": type(bn).__name__,
                "channels": bn.num_features,
                "channel_axis": bn_channel_dim(bn),
                "reduced_over": reduced_over(shape, bn_channel_dim(bn)),
                "positions": shape.numel() // (shape[0] * bn.num_features),
                "eps": bn.eps,
                "momentum": bn.momentum,
                "running_mean": bn.running_mean.tolist(),
                "running_var": bn.running_var.tolist(),
                "mean_output": f"batch_mean.{i}",
                "var_output": f"batch_var.{i}",
            }
        )
    return layers


@dataclass
class _Reference:
    logits: np.ndarray
    stats: list[np.ndarray]  # mean_0, var_0, mean_1, var_1, ...


def _train_mode_reference(model: nn.Module, layer_names: list[str]) -> Any:
    """A copy of ``model`` whose BatchNorms run in train() mode (batch statistics), every other layer in
    eval mode, and a function that runs it and records each BatchNorm's batch statistics from its input."""
    reference = copy.deepcopy(model).eval()
    layers = batchnorm_layers(reference)
    for bn in layers.values():
        bn.train()  # updates the copy's running statistics, which train() mode does not use
    seen: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def hook(name: str, bn: _BatchNorm) -> Any:
        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().double()
            flat = x.movedim(bn_channel_dim(bn), 0).reshape(x.shape[bn_channel_dim(bn)], -1)  # (C, n)
            seen[name] = (flat.mean(1).numpy(), flat.var(1, unbiased=False).numpy())

        return record

    for name in layer_names:
        layers[name].register_forward_pre_hook(hook(name, layers[name]))

    @torch.no_grad()
    def run(feeds: Feeds) -> _Reference:
        logits = flatten_outputs(reference(*(torch.tensor(a) for a in feeds.values())))[0]
        return _Reference(logits.numpy(), [s for name in layer_names for s in seen[name]])

    return run


def _worst(ort_values: list[np.ndarray], ref_values: list[np.ndarray]) -> tuple[float, float]:
    """The largest |ort - ref|, and the largest |ort - ref| / (atol + rtol |ref|), over all arrays."""
    diff = worst = 0.0
    for got, want in zip(ort_values, ref_values, strict=True):
        d = np.abs(got.astype(np.float64) - want.astype(np.float64))
        diff = max(diff, float(d.max()))
        worst = max(worst, float((d / (PARITY_ATOL + PARITY_RTOL * np.abs(want))).max()))
    return diff, worst


def check_batch_stats_parity(session: Any, run_reference: Any, x: np.ndarray | Feeds) -> Check:
    """The graph against PyTorch train() mode at each of ``BATCH_SIZES``: logits and every layer's statistics."""
    feeds = as_feeds(x)
    figures: dict[str, Any] = {"atol": PARITY_ATOL, "rtol": PARITY_RTOL, "batches": {}}
    passed = True
    for size in BATCH_SIZES:
        batch = take(feeds, slice(0, size))
        if rows(batch) < size:
            continue
        try:
            ref = run_reference(batch)
        except ValueError as e:  # "Expected more than 1 value per channel when training"
            figures["batches"][str(size)] = {"skipped": f"PyTorch train() refuses this batch: {e}"}
            continue
        logits, *stats = session.run(None, batch)
        logit_diff, logit_worst = _worst([logits], [ref.logits])
        stat_diff, stat_worst = _worst(stats, ref.stats)
        ok = bool(np.isfinite(logits).all()) and max(logit_worst, stat_worst) <= 1.0
        passed &= ok
        figures["batches"][str(size)] = {
            "max_abs_diff_logits": logit_diff,
            "max_abs_diff_statistics": stat_diff,
            "worst_diff_over_tolerance": max(logit_worst, stat_worst),
        }
    checked = [s for s, f in figures["batches"].items() if "skipped" not in f]
    passed &= bool(checked)
    worst = max((f["worst_diff_over_tolerance"] for f in figures["batches"].values() if "skipped" not in f), default=0)
    detail = (
        f"batch-statistics graph against PyTorch train() at batch sizes {', '.join(checked) or 'none'}: "
        f"logits and per-layer batch mean/variance within {worst:.3g} of the allowed "
        f"{PARITY_ATOL:g} + {PARITY_RTOL:g} * |ref| (expected <= 1)"
    )
    return Check("batch_stats_parity", passed, detail, figures)


def skewed_batch(x: np.ndarray | Feeds, labels: np.ndarray | None, size: int = 64) -> tuple[Feeds, str]:
    """A batch whose statistics differ from the data's: one class only; brightened inputs for a model of
    one float input; else the first sample repeated (its own statistics, not the population's)."""
    feeds = as_feeds(x)
    if labels is not None:
        cls = int(labels[0])
        batch = take(feeds, np.flatnonzero(labels == cls)[:size])
        return batch, f"{rows(batch)} held-out samples all of class {cls}"
    if len(feeds) == 1 and (only := next(iter(feeds.values()))).dtype.kind == "f":
        return {k: v[:size] * 0.5 + 0.5 for k, v in feeds.items()}, (
            f"{min(size, len(only))} inputs scaled by 0.5 and shifted by +0.5"
        )
    repeats = min(size, 8)
    return take(feeds, np.zeros(repeats, dtype=np.int64)), f"the first sample repeated {repeats} times"


def check_batch_stats_differ(
    session: Any, eval_model: nn.Module, x: np.ndarray | Feeds, labels: np.ndarray | None
) -> Check:
    """On a skewed batch, the graph's output must differ from the eval (running-statistics) output by far
    more than the parity tolerance: otherwise it is not using the batch's statistics."""
    batch, described = skewed_batch(x, labels)
    logits = session.run(None, batch)[0]
    with torch.no_grad():
        args = (torch.tensor(a) for a in batch.values())
        running = flatten_outputs(eval_model.eval()(*args))[0].numpy()
    diff, worst = _worst([logits], [running])
    changed = int((logits.argmax(1) != running.argmax(1)).sum()) if logits.ndim == 2 else 0
    passed = worst >= DIFFERENCE_FACTOR
    detail = (
        f"on {described}: max |batch - running statistics output| = {diff:.3g}, {worst:.3g}x the parity "
        f"tolerance (expected >= {DIFFERENCE_FACTOR:g}x); {changed} of {rows(batch)} predicted classes change"
    )
    figures = {"batch": described, "max_abs_diff": diff, "diff_over_tolerance": worst, "changed_predictions": changed}
    return Check("batch_stats_differ", passed, detail, figures)


def verify_batch_stats(
    proto: onnx.ModelProto,
    model: nn.Module,
    layer_names: list[str],
    x: np.ndarray | Feeds,
    labels: np.ndarray | None,
) -> list[Check]:
    """Both checks of the batch-statistics graph of ``model`` (unfolded, eval mode) on inputs ``x``."""
    session = cpu_session(proto)
    return [
        check_batch_stats_parity(session, _train_mode_reference(model, layer_names), x),
        check_batch_stats_differ(session, model, x, labels),
    ]
