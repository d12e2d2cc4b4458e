import json

import onnx
import pytest
import torch
from onnx.external_data_helper import uses_external_data
from torch import nn

import export.build
from export.build import export_model, main
from export.onnx_export import export_onnx
from export.verify import VerificationError
from service.repository import load_version
from tests.conftest import tiny_cnn_spec
from tests.export.conftest import perturb_first_conv_weight


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
