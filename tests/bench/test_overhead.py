"""``python -m bench.overhead``: normserve's own CPU per request in-process, every answer a 200, with
onnxruntime run or stubbed out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(repository: Path, *args: str) -> dict:
    argv = [sys.executable, "-m", "bench.overhead", "--repository", str(repository), "--model", "tiny-cnn-bn"]
    done = subprocess.run([*argv, "--connections", "8", "--rounds", "20", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "graceful shutdown exceeded" not in done.stderr  # the stand-in connections end before it
    return dict(json.loads(done.stdout))


def test_it_prices_a_request_with_onnxruntime_run_and_with_it_stubbed(built_repository: Path) -> None:
    run = _run(built_repository, "--encoding", "binary")
    assert run["requests"] == 160 and run["onnxruntime"] == "run" and run["encoding"] == "binary"
    assert run["onnxruntime_us_per_request"] > 0 and run["outside_onnxruntime_us_per_request"] > 0
    assert run["cpu_us_per_request"] >= run["onnxruntime_us_per_request"]
    stubbed = _run(built_repository, "--stub")
    # stubbed, onnxruntime's part is a dictionary lookup: far below normserve's own work
    assert stubbed["onnxruntime"] == "stubbed"
    assert stubbed["onnxruntime_us_per_request"] < 0.2 * stubbed["outside_onnxruntime_us_per_request"]
