import gc
import json
import traceback
from dataclasses import replace

import onnx
import pytest
import torch
from onnx.external_data_helper import uses_external_data
from torch import nn

import export.build
from export.build import export_model, main
from export.onnx_export import export_onnx
from export.verify import VerificationError
from models.train import train_model
from repository import load_version, sha256_file
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


def test_an_export_survives_a_process_whose_finalizers_format_tracebacks() -> None:
    """A collection inside the exporter's parse of torchlib's source that formats a traceback (a finalizer that
    logs an exception, pytest's hook for errors in finalizers) parses again, and Python 3.11's parse is not
    re-entrant: the export failed with "AST constructor recursion depth mismatch". Every collection here formats
    one, as such a finalizer would."""
    try:
        [1][0] + {}["missing"]  # a line whose traceback 3.11 parses, to place its carets
    except KeyError as e:
        error = e

    def format_a_traceback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            traceback.format_exception(error)

    gc.callbacks.append(format_a_traceback)
    try:
        proto = export_onnx(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), torch.randn(2, 4))
    finally:
        gc.callbacks.remove(format_a_traceback)
    assert [node.op_type for node in proto.graph.node] == ["Gemm"]
    assert gc.isenabled()  # the collector runs again after the export


@pytest.mark.slow  # trains through the CLI
def test_build_cli_trains_exports_then_skips_what_is_built(tmp_path, monkeypatch, capsys) -> None:
    spec = tiny_cnn_spec("gn")
    monkeypatch.setattr(export.build, "DEFAULT_MODELS", {spec.name: spec})
    args = ["--artifacts", str(tmp_path / "art"), "--repository", str(tmp_path / "repo")]
    assert main(args) == 0
    report = json.loads((tmp_path / "repo" / spec.name / "1" / "report.json").read_text())
    assert report["folds"] == [] and report["norm_layers"] == {"GroupNorm": 6}
    assert "GroupNormalization" in report["ops"]["served"]
    assert report["checkpoint_sha256"] == sha256_file(tmp_path / "art" / spec.name / "checkpoint.pt")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "already in" in out and f"| {spec.name} | yes |" in out
    assert (tmp_path / "art" / "summary.md").read_text().count(spec.name) == 1


@pytest.mark.slow  # trains through the CLI
def test_build_cli_rebuilds_what_a_changed_spec_or_checkpoint_made_stale(tmp_path, monkeypatch, capsys) -> None:
    spec = tiny_cnn_spec("in")
    args = ["--artifacts", str(tmp_path / "art"), "--repository", str(tmp_path / "repo")]
    monkeypatch.setattr(export.build, "DEFAULT_MODELS", {spec.name: spec})
    assert main(args) == 0
    changed = replace(spec, train=replace(spec.train, lr=1e-3))
    monkeypatch.setattr(export.build, "DEFAULT_MODELS", {spec.name: changed})
    assert main(args) == 0
    assert "made from an older spec; training again" in capsys.readouterr().out
    # A checkpoint trained by hand (another seed) is exported again, not skipped.
    train_model(replace(changed, train=replace(changed.train, seed=1)), tmp_path / "art" / spec.name, progress=False)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "already in" not in out and f"{spec.name}: written" in out


@pytest.mark.slow  # trains through the CLI
def test_build_cli_exports_again_when_the_statistics_asked_for_change(tmp_path, monkeypatch, capsys) -> None:
    spec = tiny_cnn_spec("bn")
    monkeypatch.setattr(export.build, "DEFAULT_MODELS", {spec.name: spec})
    args = ["--artifacts", str(tmp_path / "art"), "--repository", str(tmp_path / "repo")]
    report_file = tmp_path / "repo" / spec.name / "1" / "report.json"
    assert main(args) == 0
    assert json.loads(report_file.read_text())["bn_statistics"]["folded"] == "ema"
    assert main([*args, "--precise-bn"]) == 0  # the same checkpoint, other statistics: not skipped
    assert "already in" not in capsys.readouterr().out
    assert json.loads(report_file.read_text())["bn_statistics"]["folded"] == "precise"
    assert main([*args, "--precise-bn"]) == 0
    assert "already in" in capsys.readouterr().out


@pytest.mark.slow  # trains through the CLI
def test_build_cli_builds_the_others_when_one_model_fails(tmp_path, monkeypatch, capsys) -> None:
    good, bad = tiny_cnn_spec("gn"), replace(tiny_cnn_spec("bn"), min_test_accuracy=1.01)
    monkeypatch.setattr(export.build, "DEFAULT_MODELS", {bad.name: bad, good.name: good})
    assert main(["--artifacts", str(tmp_path / "art"), "--repository", str(tmp_path / "repo")]) == 1
    err = capsys.readouterr().err
    assert f"error: {bad.name}: export refused, 1 check(s) failed: accuracy" in err
    assert "expected >= 101.00%" in err
    assert load_version(tmp_path / "repo" / good.name, "1")
    assert not (tmp_path / "repo" / bad.name).exists()
    failed = json.loads((tmp_path / "art" / bad.name / "export_report.json").read_text())
    assert failed["checks"]["accuracy"]["passed"] is False


def test_build_cli_rejects_unknown_model_names(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["cnn-xx"])
    assert e.value.code == 2
    assert "unknown model(s) ['cnn-xx']" in capsys.readouterr().err


def test_a_trained_model_must_take_the_digits_it_was_trained_on(tiny) -> None:
    _, meta, _ = tiny
    wrong = {**meta, "config": {**meta["config"], "in_channels": 3}}
    with pytest.raises(ValueError, match=r"trained on digits of shape \(1, 8, 8\), but its input is \(3, 8, 8\)"):
        export.build.verification_inputs(wrong)
    x, y, what = export.build.verification_inputs({**wrong, "trained": False})
    assert x.shape == (64, 3, 8, 8) and y is None and what == "64 seeded standard-normal images"
