"""The model repository: the contract between the exporter and the service, and the one place that reads
and writes it (``schema``, ``read``, ``write``). It imports neither torch nor onnxruntime.

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

from repository.read import list_versions, load_bn_stats, load_config, load_version, sha256_bytes, sha256_file
from repository.schema import (
    BATCH_STATS_FILE,
    BN_STATS_FILE,
    CONFIG_FILE,
    DTYPES,
    MODEL_FILE,
    NAME_PATTERN,
    REPORT_FILE,
    VERSION_PATTERN,
    BatchNormLayer,
    BatchNormStats,
    ModelConfig,
    ModelVersion,
    RepositoryError,
    TensorSpec,
    VersionReport,
)
from repository.write import write_version

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
    "list_versions",
    "load_bn_stats",
    "load_config",
    "load_version",
    "sha256_bytes",
    "sha256_file",
    "write_version",
]
