"""The batch-statistics graph: PyTorch train() output in ONNX, checked, and written beside model.onnx."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from export.batch_stats import (
    BATCH_SIZES,
    check_batch_stats_differ,
    export_batch_stats,
    running_statistics,
    verify_batch_stats,
)
from export.build import export_model
from export.fold import fold_batchnorms
from export.onnx_export import export_onnx
from export.verify import cpu_session
from models.data import load_splits
from models.train import make_checkpoint
from models.zoo import build_model, config_to_dict
from repository import BATCH_STATS_FILE, BN_STATS_FILE, RepositoryError, load_version
from tests.conftest import randomize_batchnorms, tiny_cnn_spec, tiny_vit_spec
from tests.export.conftest import perturb_first_conv_weight


def _bn_train_mode(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.train()
    return model


@pytest.fixture(scope="module", params=["cnn", "vit"])
def exported(request: pytest.FixtureRequest) -> tuple[nn.Module, object, list[str]]:
    spec = tiny_cnn_spec() if request.param == "cnn" else tiny_vit_spec()
    model = randomize_batchnorms(build_model(spec.arch, config_to_dict(spec.config)))
    graph, layers = export_batch_stats(model, torch.tensor(load_splits().x_test[:2]))
    return model, graph, layers


@pytest.mark.parametrize("size", BATCH_SIZES)
def test_the_graph_gives_pytorch_train_mode_output_at_every_batch_size(exported, size: int) -> None:
    model, graph, layers = exported
    x = load_splits().x_test[:size]
    logits, *stats = cpu_session(graph).run(None, {"input": x})
    reference = _bn_train_mode(model)
    inputs: dict[str, np.ndarray] = {}
    for name in layers:
        reference.get_submodule(name).register_forward_pre_hook(
            lambda _, a, name=name: inputs.__setitem__(name, a[0].numpy().astype(np.float64))
        )
    with torch.no_grad():
        train_out = reference(torch.tensor(x)).numpy()
    assert np.all(np.abs(logits - train_out) <= 1e-4 + 1e-5 * np.abs(train_out))
    assert len(stats) == 2 * len(layers)
    for i, name in enumerate(layers):  # each layer's statistics, as numpy takes them from what it receives
        seen = inputs[name]
        axes = (0, 1) if seen.ndim == 3 else (0, 2, 3)  # tokens (B, T, D) or images (N, C, H, W)
        np.testing.assert_allclose(stats[2 * i], seen.mean(axis=axes), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stats[2 * i + 1], seen.var(axis=axes), rtol=1e-4, atol=1e-5)


def test_the_graph_differs_from_eval_output_on_a_skewed_batch(exported) -> None:
    model, graph, _ = exported
    data = load_splits()
    ones = data.x_test[data.y_test == 1]
    logits = cpu_session(graph).run(None, {"input": ones})[0]
    with torch.no_grad():
        eval_out = model(torch.tensor(ones)).numpy()
    assert np.abs(logits - eval_out).max() > 0.1


def test_both_checks_pass_on_the_real_graph(exported) -> None:
    model, graph, layers = exported
    data = load_splits()
    checks = verify_batch_stats(graph, model, layers, data.x_test, data.y_test)
    assert [c.name for c in checks] == ["batch_stats_parity", "batch_stats_differ"]
    assert all(c.passed for c in checks), [c.detail for c in checks]
    assert set(checks[0].figures["batches"]) == {str(s) for s in BATCH_SIZES}


def test_a_graph_with_a_wrong_weight_fails_parity(exported) -> None:
    model, graph, layers = exported
    data = load_splits()
    parity, _ = verify_batch_stats(perturb_first_conv_weight(graph, 0.5), model, layers, data.x_test, data.y_test)
    assert not parity.passed and parity.figures["batches"]["64"]["worst_diff_over_tolerance"] > 1


def test_a_graph_that_uses_running_statistics_fails_the_difference_check(exported) -> None:
    """The served graph (running statistics) passed off as the batch-statistics one is caught."""
    model, _, _ = exported
    data = load_splits()
    example = torch.tensor(data.x_test[:2])
    served = export_onnx(fold_batchnorms(model, example).model, example)
    check = check_batch_stats_differ(cpu_session(served), model, data.x_test, data.y_test)
    assert not check.passed and "expected >= 100x" in check.detail


def test_running_statistics_are_the_models_buffers(exported) -> None:
    model, _, layers = exported
    model = copy.deepcopy(model)  # the hooks below stay on this copy
    x = torch.tensor(load_splits().x_test[:3])
    shapes: dict[str, torch.Size] = {}
    for name in layers:
        model.get_submodule(name).register_forward_pre_hook(
            lambda _, a, name=name: shapes.__setitem__(name, a[0].shape)
        )
    stats = running_statistics(model, layers, x)
    for entry, name in zip(stats, layers, strict=True):
        bn = model.get_submodule(name)
        assert entry["name"] == name and entry["channels"] == bn.num_features
        shape = shapes[name]
        if len(shape) == 4:  # (N, C, H, W): each sample gives H * W values per channel
            assert (entry["reduced_over"], entry["positions"]) == ("N, H, W", shape[2] * shape[3])
        else:  # (B, T, D) tokens: T values per feature
            assert (entry["reduced_over"], entry["positions"]) == ("B, T", shape[1])
        np.testing.assert_array_equal(entry["running_mean"], bn.running_mean.numpy())
        np.testing.assert_array_equal(entry["running_var"], bn.running_var.numpy())


def test_a_model_without_batchnorm_has_no_batch_statistics_graph() -> None:
    spec = tiny_cnn_spec("gn")
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        export_batch_stats(build_model(spec.arch, config_to_dict(spec.config)), torch.zeros(2, 1, 8, 8))


def _export(root: Path, norm: str) -> Path:
    spec = tiny_cnn_spec(norm)
    model = build_model(spec.arch, config_to_dict(spec.config))
    if norm == "bn":
        model = randomize_batchnorms(model)
    meta = make_checkpoint(spec, model.eval(), {"test_accuracy": None})
    del meta["state_dict"]
    export_model(model, meta, root)
    return root / spec.name


def test_the_export_writes_the_graph_and_statistics_hashed_in_the_report(tmp_path: Path) -> None:
    model_dir = _export(tmp_path, "bn")
    version = load_version(model_dir, "1")
    assert version.has_batch_stats and set(version.report.files) == {BATCH_STATS_FILE, BN_STATS_FILE}
    report = version.report.model_dump()
    assert report["checks"]["batch_stats_parity"]["passed"] and report["checks"]["batch_stats_differ"]["passed"]
    assert report["batch_stats"]["layers"] == [
        layer["name"] for layer in json.loads((model_dir / "1" / BN_STATS_FILE).read_text())["layers"]
    ]
    for name in (BATCH_STATS_FILE, BN_STATS_FILE):
        (model_dir / "1" / name).write_bytes((model_dir / "1" / name).read_bytes() + b" ")
        with pytest.raises(RepositoryError, match=f"{name} has sha256 .* the file changed after it was exported"):
            load_version(model_dir, "1")
        (model_dir / "1" / name).write_bytes((model_dir / "1" / name).read_bytes()[:-1])
    (model_dir / "1" / BN_STATS_FILE).unlink()
    with pytest.raises(RepositoryError, match=f"{BN_STATS_FILE} is missing"):
        load_version(model_dir, "1")


def test_a_model_without_batchnorm_is_exported_without_one(tmp_path: Path) -> None:
    version = load_version(_export(tmp_path, "gn"), "1")
    assert not version.has_batch_stats and version.report.files == {}
    assert not (version.path / BATCH_STATS_FILE).exists()
