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

__all__ = ["CPU", "CUDA", "ProviderStatus", "Runtime", "cuda_status", "resolve_provider", "session_options"]

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

_ORT_WARNING = 2
_ORT_FATAL = 4
_QUIET = threading.Lock()  # sessions are created one at a time while onnxruntime's log is turned down


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
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._seconds_at_1 = 0.0
        self._seconds_per_row = 0.0

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch; the outputs come in ``output_names`` order."""
        return self.session.run(self.output_names, feeds)  # type: ignore[no-any-return]

    def warm(self, example: dict[str, np.ndarray], max_batch_size: int, repeats: int = 3) -> None:
        """Run the graph at batch 1 and at ``max_batch_size`` so that the first requests pay no
        allocation or kernel selection, and measure what one batch costs at each end."""

        def timed(feeds: dict[str, np.ndarray]) -> float:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                self.run(feeds)
                times.append(time.perf_counter() - start)
            return statistics.median(times)

        big = {k: np.repeat(v, max_batch_size, axis=0) for k, v in example.items()}
        self.run(big)
        at_1 = timed(example)
        at_max = timed(big) if max_batch_size > 1 else at_1
        self._seconds_at_1 = at_1
        self._seconds_per_row = max(at_max - at_1, 0.0) / max(max_batch_size - 1, 1)

    def estimate(self, rows: int) -> float:
        """Seconds one batch of ``rows`` rows should take, from the warm-up."""
        return self._seconds_at_1 + self._seconds_per_row * (rows - 1)
