"""The model repository's schema: its file names, what each JSON file holds, and each datatype in numpy.

Read by ``repository.read``, written by ``repository.write``; the layout is in ``repository``'s docstring.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

__all__ = [
    "BATCH_STATS_FILE",
    "BN_STATS_FILE",
    "CONFIG_FILE",
    "DTYPES",
    "MODEL_FILE",
    "NAME_PATTERN",
    "REPORT_FILE",
    "VERSION_PATTERN",
    "BatchNormLayer",
    "BatchNormStats",
    "ModelConfig",
    "ModelVersion",
    "RepositoryError",
    "TensorSpec",
    "VersionReport",
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
# Open Inference Protocol datatype -> numpy dtype (BYTES has no fixed-size numpy form).
DTYPES: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}


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
    """One version of a model as the repository holds it, its files checked against their hashes."""

    config: ModelConfig
    number: str  # "1", "2", ...: the version folder's name
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
