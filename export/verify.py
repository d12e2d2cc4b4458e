"""Prove that an exported graph is fit to serve: no BatchNorm left, same answers, batch-independent.

Three checks, each of which returns its measured figures whether it passes or not:

- ``no_batchnorm``: zero ``BatchNormalization`` nodes in the graph, its subgraphs and functions.
- ``parity``: onnxruntime's output against the unfolded PyTorch model in eval mode, element-wise
  ``|ort - ref| <= atol + rtol * |ref|`` (atol 1e-4, rtol 1e-5), and identical predicted classes.
- ``batch_invariance``: each sample's output run alone against its row inside a batch of 64,
  within 1e-5. Running statistics make this hold; batch statistics would not.
- ``accuracy`` (when labels are given): onnxruntime's accuracy on the inputs, against a minimum.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from export.onnx_export import INPUT_NAME, op_histogram

__all__ = [
    "PARITY_ATOL",
    "PARITY_RTOL",
    "INVARIANCE_ATOL",
    "INVARIANCE_BATCH",
    "Check",
    "Verification",
    "VerificationError",
    "check_accuracy",
    "cpu_session",
    "verify_export",
]

PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-5
INVARIANCE_ATOL = 1e-5
INVARIANCE_BATCH = 64


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class Verification:
    checks: list[Check]
    outputs: np.ndarray  # onnxruntime's outputs for every verification input, batched

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


def cpu_session(model: onnx.ModelProto) -> ort.InferenceSession:
    """An onnxruntime CPU session with every graph optimization on (onnxruntime's default level)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_batched(session: ort.InferenceSession, x: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([session.run(None, {INPUT_NAME: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def check_no_batchnorm(model: onnx.ModelProto) -> Check:
    ops = op_histogram(model)
    count = ops.get("BatchNormalization", 0)
    detail = "no BatchNormalization node" if count == 0 else f"{count} BatchNormalization node(s) left, expected 0"
    return Check("no_batchnorm", count == 0, detail, {"batchnorm_nodes": count})


def check_parity(outputs: np.ndarray, reference: np.ndarray) -> Check:
    diff = np.abs(outputs.astype(np.float64) - reference.astype(np.float64))
    allowed = PARITY_ATOL + PARITY_RTOL * np.abs(reference.astype(np.float64))
    worst = float((diff / allowed).max())
    mismatched = int((outputs.argmax(1) != reference.argmax(1)).sum())
    non_finite = int((~np.isfinite(outputs)).sum())
    figures = {
        "samples": len(reference),
        "max_abs_diff": float(diff.max()),
        "max_abs_reference": float(np.abs(reference).max()),
        "worst_diff_over_tolerance": worst,
        "atol": PARITY_ATOL,
        "rtol": PARITY_RTOL,
        "mismatched_predictions": mismatched,
        "non_finite_outputs": non_finite,
    }
    passed = non_finite == 0 and worst <= 1.0 and mismatched == 0
    detail = (
        f"max |ort - torch| = {diff.max():.3g} over {len(reference)} samples, "
        f"{worst:.3g} of the allowed {PARITY_ATOL:g} + {PARITY_RTOL:g} * |ref|, "
        f"{mismatched} predicted class(es) differ (expected 0), {non_finite} non-finite output(s)"
    )
    return Check("parity", passed, detail, figures)


def run_in_full_batches(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    """Each sample's output from inside a batch of exactly ``INVARIANCE_BATCH`` rows.

    The last batch is filled up by wrapping around to the start of ``x``; only the rows of the
    samples it is run for are kept.
    """
    n = len(x)
    outputs = []
    for start in range(0, n, INVARIANCE_BATCH):
        idx = (start + np.arange(INVARIANCE_BATCH)) % n
        outputs.append(session.run(None, {INPUT_NAME: x[idx]})[0][: min(INVARIANCE_BATCH, n - start)])
    return np.concatenate(outputs)


def check_batch_invariance(session: ort.InferenceSession, x: np.ndarray, in_batch: np.ndarray) -> Check:
    """Compare each sample run alone with its row ``in_batch`` (from ``run_in_full_batches``).

    A non-finite output fails the check: NaN compares as no difference otherwise.
    """
    n = len(x)
    alone = run_batched(session, x, 1)
    worst = float(np.abs(alone - in_batch).max())  # NaN propagates
    non_finite = int((~np.isfinite(alone)).sum() + (~np.isfinite(in_batch)).sum())
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


@torch.no_grad()
def verify_export(
    model: onnx.ModelProto,
    reference: nn.Module,
    x: np.ndarray,
    labels: np.ndarray | None = None,
    min_accuracy: float = 0.0,
) -> Verification:
    """Run every check of ``model`` against the unfolded PyTorch ``reference`` (in eval mode) on ``x``.

    With ``labels``, onnxruntime's accuracy on ``x`` is checked against ``min_accuracy`` as well.
    """
    if reference.training:
        raise ValueError("the reference model is in training mode; expected eval mode (running statistics)")
    session = cpu_session(model)
    outputs = run_in_full_batches(session, x)
    ref = torch.cat([reference(torch.tensor(x[i : i + 256])) for i in range(0, len(x), 256)]).numpy()
    checks = [
        check_no_batchnorm(model),
        check_parity(outputs, ref),
        check_batch_invariance(session, x, outputs),
    ]
    if labels is not None:
        checks.append(check_accuracy(outputs, labels, min_accuracy))
    return Verification(checks, outputs)
