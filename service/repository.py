"""The model repository: the contract between the exporter and the service.

    <root>/<model>/config.json               ModelConfig: inputs, outputs, max batch size, labels, norm layers
    <root>/<model>/<version>/model.onnx      the served graph, every BatchNorm folded
    <root>/<model>/<version>/report.json     VersionReport: fold and parity figures, sha256 of model.onnx

Versions are positive integers, as in Triton. A version whose model.onnx does not hash to the
sha256 in its report is refused: the file changed after it was verified.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "CONFIG_FILE",
    "MODEL_FILE",
    "NAME_PATTERN",
    "REPORT_FILE",
    "VERSION_PATTERN",
    "ModelConfig",
    "ModelVersion",
    "RepositoryError",
    "TensorSpec",
    "VersionReport",
    "list_versions",
    "load_config",
    "load_version",
    "sha256_file",
]

CONFIG_FILE = "config.json"
MODEL_FILE = "model.onnx"
REPORT_FILE = "report.json"
VERSION_PATTERN = re.compile(r"^[1-9][0-9]*$")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"  # a model name is a folder name and a URL path segment

Datatype = Literal["BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"]


class RepositoryError(Exception):
    """A model in the repository is missing, malformed or does not match its report."""


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    datatype: Datatype
    shape: list[int]  # -1 marks the dynamic (batch) dimension


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    platform: Literal["onnxruntime_onnx"] = "onnxruntime_onnx"
    max_batch_size: int = Field(ge=1)
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    labels: list[str] = Field(default_factory=list)
    norm_layers: dict[str, int] = Field(default_factory=dict)  # layer type -> count in the trained model
    trained: bool = True
    description: str = ""
    input_description: str = ""

    @functools.cached_property
    def input_specs(self) -> dict[str, TensorSpec]:
        return {s.name: s for s in self.inputs}

    @functools.cached_property
    def output_specs(self) -> dict[str, TensorSpec]:
        return {s.name: s for s in self.outputs}


class VersionReport(BaseModel):
    """The part of report.json the service relies on; the exporter writes much more (kept as extra)."""

    model_config = ConfigDict(extra="allow")

    model: str
    version: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ModelVersion:
    config: ModelConfig
    version: str
    path: Path  # the version's folder
    report: VersionReport

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE


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
    if not (path / MODEL_FILE).is_file():
        raise RepositoryError(f"{path / MODEL_FILE} is missing")
    actual = sha256_file(path / MODEL_FILE)
    if actual != report.sha256:
        raise RepositoryError(
            f"{path / MODEL_FILE} has sha256 {actual}, but its report records {report.sha256}: "
            "the file changed after it was exported and verified"
        )
    return ModelVersion(config, version, path, report)
