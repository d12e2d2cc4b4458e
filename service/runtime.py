"""onnxruntime, and only here: provider selection, one session per model version, warm-up.

onnxruntime-gpu asks for CUDA 13 and cuDNN 9. Without them, a session that asks for the CUDA
provider logs a raw error and quietly runs on CPU. normserve asks, then reads back which provider
the session really uses, and reports a fallback once, in one clear line, with the reason.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import statistics
import threading
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from service.errors import InvalidInput

__all__ = [
    "CPU",
    "CUDA",
    "GraphTensor",
    "ProviderStatus",
    "Runtime",
    "cuda_status",
    "resolve_provider",
    "session_options",
]

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

_ORT_WARNING = 2
_ORT_FATAL = 4
_QUIET = threading.Lock()  # sessions are created one at a time while onnxruntime's log is turned down


# onnxruntime's element types, as the Open Inference Protocol names them.
_DATATYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


@dataclass(frozen=True)
class GraphTensor:
    """An input or output as the graph declares it."""

    name: str
    datatype: str  # FP32, INT64, ...; onnxruntime's own name (e.g. "tensor(uint64)") for a type the protocol lacks
    shape: list[int | None] | None  # None: a dimension (or the whole shape) the graph leaves open

    @property
    def text(self) -> str:
        dims = (
            "unknown" if self.shape is None else "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"
        )
        return f"{self.name} ({self.datatype} {dims})"


def _graph_tensor(arg: ort.NodeArg) -> GraphTensor:
    shape = None if arg.shape is None else [d if isinstance(d, int) and d >= 0 else None for d in arg.shape]
    return GraphTensor(arg.name, _DATATYPES.get(arg.type, arg.type), shape)


@dataclass(frozen=True)
class ProviderStatus:
    """What was asked for and what runs: ``fallback`` explains why a CUDA request runs on CPU."""

    requested: Literal["auto", "cuda", "cpu"]
    active: str  # the provider the session runs on
    fallback: str | None = None


@cache
def cuda_status() -> str | None:
    """None when onnxruntime's CUDA provider can load here; otherwise why it cannot, in a sentence."""
    if CUDA not in ort.get_available_providers():
        return f"this onnxruntime build ({ort.__version__}) has no CUDA provider"
    if importlib.util.find_spec("nvidia") is not None:
        # CUDA and cuDNN installed from pip (nvidia-* wheels) are not on the loader's path until preloaded.
        ort.preload_dlls()
    library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    try:
        ctypes.CDLL(str(library))
    except OSError as e:
        return f"onnxruntime's CUDA provider cannot load ({e}); it needs CUDA 13 and cuDNN 9"
    return None


def resolve_provider(requested: Literal["auto", "cuda", "cpu"]) -> list[str]:
    """The providers to ask onnxruntime for, best first."""
    if requested == "cpu":
        return [CPU]
    if requested == "auto" and cuda_status() is not None:
        return [CPU]  # CUDA cannot load here: do not make every session fail over noisily
    return [CUDA, CPU]


def session_options(intra_op_threads: int, optimize: bool = True) -> ort.SessionOptions:
    """The options every served session uses (``optimize=False`` turns onnxruntime's graph rewrites off,
    for the benchmark that shows what they are worth)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    # Idle intra-op threads would spin on the cores the event loop needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class Runtime:
    """One onnxruntime session over one model.onnx, with its measured cost per batch.

    Args:
        model_file: the served graph.
        requested: the provider setting (auto, cuda or cpu).
        intra_op_threads: onnxruntime's intra-op threads (0 = its default).
    """

    def __init__(self, model_file: Path, requested: Literal["auto", "cuda", "cpu"], intra_op_threads: int) -> None:
        providers = resolve_provider(requested)
        with _QUIET:  # the raw fallback error is onnxruntime's process-wide log; we report it ourselves
            ort.set_default_logger_severity(_ORT_FATAL)
            try:
                self.session = ort.InferenceSession(
                    str(model_file), sess_options=session_options(intra_op_threads), providers=providers
                )
            finally:
                ort.set_default_logger_severity(_ORT_WARNING)
        provider = self.session.get_providers()[0]
        fallback = None
        if requested != "cpu" and provider != CUDA:
            fallback = cuda_status() or "onnxruntime could not create the CUDA provider (no usable GPU or driver)"
        self.provider = ProviderStatus(requested, provider, fallback)
        self.inputs = [_graph_tensor(i) for i in self.session.get_inputs()]
        self.outputs = [_graph_tensor(o) for o in self.session.get_outputs()]
        self.input_names = [i.name for i in self.inputs]
        self.output_names = [o.name for o in self.outputs]
        self._seconds_at_1 = 0.0
        self._seconds_per_row = 0.0

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch; the outputs come in ``output_names`` order.

        Raises:
            InvalidInput: onnxruntime refused the values (INVALID_ARGUMENT: an index out of an embedding's
                range, say), as Triton answers it: the inputs' datatypes and shapes are checked before, so
                what is left is what the model makes of the values.
        """
        try:
            return self.session.run(self.output_names, feeds)  # type: ignore[no-any-return]
        except InvalidArgument as e:
            raise InvalidInput(f"the model refused the inputs' values: {e}") from None

    def warm(
        self, example: dict[str, np.ndarray], max_batch_size: int, repeats: int = 3
    ) -> dict[int, list[np.ndarray]]:
        """Run the graph at batch 1 and at ``max_batch_size`` so that the first requests pay no
        allocation or kernel selection, and measure what one batch costs at each end.

        Args:
            example: one row of every input (with max_batch_size 0: every input whole).
            max_batch_size: the most rows a batch holds; 0 for a graph without a batch dimension, which
                runs the example as it is (each request is one run, and costs the same).

        Returns:
            The outputs of each batch size it ran, by rows (0 for a graph without a batch dimension), so
            that the caller can check them against what the model declares.
        """
        outputs: dict[int, list[np.ndarray]] = {}

        def timed(feeds: dict[str, np.ndarray], rows: int) -> float:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                outputs[rows] = self.run(feeds)
                times.append(time.perf_counter() - start)
            return statistics.median(times)

        if max_batch_size == 0:
            self.run(example)
            self._seconds_at_1, self._seconds_per_row = timed(example, 0), 0.0
            return outputs
        big = {k: np.repeat(v, max_batch_size, axis=0) for k, v in example.items()}
        self.run(big)
        at_1 = timed(example, 1)
        at_max = timed(big, max_batch_size) if max_batch_size > 1 else at_1
        self._seconds_at_1 = at_1
        self._seconds_per_row = max(at_max - at_1, 0.0) / max(max_batch_size - 1, 1)
        return outputs

    def estimate(self, rows: int) -> float:
        """Seconds one batch of ``rows`` rows should take, from the warm-up (a graph without a batch
        dimension runs one request a batch, counted as one row)."""
        return self._seconds_at_1 + self._seconds_per_row * (rows - 1)
