import copy

import numpy as np
import pytest
import torch
from torch import nn

from export.fold import fold_batchnorms
from export.onnx_export import export_onnx
from export.verify import check_accuracy, verify_export
from tests.export.conftest import perturb_first_conv_weight


def checks_of(model: nn.Module, reference: nn.Module, x, optimize: bool = True) -> dict:
    proto = export_onnx(model, torch.tensor(x[:2]), optimize=optimize)
    return {c.name: c for c in verify_export(proto, reference, x).checks}


def test_a_folded_export_passes_every_check(tiny) -> None:
    model, _, x = tiny
    checks = checks_of(fold_batchnorms(model, torch.tensor(x[:2])).model, model, x)
    assert all(c.passed for c in checks.values()), [c.detail for c in checks.values()]
    assert checks["parity"].figures["samples"] == len(x) == 270


def test_verifier_catches_a_leftover_batchnorm_node(tiny) -> None:
    model, _, x = tiny
    checks = checks_of(model, model, x, optimize=False)  # unfolded, and the exporter may not fold it either
    assert not checks["no_batchnorm"].passed
    assert "6 BatchNormalization node(s) left, expected 0" in checks["no_batchnorm"].detail
    assert checks["parity"].passed  # the answers are right: only the BN check can catch this


def test_verifier_catches_a_perturbed_weight(tiny) -> None:
    model, _, x = tiny
    example = torch.tensor(x[:2])
    served = export_onnx(fold_batchnorms(model, example).model, example)
    checks = {c.name: c for c in verify_export(perturb_first_conv_weight(served), model, x).checks}
    assert not checks["parity"].passed
    assert checks["parity"].figures["worst_diff_over_tolerance"] > 1


class BatchCentered(nn.Module):
    """Subtracts the batch mean: what BatchNorm would do at inference without running statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(dim=0, keepdim=True)).flatten(1)[:, :10]


class NaNWhenAlone(nn.Module):
    """Correct in batches, NaN for a batch of one (the unbiased variance of one value)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = x.flatten(1)[:, :10]
        return f + 0 * f.var(dim=0, keepdim=True)


@pytest.mark.parametrize("module", [BatchCentered(), NaNWhenAlone()])
def test_verifier_catches_a_graph_whose_answer_depends_on_its_batch(tiny, module: nn.Module) -> None:
    _, _, x = tiny
    check = checks_of(module, module, x)["batch_invariance"]
    assert not check.passed
    if isinstance(module, NaNWhenAlone):
        assert check.figures["non_finite_values"] == 10 * len(x)
    else:
        assert check.figures["max_abs_diff"] > 0.1


def test_verifier_refuses_a_reference_in_training_mode(tiny) -> None:
    model, _, x = tiny
    proto = export_onnx(model, torch.tensor(x[:2]))
    reference = copy.deepcopy(model).train()  # would normalize with batch statistics
    with pytest.raises(ValueError, match="expected eval mode"):
        verify_export(proto, reference, x)


def test_accuracy_check_counts_correct_predictions_against_the_minimum() -> None:
    labels = np.arange(10) % 3
    outputs = np.eye(3)[labels]
    outputs[:3] = np.eye(3)[(labels[:3] + 1) % 3]  # three wrong
    assert check_accuracy(outputs, labels, 0.7).passed
    failed = check_accuracy(outputs, labels, 0.75)
    assert not failed.passed and failed.figures["accuracy"] == 0.7
    assert failed.detail == "accuracy 70.00% on 10 held-out samples, expected >= 75.00%"
