"""Fold every BatchNorm into the convolution or linear layer that feeds it.

At inference a BatchNorm with running statistics is a fixed per-channel affine map,
``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``, so when its input comes
straight from a Conv or Linear it can be merged into that layer's weight and bias
(``torch.nn.utils.fusion``). Pairs are found by tracing the model's dataflow with ``torch.fx``:
a BatchNorm folds when its only input is the output of a Conv/Linear that nothing else reads.

A BatchNorm with no such layer before it (after a ReLU, a residual add or a concatenation, as in
DenseNet and pre-activation ResNets) may still fold *forward*, into the layer it feeds, when that
layer is linear in its input everywhere: a Linear on (N, C) features, or a Conv with no padding.
With ``s`` and ``t`` the BatchNorm's scale and shift, ``W (s x + t) + b = (W s) x + (b + W t)``:
the weight is scaled along its input channels and the bias takes the weight applied to ``t``. Zero
padding breaks this (the padded zeros would have been ``t`` after the BatchNorm, and are 0 after
the fold), so a padded Conv is not folded into.

Whatever folds neither way is replaced by ``BatchNormAffine``, the same map as one multiply and one
add, and named in the result with its reason, so no ``BatchNormalization`` node reaches an exported
graph either way. ``SyncBatchNorm`` is a BatchNorm at inference and is handled like one.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from export.graphs import Unfoldable
from models.norms import bn_channel_dim

__all__ = [
    "BatchNormAffine",
    "Fold",
    "FoldError",
    "FoldResult",
    "batchnorm_affine",
    "fold_batchnorms",
    "fuse_bn_into_next",
]

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class FoldError(ValueError):
    """The model cannot be folded for inference (for example a BatchNorm without running statistics)."""


class BatchNormAffine(nn.Module):
    """A BatchNorm frozen to its running statistics: ``y = x * scale + shift`` along its channel axis."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, channel_dim: int = 1) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)
        self.channel_dim = channel_dim

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm) -> BatchNormAffine:
        scale, shift = batchnorm_affine(bn)
        dtype = bn.running_mean.dtype if bn.running_mean is not None else torch.float32
        return cls(scale.to(dtype), shift.to(dtype), bn_channel_dim(bn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.ndim
        shape[self.channel_dim] = -1
        return x * self.scale.reshape(shape) + self.shift.reshape(shape)


@dataclass(frozen=True)
class Fold:
    layer: str  # qualified name of the Conv/Linear that absorbed the BatchNorm
    norm: str  # qualified name of the BatchNorm
    kind: str  # for example "Conv2d+BatchNorm2d", or "BatchNorm1d+Linear" for a fold forward
    forward: bool = False  # folded into the layer after the BatchNorm, not the one before


@dataclass
class FoldResult:
    model: nn.Module
    folds: list[Fold] = field(default_factory=list)
    unfoldable: list[Unfoldable] = field(default_factory=list)


class _BatchNormLeafTracer(fx.Tracer):
    """Keeps every BatchNorm, including subclasses defined outside torch.nn, as one graph node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, qualname)


def _running_stats(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    if bn.running_mean is None or bn.running_var is None:
        raise FoldError(
            f"{type(bn).__name__} has track_running_stats=False: it normalizes with batch statistics even at "
            "inference, so a sample's output would depend on its batch; expected running statistics"
        )
    return bn.running_mean, bn.running_var


@torch.no_grad()
def batchnorm_affine(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """A BatchNorm's inference map ``y = x * scale + shift`` per channel, in float64.

    ``scale = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean * scale``.
    """
    mean, var = (t.detach().double() for t in _running_stats(bn))
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


@torch.no_grad()
def fuse_bn_into_next(bn: _BatchNorm, layer: nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear) -> nn.Module:
    """A copy of ``layer`` that, applied to the BatchNorm's *input*, gives ``layer(bn(x))``.

    Args:
        bn: a BatchNorm (channel axis 1) with running statistics.
        layer: the layer that reads the BatchNorm's output: a Linear on (N, C) features, or a Conv
            with no padding (zero padding would not commute with the BatchNorm's shift).

    Returns:
        The new layer, with weight ``W * scale`` along its input channels and bias ``b + W shift``.
    """
    scale, shift = batchnorm_affine(bn)
    fused = copy.deepcopy(layer)
    weight = layer.weight.detach().double()
    if isinstance(layer, nn.Linear):
        extra = weight @ shift  # (out,)
        new_weight = weight * scale[None, :]
    else:
        # (C_out, C_in / groups, *k): output channel o reads input channels of its group only.
        per_group = weight.shape[1]
        outputs_per_group = weight.shape[0] // layer.groups
        view = (weight.shape[0], per_group, *([1] * (weight.ndim - 2)))
        s = scale.reshape(layer.groups, per_group).repeat_interleave(outputs_per_group, 0).reshape(view)
        t = shift.reshape(layer.groups, per_group).repeat_interleave(outputs_per_group, 0).reshape(view)
        extra = (weight * t).flatten(1).sum(1)
        new_weight = weight * s
    bias = extra if layer.bias is None else layer.bias.detach().double() + extra
    fused.weight = nn.Parameter(new_weight.to(layer.weight.dtype))
    fused.bias = nn.Parameter(bias.to(layer.weight.dtype))
    return fused


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, module)


def _why_not_foldable(node: fx.Node, bn: _BatchNorm, modules: dict[str, nn.Module], calls: Counter[str]) -> str | None:
    """None if the BatchNorm called at ``node`` can fold into the node that produces its input, else why not."""
    if calls[str(node.target)] > 1:
        return f"it is called at {calls[str(node.target)]} places"
    producer = node.args[0]
    if not isinstance(producer, fx.Node):
        return f"its input is the constant {producer!r}"
    if producer.op != "call_module":
        return f"its input comes from {producer.op} {producer.name!r}, not from a Conv or Linear layer"
    layer = modules[str(producer.target)]
    if calls[str(producer.target)] > 1:
        return f"{producer.target!r} is called at {calls[str(producer.target)]} places; folding would change them all"
    if len(producer.users) > 1:
        return f"{producer.target!r} also feeds {len(producer.users) - 1} other node(s)"
    if bn_channel_dim(bn) != 1:
        return f"{type(bn).__name__} normalizes axis {bn_channel_dim(bn)}, not the channel axis 1"
    if isinstance(layer, CONVS + TRANSPOSED_CONVS):
        return None
    if isinstance(layer, nn.Linear):
        rank = len(producer.meta["tensor_meta"].shape)
        if rank != 2:
            return f"Linear {producer.target!r} outputs rank {rank}; folding needs (N, C) features"
        return None
    return f"its input comes from {type(layer).__name__} {producer.target!r}, not from a Conv or Linear layer"


def _forward_target(
    node: fx.Node, bn: _BatchNorm, modules: dict[str, nn.Module], calls: Counter[str]
) -> tuple[str | None, str]:
    """The Conv or Linear that the BatchNorm called at ``node`` can fold forward into, or None and why not."""
    if calls[str(node.target)] > 1 or bn_channel_dim(bn) != 1:
        return None, "nor into a layer after it"
    if len(node.users) != 1:
        return None, f"nor forward: its output has {len(node.users)} readers"
    consumer = next(iter(node.users))
    if consumer.op != "call_module" or consumer.args[:1] != (node,) or len(consumer.args) + len(consumer.kwargs) != 1:
        return None, f"nor forward: it feeds {consumer.op} {consumer.name!r}, not a Conv or Linear layer"
    if calls[str(consumer.target)] > 1:
        return None, f"nor forward: {consumer.target!r} is called at {calls[str(consumer.target)]} places"
    layer = modules[str(consumer.target)]
    if isinstance(layer, CONVS):
        padding: Any = layer.padding
        if padding == "valid" or all(p == 0 for p in padding):
            return str(consumer.target), ""
        return None, f"nor forward: the Conv {consumer.target!r} after it pads with zeros, which the shift would change"
    if isinstance(layer, nn.Linear):
        if len(node.meta["tensor_meta"].shape) == 2:
            return str(consumer.target), ""
        return (
            None,
            f"nor forward: the Linear {consumer.target!r} after it reads rank {len(node.meta['tensor_meta'].shape)}",
        )
    return None, f"nor forward: it feeds {type(layer).__name__} {consumer.target!r}, not a Conv or Linear layer"


@torch.no_grad()
def fold_batchnorms(model: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...]) -> FoldResult:
    """Return an eval-mode copy of ``model`` with every BatchNorm folded or frozen to an affine map.

    Args:
        model: any module whose forward ``torch.fx`` can trace; it is not modified.
        example: an input batch (a tuple for a model of several inputs), used to learn the rank of
            each Linear's output.

    Returns:
        FoldResult with the new model, the folds made and the BatchNorms that could not fold.

    Raises:
        FoldError: a BatchNorm keeps no running statistics, so it has no inference form; or a
            BatchNorm is not reached by the trace, so it could not be handled.
        torch.fx's own errors: the forward cannot be traced symbolically (data-dependent control
            flow); the caller may fold at the ONNX level instead.
    """
    model = copy.deepcopy(model).eval()
    graph = _BatchNormLeafTracer().trace(model)
    gm = fx.GraphModule(model, graph)
    ShapeProp(gm).propagate(*(example if isinstance(example, tuple) else (example,)))
    modules = dict(model.named_modules())
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    result = FoldResult(model)
    done: set[str] = set()
    for node in graph.nodes:
        name = str(node.target)
        if node.op != "call_module" or not isinstance(modules[name], _BatchNorm) or name in done:
            continue
        done.add(name)
        bn = modules[name]
        _running_stats(bn)
        reason = _why_not_foldable(node, bn, modules, calls)
        if reason is None:
            layer_name = str(node.args[0].target)
            layer = modules[layer_name]
            if isinstance(layer, nn.Linear):
                fused: nn.Module = fuse_linear_bn_eval(layer, bn)
            else:
                fused = fuse_conv_bn_eval(layer, bn, transpose=isinstance(layer, TRANSPOSED_CONVS))
            _set_submodule(model, layer_name, fused)
            modules[layer_name] = fused
            _set_submodule(model, name, nn.Identity())
            result.folds.append(Fold(layer_name, name, f"{type(layer).__name__}+{type(bn).__name__}"))
        elif (after := _forward_target(node, bn, modules, calls))[0] is not None:
            layer = modules[after[0]]
            fused = fuse_bn_into_next(bn, layer)  # type: ignore[arg-type]
            _set_submodule(model, after[0], fused)
            modules[after[0]] = fused
            _set_submodule(model, name, nn.Identity())
            result.folds.append(Fold(after[0], name, f"{type(bn).__name__}+{type(layer).__name__}", forward=True))
        else:
            _set_submodule(model, name, BatchNormAffine.from_batchnorm(bn))
            result.unfoldable.append(Unfoldable(name, f"{reason}; {after[1]}", "BatchNormAffine (Mul, Add)"))
    leftover = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    if leftover:
        raise FoldError(f"BatchNorm layers not reached by the trace (called outside forward's dataflow?): {leftover}")
    return result
