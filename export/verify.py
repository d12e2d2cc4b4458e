"""Prove that an exported graph is fit to serve: no BatchNorm left, same answers, batch-independent.

Three checks, each of which returns its measured figures whether it passes or not:

- ``no_batchnorm``: zero ``BatchNormalization`` nodes in the graph, its subgraphs and functions.
- ``parity``: onnxruntime's outputs against the unfolded reference (the PyTorch model in eval mode,
  or the original ONNX graph), element-wise ``|ort - ref| <= atol + rtol * |ref|`` (atol 1e-4,
  rtol 1e-5) on every output, no non-finite value, and, for a classifier, identical predicted classes.
- ``batch_invariance``: each sample's outputs run alone against its rows inside a batch of 64,
  within 1e-5. Running statistics make this hold; batch statistics would not.
- ``accuracy`` (when labels are given): onnxruntime's accuracy on the inputs, against a minimum.

Inputs are feeds, ``{input name: array with the batch axis first}``: one array for the default
models (their input is ``input``), several for a user's model of several inputs.

Why the parity limits hold in fp32: folding rewrites ``W`` as ``W * s`` and adds ``b' = (b - mean)
* s + beta``; each product is rounded once in float32 (relative error 6e-8), and a dot product of
k terms accumulates at most ~k such errors in the worst case, ~sqrt(k) in practice. For the sizes
served here (k up to a few thousand) and activations of order 10-100, the difference stays below
1e-5 relative plus 1e-4 absolute, and a real mistake (a wrong channel, a wrong eps, a missed
shift) is orders of magnitude larger.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime as ort

from export.graphs import INPUT_NAME, op_histogram

if TYPE_CHECKING:  # torch is imported where a PyTorch reference is used: the ONNX import path has none
    import torch
    from torch import nn

__all__ = [
    "PARITY_ATOL",
    "PARITY_RTOL",
    "INVARIANCE_ATOL",
    "INVARIANCE_BATCH",
    "Check",
    "Feeds",
    "Reference",
    "Verification",
    "VerificationError",
    "as_feeds",
    "check_accuracy",
    "cpu_session",
    "flatten_outputs",
    "rows",
    "take",
    "torch_reference",
    "verify_export",
    "verify_graph",
]

PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-5
INVARIANCE_ATOL = 1e-5
INVARIANCE_BATCH = 64

Feeds = dict[str, np.ndarray]  # input name -> array, batch axis first
Reference = Callable[[Feeds], list[np.ndarray]]  # the unfolded model's outputs, in the graph's output order


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class Verification:
    checks: list[Check]
    all_outputs: list[np.ndarray]  # onnxruntime's outputs for every verification input, batched, in graph order

    @property
    def outputs(self) -> np.ndarray:
        """The first output (the logits, for a classifier)."""
        return self.all_outputs[0]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {c.name: asdict(c) for c in self.checks}


class VerificationError(RuntimeError):
    """An exported graph failed verification; it must not be written to the repository."""

    def __init__(self, failed: list[Check], report: dict[str, Any] | None = None) -> None:
        self.failed = failed
        self.report = report
        lines = "; ".join(f"{c.name}: {c.detail}" for c in failed)
        super().__init__(f"export refused, {len(failed)} check(s) failed: {lines}")


def as_feeds(x: np.ndarray | Mapping[str, np.ndarray]) -> Feeds:
    """Feeds from one array (the default models' single input) or from a mapping of several."""
    return {INPUT_NAME: x} if isinstance(x, np.ndarray) else dict(x)


def rows(feeds: Feeds) -> int:
    return len(next(iter(feeds.values())))


def take(feeds: Feeds, index: slice | np.ndarray) -> Feeds:
    return {name: array[index] for name, array in feeds.items()}


def cpu_session(model: onnx.ModelProto, optimize: bool = True) -> ort.InferenceSession:
    """An onnxruntime CPU session, with every graph optimization on (onnxruntime's default level) or, with
    ``optimize=False``, none (for a reference graph whose BatchNorms onnxruntime must not fuse)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_batched(session: ort.InferenceSession, feeds: Feeds, batch: int) -> list[np.ndarray]:
    """Every output for every row of ``feeds``, run ``batch`` rows at a time."""
    parts = [session.run(None, take(feeds, slice(i, i + batch))) for i in range(0, rows(feeds), batch)]
    return [np.concatenate(outputs) for outputs in zip(*parts, strict=True)]


def check_no_batchnorm(model: onnx.ModelProto) -> Check:
    ops = op_histogram(model)
    count = ops.get("BatchNormalization", 0)
    detail = "no BatchNormalization node" if count == 0 else f"{count} BatchNormalization node(s) left, expected 0"
    return Check("no_batchnorm", count == 0, detail, {"batchnorm_nodes": count})


def _as_float(array: np.ndarray) -> np.ndarray:
    return np.asarray(array).astype(np.float64)


def _classifies(output: np.ndarray) -> bool:
    return output.ndim == 2 and output.shape[1] > 1 and output.dtype.kind == "f"


def check_parity(
    outputs: np.ndarray | list[np.ndarray],
    reference: np.ndarray | list[np.ndarray],
    names: list[str] | None = None,
    *,
    classify: bool = True,
) -> Check:
    """Every output against its reference within ``PARITY_ATOL + PARITY_RTOL * |ref|``, all finite; with
    ``classify``, the first output's predicted classes (argmax of a 2-D score) must not change either."""
    outputs = outputs if isinstance(outputs, list) else [outputs]
    reference = reference if isinstance(reference, list) else [reference]
    if len(outputs) != len(reference):
        return Check(
            "parity", False, f"the graph has {len(outputs)} output(s), the reference {len(reference)}; expected equal"
        )
    names = names or [f"output {i}" for i in range(len(outputs))]
    per_output: dict[str, Any] = {}
    shapes_differ = [n for n, o, r in zip(names, outputs, reference, strict=True) if o.shape != r.shape]
    if shapes_differ:
        detail = ", ".join(
            f"{n}: {o.shape} against {r.shape}"
            for n, o, r in zip(names, outputs, reference, strict=True)
            if o.shape != r.shape
        )
        return Check("parity", False, f"output shapes differ from the reference ({detail})")
    max_diff = worst = max_ref = 0.0
    non_finite = 0
    for name, got, want in zip(names, outputs, reference, strict=True):
        diff = np.abs(_as_float(got) - _as_float(want))
        allowed = PARITY_ATOL + PARITY_RTOL * np.abs(_as_float(want))
        figures = {
            "max_abs_diff": float(diff.max(initial=0.0)),
            "worst_diff_over_tolerance": float((diff / allowed).max(initial=0.0)),
        }
        per_output[name] = figures
        max_diff = max(max_diff, figures["max_abs_diff"])
        worst = max(worst, figures["worst_diff_over_tolerance"])
        max_ref = max(max_ref, float(np.abs(_as_float(want)).max(initial=0.0)))
        non_finite += int((~np.isfinite(_as_float(got))).sum())
    classified = classify and _classifies(reference[0])
    mismatched = int((outputs[0].argmax(1) != reference[0].argmax(1)).sum()) if classified else 0
    samples = len(reference[0]) if reference[0].ndim else 1
    figures = {
        "samples": samples,
        "max_abs_diff": max_diff,
        "max_abs_reference": max_ref,
        "worst_diff_over_tolerance": worst,
        "atol": PARITY_ATOL,
        "rtol": PARITY_RTOL,
        "mismatched_predictions": mismatched if classified else None,
        "non_finite_outputs": non_finite,
    }
    if len(outputs) > 1:
        figures["outputs"] = per_output
    passed = non_finite == 0 and worst <= 1.0 and mismatched == 0
    detail = (
        f"max |ort - reference| = {max_diff:.3g} over {samples} samples"
        f"{f' and {len(outputs)} outputs' if len(outputs) > 1 else ''}, "
        f"{worst:.3g} of the allowed {PARITY_ATOL:g} + {PARITY_RTOL:g} * |ref|, "
        + (f"{mismatched} predicted class(es) differ (expected 0), " if classified else "")
        + f"{non_finite} non-finite output(s)"
    )
    return Check("parity", passed, detail, figures)


def run_in_full_batches(session: ort.InferenceSession, feeds: Feeds) -> list[np.ndarray]:
    """Each sample's outputs from inside a batch of exactly ``INVARIANCE_BATCH`` rows.

    The last batch is filled up by wrapping around to the start of ``feeds``; only the rows of the
    samples it is run for are kept.
    """
    n = rows(feeds)
    parts = []
    for start in range(0, n, INVARIANCE_BATCH):
        idx = (start + np.arange(INVARIANCE_BATCH)) % n
        keep = min(INVARIANCE_BATCH, n - start)
        parts.append([out[:keep] for out in session.run(None, take(feeds, idx))])
    return [np.concatenate(outputs) for outputs in zip(*parts, strict=True)]


def check_batch_invariance(session: ort.InferenceSession, feeds: Feeds, in_batch: list[np.ndarray]) -> Check:
    """Compare each sample run alone with its rows ``in_batch`` (from ``run_in_full_batches``).

    A non-finite output fails the check: NaN compares as no difference otherwise.
    """
    n = rows(feeds)
    alone = run_batched(session, feeds, 1)
    pairs = [(_as_float(a), _as_float(b)) for a, b in zip(alone, in_batch, strict=True)]
    worst = float(np.max([np.abs(a - b).max(initial=0.0) for a, b in pairs]))  # NaN propagates
    non_finite = sum(int((~np.isfinite(a)).sum() + (~np.isfinite(b)).sum()) for a, b in pairs)
    passed = non_finite == 0 and worst <= INVARIANCE_ATOL
    detail = (
        f"max |alone - in batch of {INVARIANCE_BATCH}| = {worst:.3g} over {n} samples, "
        f"expected <= {INVARIANCE_ATOL:g}; {non_finite} non-finite value(s) (expected 0)"
    )
    figures = {
        "samples": n,
        "batch": INVARIANCE_BATCH,
        "max_abs_diff": worst,
        "atol": INVARIANCE_ATOL,
        "non_finite_values": non_finite,
    }
    return Check("batch_invariance", passed, detail, figures)


def check_accuracy(outputs: np.ndarray, labels: np.ndarray, minimum: float) -> Check:
    accuracy = float((outputs.argmax(1) == labels).mean())
    detail = f"accuracy {accuracy:.2%} on {len(labels)} held-out samples, expected >= {minimum:.2%}"
    figures = {"samples": len(labels), "accuracy": accuracy, "minimum": minimum}
    return Check("accuracy", accuracy >= minimum, detail, figures)


def flatten_outputs(result: Any) -> list[torch.Tensor]:
    """A forward's result as the exporter flattens it: a tensor, or a tuple, list or dict of them."""
    import torch

    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):
        result = list(result.values())
    if isinstance(result, list | tuple) and all(isinstance(t, torch.Tensor) for t in result):
        return list(result)
    raise ValueError(f"forward returned {type(result).__name__}; expected a tensor, or a tuple, list or dict of them")


