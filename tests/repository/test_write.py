from pathlib import Path

import pytest
from pydantic import ValidationError

from repository import (
    ModelConfig,
    RepositoryError,
    TensorSpec,
    list_versions,
    load_config,
    load_version,
    write_version,
)


def config(name: str = "m") -> ModelConfig:
    return ModelConfig(
        name=name,
        max_batch_size=8,
        inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 4])],
        outputs=[TensorSpec(name="logits", datatype="FP32", shape=[-1, 2])],
        labels=["a", "b"],
    )


def test_round_trip_checks_the_hash_and_detects_tampering(tmp_path) -> None:
    written = write_version(tmp_path, config(), "1", b"onnx bytes", {"test_accuracy": 0.5})
    again = load_version(tmp_path / "m", "1")
    assert again.config == config() and again.report.sha256 == written.report.sha256
    assert again.report.model_dump()["test_accuracy"] == 0.5  # the exporter's figures survive
    assert again.model_file.read_bytes() == b"onnx bytes"
    again.model_file.write_bytes(b"onnx bytez")
    with pytest.raises(RepositoryError, match="changed after it was exported"):
        load_version(tmp_path / "m", "1")


def test_rewriting_a_version_replaces_it_whole_and_leaves_no_staging(tmp_path) -> None:
    write_version(tmp_path, config(), "1", b"old", {})
    write_version(tmp_path, config(), "2", b"two", {})
    write_version(tmp_path, config(), "1", b"new", {})
    assert load_version(tmp_path / "m", "1").model_file.read_bytes() == b"new"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "2", "config.json"]
    assert list_versions(tmp_path / "m") == ["1", "2"]
    assert ((tmp_path / "m" / "1").stat().st_mode & 0o777) == 0o755  # readable by a server's own user
    assert ((tmp_path / "m" / "config.json").stat().st_mode & 0o777) == 0o644


def test_version_must_be_a_positive_integer(tmp_path) -> None:
    with pytest.raises(ValueError, match="not a positive integer"):
        write_version(tmp_path, config(), "v1", b"x", {})


def test_a_version_may_not_change_the_contract_other_versions_are_served_with(tmp_path) -> None:
    write_version(tmp_path, config(), "1", b"one", {})
    wider = config().model_copy(update={"inputs": [TensorSpec(name="input", datatype="FP32", shape=[-1, 5])]})
    with pytest.raises(ValueError, match=r"changes inputs, outputs, max_batch_size, which version\(s\) \['1'\]"):
        write_version(tmp_path, wider, "2", b"two", {})
    assert list_versions(tmp_path / "m") == ["1"] and load_config(tmp_path / "m") == config()
    write_version(tmp_path, wider, "1", b"one again", {})  # replacing the only version may change it
    assert load_config(tmp_path / "m") == wider


@pytest.mark.parametrize("name", ["../escape", ".hidden", "a/b", ""])
def test_model_names_must_be_plain_folder_names(name: str) -> None:
    with pytest.raises(ValidationError, match="should match pattern"):
        config(name)


def test_a_failed_swap_restores_the_old_version(tmp_path, monkeypatch) -> None:
    write_version(tmp_path, config(), "1", b"old", {})
    rename = Path.rename

    def failing_rename(self: Path, target: Path) -> Path:
        if self.name.startswith(".1.new-"):
            raise OSError("disk full")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="disk full"):
        write_version(tmp_path, config(), "1", b"new", {})
    monkeypatch.undo()
    assert load_version(tmp_path / "m", "1").model_file.read_bytes() == b"old"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "config.json"]
