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

    name: str = Field(min_length=1)
    datatype: Datatype
    shape: list[int]  # -1 marks the batch dimension (first, and only where the model has one)

    @model_validator(mode="after")
    def _servable(self) -> TensorSpec:
        if self.datatype not in DTYPES:
            raise ValueError(
                f"tensor {self.name!r} is {self.datatype}: normserve serves tensors of fixed-size elements only "
                f"({', '.join(DTYPES)}); a {self.datatype} tensor (variable-length strings) has no fixed-size form "
                "to batch, check or send as binary data"
            )
        if any(d == 0 or d < -1 for d in self.shape):
            raise ValueError(
                f"tensor {self.name!r} has shape {self.shape}; expected sizes of at least 1, "
                "or -1 for the batch dimension"
            )
        return self

    @property
    def text(self) -> str:
        """How messages name the tensor: ``x (FP32 [-1, 4])``."""
        return f"{self.name} ({self.datatype} {self.shape})"


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    platform: Literal["onnxruntime_onnx"] = "onnxruntime_onnx"
    # As Triton writes it: >= 1, every tensor's first dimension is the batch (-1), and requests are batched up
    # to this many rows; 0, the tensors have no batch dimension, their shapes are fixed, and each request runs alone.
    max_batch_size: int = Field(ge=0)
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    labels: list[str] = Field(default_factory=list)
    norm_layers: dict[str, int] = Field(default_factory=dict)  # layer type -> count in the trained model
    trained: bool = True
    description: str = ""
    input_description: str = ""

    @model_validator(mode="after")
    def _shapes_agree_with_batching(self) -> ModelConfig:
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise ValueError(f"{kind} names {names} repeat; expected each {kind} named once")
            for spec in specs:
                if self.max_batch_size == 0 and -1 in spec.shape:
                    raise ValueError(
                        f"{kind} {spec.text} has a -1 dimension, but max_batch_size is 0 (no batch dimension): "
                        "expected every dimension fixed, or max_batch_size >= 1 with -1 as the first dimension only"
                    )
                if self.max_batch_size >= 1 and (spec.shape[:1] != [-1] or -1 in spec.shape[1:]):
                    raise ValueError(
                        f"{kind} {spec.text}: with max_batch_size {self.max_batch_size} every tensor's first "
                        "dimension is the batch, -1, and no other dimension is -1; expected a shape like "
                        f"{[-1, *(d for d in spec.shape if d != -1)]} (or max_batch_size 0 for a model with no "
                        "batch dimension)"
                    )
        return self

    @property
    def batched(self) -> bool:
        """Whether the tensors have a batch dimension (max_batch_size >= 1) that requests are batched along."""
        return self.max_batch_size > 0

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

    @property
    def batch_stats_unavailable(self) -> str | None:
        """Why the version has no batch-statistics graph, where the report says so: an exporter that could
        not build one writes ``"batch_stats": {"unavailable": "<reason>"}``."""
        section = (self.model_extra or {}).get("batch_stats")
        reason = section.get("unavailable") if isinstance(section, dict) else None
        return reason if isinstance(reason, str) and reason else None


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
