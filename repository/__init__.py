"""The model repository: the contract between the exporter and the service, and the one place that reads
and writes it (``schema``, ``read``, ``write``). It imports neither torch nor onnxruntime.

    <root>/<model>/config.json               ModelConfig: inputs, outputs, max batch size, labels, norm layers
    <root>/<model>/<version>/model.onnx      the served graph, every BatchNorm folded
    <root>/<model>/<version>/report.json     VersionReport: fold and parity figures, sha256 of model.onnx
    <root>/<model>/<version>/batch_stats.onnx    (BatchNorm models) the graph that normalizes with the
                                                 statistics of its own batch, as train() mode does
    <root>/<model>/<version>/bn_stats.json       (BatchNorm models) BatchNormStats: per layer, the running
                                                 mean and variance, and the batch-statistics graph's outputs

A config's max_batch_size is Triton's: at least 1, every input's and output's first dimension is the
batch (-1) and no other dimension is -1; 0, the model has no batch dimension and every shape is fixed.
Every datatype but BYTES is served. A report whose ``batch_stats`` is ``{"unavailable": "<reason>"}``
says why a BatchNorm model's version has no batch-statistics graph.

Versions are positive integers, as in Triton. A version whose model.onnx, or any file its report
lists under ``files``, does not hash to the sha256 in its report is refused: the file changed after
it was verified.
"""

# The package's names are its modules' own: each module's __all__ says what it gives.
from repository import read, schema, write
from repository.read import *  # noqa: F403
from repository.schema import *  # noqa: F403
from repository.write import *  # noqa: F403

__all__ = [*schema.__all__, *read.__all__, *write.__all__]
