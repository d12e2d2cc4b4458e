"""Read the model repository: each file validated against its schema, each version's files against their hashes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import ValidationError

from repository.schema import (
    BN_STATS_FILE,
    CONFIG_FILE,
    MODEL_FILE,
    REPORT_FILE,
    VERSION_PATTERN,
    BatchNormStats,
    ModelConfig,
    ModelVersion,
    RepositoryError,
    VersionReport,
)

__all__ = ["list_versions", "load_bn_stats", "load_config", "load_version", "sha256_bytes", "sha256_file"]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RepositoryError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RepositoryError(f"{path} is not readable JSON: {e}") from None


def load_config(model_dir: Path) -> ModelConfig:
    """Read and validate ``<model_dir>/config.json``; its name must be the folder's name."""
    try:
        config = ModelConfig.model_validate(_read_json(model_dir / CONFIG_FILE))
    except ValidationError as e:
        raise RepositoryError(f"{model_dir / CONFIG_FILE} is not a valid model config: {e}") from None
    if config.name != model_dir.name:
        raise RepositoryError(f"{model_dir / CONFIG_FILE} names model {config.name!r}, expected {model_dir.name!r}")
    return config


def list_versions(model_dir: Path) -> list[str]:
    """The model's version folders, oldest first (numeric order)."""
    if not model_dir.is_dir():
        raise RepositoryError(f"{model_dir} is not a folder")
    versions = [p.name for p in model_dir.iterdir() if p.is_dir() and VERSION_PATTERN.match(p.name)]
    return sorted(versions, key=int)


def load_version(model_dir: Path, version: str, config: ModelConfig | None = None) -> ModelVersion:
    """Read one version's report and check that model.onnx hashes to the sha256 it records."""
    if not VERSION_PATTERN.match(version):
        raise RepositoryError(f"version {version!r} is not a positive integer")
    config = config or load_config(model_dir)
    path = model_dir / version
    try:
        report = VersionReport.model_validate(_read_json(path / REPORT_FILE))
    except ValidationError as e:
        raise RepositoryError(f"{path / REPORT_FILE} is not a valid report: {e}") from None
    if (report.model, report.version) != (config.name, version):
        raise RepositoryError(
            f"{path / REPORT_FILE} describes {report.model!r} version {report.version!r}, "
            f"expected {config.name!r} version {version!r}"
        )
    for name, expected in {MODEL_FILE: report.sha256, **report.files}.items():
        _check_hash(path / name, expected)
    return ModelVersion(config, version, path, report)


def _check_hash(file: Path, expected: str) -> None:
    if not file.is_file():
        raise RepositoryError(f"{file} is missing")
    actual = sha256_file(file)
    if actual != expected:
        raise RepositoryError(
            f"{file} has sha256 {actual}, but its report records {expected}: "
            "the file changed after it was exported and verified"
        )


def load_bn_stats(version: ModelVersion) -> BatchNormStats:
    """Read a version's bn_stats.json, hashing it again: it may have changed since the version loaded."""
    file = version.path / BN_STATS_FILE
    if BN_STATS_FILE not in version.report.files:
        raise RepositoryError(f"{version.path / REPORT_FILE} lists no {BN_STATS_FILE}")
    _check_hash(file, version.report.files[BN_STATS_FILE])
    try:
        return BatchNormStats.model_validate(_read_json(file))
    except ValidationError as e:
        raise RepositoryError(f"{file} is not valid BatchNorm statistics: {e}") from None
