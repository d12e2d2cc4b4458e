"""Provider selection: what was asked for, what really runs, and what the server says about it.

These run on any machine: where CUDA really loads they check that it is used; where it cannot
(no GPU, or no CUDA 13 / cuDNN 9) they check the fallback is reported, and refused when required.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.registry import Registry
from service.runtime import CPU, CUDA, Runtime, cuda_status
from tests.service.conftest import ServeFactory
from tests.service.user_models import write_grid

CUDA_LOADS = cuda_status() is None


@pytest.fixture
def model_file(built_repository: Path) -> Path:
    return built_repository / "affine" / "1" / "model.onnx"


def test_cpu_runs_on_cpu_with_nothing_to_report(model_file: Path) -> None:
    runtime = Runtime(model_file, "cpu", intra_op_threads=1)
    assert runtime.provider.active == CPU and runtime.provider.fallback is None
    (y, total) = runtime.run({"x": np.ones((2, 4), dtype=np.float32)})
    assert y.shape == (2, 3) and total.shape == (2, 1)


def test_auto_uses_cuda_when_it_loads_and_says_why_not_otherwise(model_file: Path) -> None:
    runtime = Runtime(model_file, "auto", intra_op_threads=1)
    if CUDA_LOADS:
        assert runtime.provider.active == CUDA and runtime.provider.fallback is None
    else:
        assert runtime.provider.active == CPU
        assert runtime.provider.fallback == cuda_status()
        assert "CUDA" in runtime.provider.fallback


@pytest.mark.skipif(CUDA_LOADS, reason="CUDA loads here: there is no fallback to report")
def test_a_cuda_fallback_is_one_clear_line_not_onnxruntime_raw_error(
    model_file: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    runtime = Runtime(model_file, "cuda", intra_op_threads=1)  # asks onnxruntime for CUDA regardless
    assert runtime.provider.active == CPU and runtime.provider.fallback
    captured = capfd.readouterr()
    assert "onnxruntime" not in captured.err.lower(), "onnxruntime's raw fallback error leaked to stderr"


def test_the_provider_appears_in_metadata_readiness_and_metrics(serve: ServeFactory) -> None:
    with serve(provider="auto") as server:
        expected = CUDA if CUDA_LOADS else CPU
        metadata = httpx.get(f"{server.url}/v2/models/affine").json()
        assert metadata["provider"] == expected and metadata["provider_requested"] == "auto"
        assert metadata["provider_fallback"] == cuda_status()
        ready = httpx.get(f"{server.url}/v2/health/ready").json()
        assert {m["provider"] for m in ready["models"]} == {expected}
        assert server.metric("normserve_model_provider", model="affine", version="1", provider=expected) == 1


def test_require_gpu_without_a_gpu_keeps_the_server_not_ready_and_says_why(
    serve: ServeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING), serve(provider="auto", require_gpu=True) as server:
        ready = httpx.get(f"{server.url}/v2/health/ready")
        if CUDA_LOADS:
            assert ready.status_code == 200
            return
        assert ready.status_code == 503
        error = ready.json()["error"]
        assert "NORMSERVE_REQUIRE_GPU" in error and "CPUExecutionProvider" in error and str(cuda_status()) in error
        # One clear log line for the fallback, however many models fell back.
        fallbacks = [
            r for r in caplog.records if "instead of CUDA" in r.getMessage() or "but models run on" in r.getMessage()
        ]
        assert len(fallbacks) == 1 and str(cuda_status()) in fallbacks[0].getMessage()


def test_a_model_override_caps_the_batch_size_at_what_the_model_was_verified_for(serve: ServeFactory) -> None:
    models = {"affine": {"max_batch_size": 100, "max_queue_delay_ms": 3}, "tiny-cnn-bn": {"max_batch_size": 4}}
    with serve(models=models) as server:
        registry: Registry = server.app.state.normserve.registry
        assert registry.get("affine").batching.max_batch_size == 8  # config.json's max_batch_size
        assert registry.get("affine").batching.max_queue_delay_s == pytest.approx(0.003)
        assert registry.get("tiny-cnn-bn").batching.max_batch_size == 4
        config = httpx.get(f"{server.url}/v2/models/affine/config").json()
        assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 3000


def test_warm_up_runs_each_end_of_the_batch_and_returns_what_it_answered(model_file: Path, tmp_path: Path) -> None:
    runtime = Runtime(model_file, "cpu", intra_op_threads=1)
    warmed = runtime.warm({"x": np.ones((1, 4), dtype=np.float32)}, max_batch_size=8, repeats=1)
    assert {rows: [o.shape for o in outputs] for rows, outputs in warmed.items()} == {
        1: [(1, 3), (1, 1)],
        8: [(8, 3), (8, 1)],
    }
    assert runtime.estimate(8) >= runtime.estimate(1) > 0
    assert [(t.name, t.datatype, t.shape) for t in runtime.inputs] == [("x", "FP32", [None, 4])]
    # A graph without a batch dimension runs its example as it is, once a request: the cost of every request.
    write_grid(tmp_path)
    fixed = Runtime(tmp_path / "grid" / "1" / "model.onnx", "cpu", intra_op_threads=1)
    warmed = fixed.warm({"x": np.ones((3, 4), dtype=np.float32)}, max_batch_size=0, repeats=1)
    assert list(warmed) == [0] and warmed[0][0].shape == (3, 2)
    assert fixed.estimate(1) > 0 and [(t.name, t.shape) for t in fixed.outputs] == [("y", [3, 2])]
