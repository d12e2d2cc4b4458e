import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data
from torch import nn

import export.build
from export.build import export_model, main
from export.onnx_export import export_onnx
from export.verify import VerificationError, verify_export
from models.train import make_checkpoint
from models.zoo import build_model, config_to_dict
from service.repository import load_version
from tests.conftest import randomize_batchnorms, tiny_cnn_spec


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, dict, np.ndarray]:
    spec = tiny_cnn_spec()
    model = randomize_batchnorms(build_model(spec.arch, config_to_dict(spec.config)))
    meta = make_checkpoint(spec, model, {"test_accuracy": None})
    del meta["state_dict"]
    x, _, _ = export.build.verification_inputs(meta)
    return model, meta, x


def perturb_first_conv_weight(model: onnx.ModelProto, delta: float = 0.05) -> onnx.ModelProto:
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    conv = next(n for n in broken.graph.node if n.op_type == "Conv")
    init = next(i for i in broken.graph.initializer if i.name == conv.input[1])
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += delta
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    return broken


def test_export_writes_a_verified_bn_free_version(tiny, tmp_path) -> None:
    model, meta, _ = tiny
    version, report = export_model(model, meta, tmp_path, "1")
    assert version.path == tmp_path / "tiny-cnn-bn" / "1"
    assert all(c["passed"] for c in report["checks"].values())
    assert report["checks"]["parity"]["figures"]["samples"] == 270  # the digits' test split
    assert len(report["folds"]) == 6 and report["unfoldable"] == []
    assert report["ops"]["unfolded"]["BatchNormalization"] == 6
    assert "BatchNormalization" not in report["ops"]["folded"]
    assert "BatchNormalization" not in report["ops"]["served"]
    assert report["norm_layers"] == {"BatchNorm2d": 6}
    assert 0.0 <= report["test_accuracy"] <= 1.0
    served = onnx.load(version.model_file, load_external_data=False)
    assert served.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert not any(uses_external_data(t) for t in served.graph.initializer)  # one self-contained file
    assert load_version(tmp_path / "tiny-cnn-bn", "1").report.sha256 == report["sha256"]
    assert version.config.inputs[0].shape == [-1, 1, 8, 8] and version.config.max_batch_size == 16


def test_verifier_catches_a_leftover_batchnorm_node(tiny) -> None:
    model, _, x = tiny
    unfolded = export_onnx(model, torch.tensor(x[:2]), optimize=False)
    checks = {c.name: c for c in verify_export(unfolded, model, x).checks}
    assert not checks["no_batchnorm"].passed
    assert "6 BatchNormalization node(s) left, expected 0" in checks["no_batchnorm"].detail
    assert checks["parity"].passed  # the answers are right: only the BN check can catch this


def test_verifier_catches_a_perturbed_weight(tiny) -> None:
    model, _, x = tiny
    folded = export.build.fold_batchnorms(model, torch.tensor(x[:2])).model
    served = export_onnx(folded, torch.tensor(x[:2]))
    assert verify_export(served, model, x).passed
    checks = {c.name: c for c in verify_export(perturb_first_conv_weight(served), model, x).checks}
    assert not checks["parity"].passed
    assert checks["parity"].figures["worst_diff_over_tolerance"] > 1


class BatchCentered(nn.Module):
    """Subtracts the batch mean: what BatchNorm would do at inference without running statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(dim=0, keepdim=True)).flatten(1)[:, :10]


def test_verifier_catches_a_batch_dependent_graph(tiny) -> None:
    _, _, x = tiny
    model = BatchCentered()
    checks = {c.name: c for c in verify_export(export_onnx(model, torch.tensor(x[:2])), model, x).checks}
    assert not checks["batch_invariance"].passed
    assert checks["batch_invariance"].figures["max_abs_diff"] > 0.1


def test_a_failed_check_writes_nothing_to_the_repository(tiny, tmp_path, monkeypatch) -> None:
    model, meta, _ = tiny

    def broken_export(m: nn.Module, example: torch.Tensor, *, optimize: bool = True) -> onnx.ModelProto:
        proto = export_onnx(m, example, optimize=optimize)
        return perturb_first_conv_weight(proto) if optimize else proto

    monkeypatch.setattr(export.build, "export_onnx", broken_export)
    with pytest.raises(VerificationError, match="export refused, 1 check.s. failed: parity") as e:
        export_model(model, meta, tmp_path, "1")
    assert not (tmp_path / "tiny-cnn-bn").exists()
    assert e.value.report["checks"]["parity"]["passed"] is False


def test_build_cli_trains_exports_then_skips_what_is_built(tmp_path, monkeypatch, capsys) -> None:
    spec = tiny_cnn_spec("gn")
    monkeypatch.setattr(export.build, "DEFAULT_MODELS", {spec.name: spec})
    args = ["--artifacts", str(tmp_path / "art"), "--repository", str(tmp_path / "repo")]
    assert main(args) == 0
    report = json.loads((tmp_path / "repo" / spec.name / "1" / "report.json").read_text())
    assert report["folds"] == [] and report["norm_layers"] == {"GroupNorm": 6}
    assert "GroupNormalization" in report["ops"]["served"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "already in" in out and f"| {spec.name} | yes |" in out
    assert (tmp_path / "art" / "summary.md").read_text().count(spec.name) == 1


def test_build_cli_rejects_unknown_model_names(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["cnn-xx"])
    assert e.value.code == 2
    assert "unknown model(s) ['cnn-xx']" in capsys.readouterr().err
