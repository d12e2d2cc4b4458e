"""The model repository: the contract between the exporter and the service.

    <root>/<model>/config.json               ModelConfig: inputs, outputs, max batch size, labels, norm layers
    <root>/<model>/<version>/model.onnx      the served graph, every BatchNorm folded
    <root>/<model>/<version>/report.json     VersionReport: fold and parity figures, sha256 of model.onnx
    <root>/<model>/<version>/batch_stats.onnx    (BatchNorm models) the graph that normalizes with the
                                                 statistics of its own batch, as train() mode does
    <root>/<model>/<version>/bn_stats.json       (BatchNorm models) BatchNormStats: per layer, the running
                                                 mean and variance, and the batch-statistics graph's outputs

Versions are positive integers, as in Triton. A version whose model.onnx, or any file its report
lists under ``files``, does not hash to the sha256 in its report is refused: the file changed after
it was verified.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

__all__ = [
    "BATCH_STATS_FILE",
    "BN_STATS_FILE",
    "BatchNormLayer",
    "BatchNormStats",
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
    "load_bn_stats",
    "load_config",
    "load_version",
    "sha256_file",
]

CONFIG_FILE = "config.json"
MODEL_FILE = "model.onnx"
REPORT_FILE = "report.json"
BATCH_STATS_FILE = "batch_stats.onnx"
BN_STATS_FILE = "bn_stats.json"
VERSION_PATTERN = re.compile(r"^[1-9][0-9]*$")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"  # a model name is a folder name and a URL path segment

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
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
    sha256: Sha256  # of model.onnx
    # The version's other files (batch_stats.onnx, bn_stats.json), by name, with their sha256.
    files: dict[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")], Sha256] = Field(
        default_factory=dict
    )


class BatchNormLayer(BaseModel):
    """One BatchNorm of the trained model: its running statistics, and where the batch-statistics graph
    returns this batch's mean and (biased) variance."""

    model_config = ConfigDict(extra="forbid")

    name: str  # qualified name in the PyTorch model, e.g. "stem.0.1"
    type: str  # BatchNorm2d, TokenBatchNorm, ...
    channels: int = Field(ge=1)
    channel_axis: int
    reduced_over: str  # the axes a channel's statistics are taken over, e.g. "N, H, W"
    positions: int = Field(ge=1)  # values per channel that one sample gives (H * W, or T tokens)
    eps: float = Field(gt=0)
    momentum: float | None
    running_mean: list[float]
    running_var: list[float]
    mean_output: str
    var_output: str

    @model_validator(mode="after")
    def _one_value_per_channel(self) -> BatchNormLayer:
        if not (len(self.running_mean) == len(self.running_var) == self.channels):
            raise ValueError(
                f"layer {self.name}: {len(self.running_mean)} running means and {len(self.running_var)} variances, "
                f"expected {self.channels} each (one per channel)"
            )
        return self


class BatchNormStats(BaseModel):
    """bn_stats.json: every BatchNorm layer, in the order the model defines them."""

    model_config = ConfigDict(extra="forbid")

    logits_output: str
    layers: list[BatchNormLayer] = Field(min_length=1)


@dataclass(frozen=True)
class ModelVersion:
    config: ModelConfig
    version: str
    path: Path  # the version's folder
    report: VersionReport

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def has_batch_stats(self) -> bool:
        """Whether the version carries a batch-statistics graph and its BatchNorm statistics."""
        return BATCH_STATS_FILE in self.report.files and BN_STATS_FILE in self.report.files

    @property
    def batch_stats_file(self) -> Path:
        return self.path / BATCH_STATS_FILE


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