def torch_reference(model: nn.Module, input_names: list[str], chunk: int = 256) -> Reference:
    """The unfolded PyTorch model as a reference: ``model(*inputs)`` in eval mode, ``chunk`` rows at a time."""
    import torch

    if model.training:
        raise ValueError("the reference model is in training mode; expected eval mode (running statistics)")

    @torch.no_grad()
    def run(feeds: Feeds) -> list[np.ndarray]:
        parts = []
        for i in range(0, rows(feeds), chunk):
            args = [torch.tensor(feeds[name][i : i + chunk]) for name in input_names]
            parts.append([t.numpy() for t in flatten_outputs(model(*args))])
        return [np.concatenate(outputs) for outputs in zip(*parts, strict=True)]

    return run


def verify_graph(
    model: onnx.ModelProto,
    reference: Reference,
    feeds: Feeds,
    labels: np.ndarray | None = None,
    min_accuracy: float = 0.0,
    *,
    classify: bool = True,
    batched: bool = True,
) -> Verification:
    """Run every check of the served graph ``model`` against ``reference`` on ``feeds``.

    Args:
        model: the graph to serve.
        reference: the unfolded model's outputs for a batch of feeds.
        feeds: the verification inputs by name, each with the samples along its first axis.
        labels: with them, onnxruntime's accuracy on ``feeds`` is checked against ``min_accuracy``.
        classify: compare the predicted classes of the first output too (a classifier's scores).
        batched: the graph has a batch axis; without one, each sample runs alone and batch
            invariance does not apply (the report says so, no check is claimed).
    """
    session = cpu_session(model)
    names = [o.name for o in session.get_outputs()]
    if batched:
        outputs = run_in_full_batches(session, feeds)
        ref = reference(feeds)
    else:
        singles = [take(feeds, i) for i in range(rows(feeds))]
        outputs = [np.stack(o) for o in zip(*(session.run(None, s) for s in singles), strict=True)]
        ref = [np.stack(o) for o in zip(*(reference(s) for s in singles), strict=True)]
    checks = [check_no_batchnorm(model), check_parity(outputs, ref, names, classify=classify)]
    if batched:
        checks.append(check_batch_invariance(session, feeds, outputs))
    if labels is not None:
        checks.append(check_accuracy(outputs[0], labels, min_accuracy))
    return Verification(checks, outputs)


def verify_export(
    model: onnx.ModelProto,
    reference: nn.Module,
    x: np.ndarray | Mapping[str, np.ndarray],
    labels: np.ndarray | None = None,
    min_accuracy: float = 0.0,
    *,
    classify: bool = True,
) -> Verification:
    """Run every check of ``model`` against the unfolded PyTorch ``reference`` (in eval mode) on ``x``
    (one array for the single input ``input``, or feeds by input name in ``forward``'s order).

    With ``labels``, onnxruntime's accuracy on ``x`` is checked against ``min_accuracy`` as well.
    """
    feeds = as_feeds(x)
    return verify_graph(model, torch_reference(reference, list(feeds)), feeds, labels, min_accuracy, classify=classify)
