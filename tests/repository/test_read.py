import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from repository import RepositoryError, list_versions, load_config, load_version

CONFIG = {
    "name": "m",
    "max_batch_size": 4,
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]}],
}


def make_model(root: Path, config: dict | None = None, versions: tuple[str, ...] = ("1",)) -> Path:
    model_dir = root / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(config or CONFIG))
    for v in versions:
        (model_dir / v).mkdir()
        (model_dir / v / "model.onnx").write_bytes(b"graph " + v.encode())
        sha = hashlib.sha256(b"graph " + v.encode()).hexdigest()
        (model_dir / v / "report.json").write_text(json.dumps({"model": "m", "version": v, "sha256": sha}))
    return model_dir


def test_versions_are_listed_in_numeric_order(tmp_path) -> None:
    model_dir = make_model(tmp_path, versions=("10", "2", "1"))
    (model_dir / ".1.new-abc").mkdir()  # an exporter's staging folder is not a version
    assert list_versions(model_dir) == ["1", "2", "10"]
    assert load_version(model_dir, "10").number == "10"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: (d / "config.json").write_text("{not json"), "not readable JSON"),
        (
            lambda d: (d / "config.json").write_text(json.dumps({**CONFIG, "max_batch_size": 0})),
            r"(?s)not a valid model config: .*input input \(FP32 \[-1, 3\]\) has a -1 dimension, "
            "but max_batch_size is 0",
        ),
        (lambda d: (d / "config.json").write_text(json.dumps({**CONFIG, "name": "other"})), "expected 'm'"),
        (lambda d: (d / "1" / "model.onnx").unlink(), "model.onnx is missing"),
        (lambda d: (d / "1" / "report.json").unlink(), "report.json is missing"),
        (lambda d: (d / "1" / "model.onnx").write_bytes(b"graph 2"), "sha256"),
    ],
)
def test_a_broken_model_is_refused_with_the_reason(tmp_path, change, message) -> None:
    model_dir = make_model(tmp_path)
    change(model_dir)
    with pytest.raises(RepositoryError, match=message):
        load_version(model_dir, "1")


def test_a_missing_model_folder_is_a_repository_error(tmp_path) -> None:
    with pytest.raises(RepositoryError, match="is not a folder"):
        list_versions(tmp_path / "absent")


def test_config_is_read_and_validated(tmp_path) -> None:
    config = load_config(make_model(tmp_path))
    assert config.inputs[0].shape == [-1, 3] and config.platform == "onnxruntime_onnx"


def test_the_repository_and_the_wire_protocol_import_neither_torch_nor_onnxruntime() -> None:
    """The service installs without torch, and a request is parsed without onnxruntime: the exporter, the
    tests and the load generator read the repository and the protocol with neither."""
    code = "import sys, repository, service.protocol; print(sorted({'torch', 'onnxruntime'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
