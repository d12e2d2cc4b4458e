"""``normserve export`` and ``normserve import`` as a user runs them: what they write, and what they refuse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.onnx_export import export_onnx, op_histogram
from normserve.cli import main
from repository import load_config, load_version
from tests.normserve.user_modules import text_inputs, tiny_cnn, tiny_text

MODULES = "tests/normserve/user_modules.py"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_export_folds_verifies_and_writes_a_module(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys,
        "export",
        f"{MODULES}:tiny_cnn",
        "--name",
        "cnn",
        "--input",
        "x:FP32:2,6,6",
        "--repository",
        str(tmp_path),
    )
    assert code == 0, err
    assert "cnn version 1 written" in out and "1 folded, 1 folded forward, 0 as affine" in out
    assert "[1/6]" in err  # progress on stderr
    version = load_version(tmp_path / "cnn", "1")
    report = version.report.model_dump()
    assert report["fold_path"] == "torch.fx" and report["verified_on"].startswith("64 synthetic samples")
    assert [(f["norm"], f["forward"]) for f in report["folds"]] == [("bn", False), ("bn_after_relu", True)]
    assert all(c["passed"] for c in report["checks"].values())
    assert {"batch_stats_parity", "batch_stats_differ"} <= set(report["checks"])
    assert version.has_batch_stats
    config = load_config(tmp_path / "cnn")
    assert [(s.name, s.datatype, s.shape) for s in config.inputs] == [("x", "FP32", [-1, 2, 6, 6])]
    assert [(s.datatype, s.shape) for s in config.outputs] == [("FP32", [-1, 3])]
    assert config.norm_layers == {"BatchNorm2d": 2} and config.max_batch_size == 64
    ops = onnx.load(version.model_file).graph.node
    assert "BatchNormalization" not in {n.op_type for n in ops}


def test_a_two_input_text_module_with_samples_labels_and_named_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids, mask = text_inputs(40, seed=3)
    with torch.no_grad():
        labels = tiny_text()(ids, mask)[0].argmax(1).numpy()
    np.savez(tmp_path / "samples.npz", token_ids=ids.numpy(), attention_mask=mask.numpy(), labels=labels)
    (tmp_path / "labels.txt").write_text("negative\nneutral\npositive\n")
    repo = tmp_path / "repo"
    code, out, err = run(
        capsys, "export", f"{MODULES}:tiny_text", "--name", "text",
        "--input", "token_ids:INT64:8", "--input", "attention_mask:BOOL:8",
        "--output", "logits", "--output", "tokens",
        "--samples", str(tmp_path / "samples.npz"), "--labels", str(tmp_path / "labels.txt"),
        "--max-batch-size", "16", "--description", "tiny text classifier", "--repository", str(repo),
    )  # fmt: skip
    assert code == 0, err
    config = load_config(repo / "text")
    assert [(s.name, s.datatype, s.shape) for s in config.inputs] == [
        ("token_ids", "INT64", [-1, 8]),
        ("attention_mask", "BOOL", [-1, 8]),
    ]
    assert [(s.name, s.datatype) for s in config.outputs] == [("logits", "FP32"), ("tokens", "INT64")]
    assert config.labels == ["negative", "neutral", "positive"] and config.max_batch_size == 16
    assert config.description == "tiny text classifier"
    report = load_version(repo / "text", "1").report.model_dump()
    assert report["verified_on"] == "40 given samples with labels"
    assert report["checks"]["accuracy"]["figures"]["accuracy"] == 1.0
    assert report["folds"][0]["kind"] == "Conv1d+BatchNorm1d"


def expect_refusal(capsys: pytest.CaptureFixture[str], repo: Path, *argv: str) -> str:
    code, out, err = run(capsys, *argv, "--repository", str(repo))
    assert code == 2 and out == ""
    *progress, error = err.strip().splitlines()  # the steps done, then one line that says why
    assert error.startswith("normserve ") and all(line.startswith("[") for line in progress), err
    assert not repo.exists() or not any(repo.rglob("model.onnx"))
    return error


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((f"{MODULES}:raises", "--input", "x:FP32:4"), "raises() raised FileNotFoundError: weights.pt is missing"),
        ((f"{MODULES}:not_a_module", "--input", "x:FP32:4"), "returned dict; expected a torch.nn.Module"),
        ((f"{MODULES}:missing", "--input", "x:FP32:4"), "has no callable 'missing'"),
        (("no_such_file.py:build", "--input", "x:FP32:4"), "no_such_file.py: no such file"),
        ((f"{MODULES}:tiny_cnn", "--input", "x:FP32"), "expected NAME:DATATYPE:DIMS"),
        ((f"{MODULES}:tiny_cnn", "--input", "x:FLOAT:2,6,6"), "datatype 'FLOAT'; expected one of BOOL, UINT8"),
        (
            (f"{MODULES}:tiny_cnn", "--input", "x:FP32:2,6,6", "--input", "y:FP32:3"),
            "TinyCNN.forward takes (x), 1 required; --input gives 2",
        ),
        ((f"{MODULES}:tiny_cnn", "--input", "x:FP32:3,6,6"), "TinyCNN.forward on two rows of x FP32 [3, 6, 6] raised"),
        ((f"{MODULES}:tiny_text", "--input", "token_ids:INT64:8"), "TinyText.forward takes (token_ids, attention_mask"),
        ((f"{MODULES}:noisy", "--input", "x:FP32:4"), "refused, 2 check(s) failed: parity: max |ort - reference"),
        ((f"{MODULES}:tiny_cnn", "--input", "x:FP32:2,6,6", "--output", "a", "--output", "b"), "forward returns 1"),
    ],
    ids=[
        "callable-raises", "not-a-module", "no-callable", "no-file", "spec-without-dims", "unknown-datatype",
        "more-inputs-than-forward", "wrong-dims", "fewer-inputs-than-forward", "fails-parity", "output-names",
    ],
)  # fmt: skip
def test_export_refuses_with_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    err = expect_refusal(capsys, tmp_path / "repo", "export", *argv, "--name", "m")
    assert message in err


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"input": np.zeros((4, 2, 6, 6), np.float32)}, "holds arrays ['input']; expected one per input: ['x']"),
        ({"x": np.zeros((4, 2, 5, 6), np.float32)}, "'x' has shape [4, 2, 5, 6]; expected [rows, 2, 6, 6]"),
        ({"x": np.zeros((1, 2, 6, 6), np.float32)}, "1 row(s); expected at least 2"),
        ({"x": np.zeros((4, 2, 6, 6), np.float32), "labels": np.zeros(3, np.int64)}, "expected 4 integer class"),
    ],
    ids=["names", "shape", "rows", "labels"],
)
def test_samples_that_do_not_match_the_specs_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arrays: dict[str, np.ndarray], message: str
) -> None:
    np.savez(tmp_path / "s.npz", **arrays)
    argv = ("export", f"{MODULES}:tiny_cnn", "--input", "x:FP32:2,6,6", "--samples", str(tmp_path / "s.npz"))
    err = expect_refusal(capsys, tmp_path / "repo", *argv, "--name", "m")
    assert message in err


def test_a_name_already_served_needs_force_and_then_gets_the_next_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ("export", f"{MODULES}:tiny_cnn", "--name", "cnn", "--input", "x:FP32:2,6,6", "--repository", str(tmp_path))
    assert run(capsys, *argv)[0] == 0
    code, out, err = run(capsys, *argv)
    assert code == 2 and "model 'cnn' is already in" in err and "pass --force to add version 2" in err
    assert sorted(p.name for p in (tmp_path / "cnn").iterdir() if p.is_dir()) == ["1"]
    assert run(capsys, *argv, "--force")[0] == 0
    assert sorted(p.name for p in (tmp_path / "cnn").iterdir() if p.is_dir()) == ["1", "2"]


def test_import_and_serve_need_no_torch(tmp_path: Path) -> None:
    """The serving install has neither torch nor onnxscript: `normserve import` must not import them."""
    graph = export_onnx(tiny_cnn(), torch.randn(2, 2, 6, 6), optimize=False, input_names=["x"], output_names=["y"])
    assert op_histogram(graph)["BatchNormalization"] == 2
    onnx.save(graph, tmp_path / "m.onnx")
    argv = ["import", str(tmp_path / "m.onnx"), "--name", "m", "--repository", str(tmp_path / "r")]
    script = (
        f"import sys; from normserve.cli import main; code = main({argv!r}); "
        "print(sorted(m for m in ('torch', 'onnxscript') if m in sys.modules)); sys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": ""},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
    report = json.loads((tmp_path / "r" / "m" / "1" / "report.json").read_text())
    assert report["source"]["kind"] == "onnx" and [f["kind"] for f in report["folds"]] == ["Conv+BatchNormalization"]


def unknown_op_graph() -> onnx.ModelProto:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("NoSuchOp", ["x"], ["y"])],
        "broken",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3])],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"garbage", "is not an ONNX model (expected a serialized onnx.ModelProto)"),
        (unknown_op_graph().SerializeToString(), "NoSuchOp"),
    ],
    ids=["not-onnx", "onnxruntime-refuses"],
)
def test_import_refuses_a_file_it_cannot_serve_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, message: str
) -> None:
    (tmp_path / "m.onnx").write_bytes(content)
    err = expect_refusal(capsys, tmp_path / "repo", "import", str(tmp_path / "m.onnx"), "--name", "m")
    assert message in err


def test_import_reads_external_data_and_writes_one_self_contained_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from examples.onnx_convnet import main as write_convnet

    assert write_convnet([str(tmp_path / "convnet.onnx"), "--external-data"]) == 0
    assert (tmp_path / "convnet.onnx.data").exists()
    capsys.readouterr()
    code, out, err = run(
        capsys, "import", str(tmp_path / "convnet.onnx"), "--name", "convnet", "--repository", str(tmp_path / "r")
    )
    assert code == 0, err
    assert "4 folded, 0 folded forward, 1 as affine" in out and "kept as affine: bn_after_relu" in out
    version = load_version(tmp_path / "r" / "convnet", "1")
    served = onnx.load(version.model_file, load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in served.graph.initializer)
    assert sorted(p.name for p in version.path.iterdir()) == [
        "batch_stats.onnx",
        "bn_stats.json",
        "model.onnx",
        "report.json",
    ]
    assert load_config(tmp_path / "r" / "convnet").max_batch_size == 64
