"""docker/deps.py: what each image installs, read from pyproject.toml and pinned by requirements.lock."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docker"))
from deps import requirements  # noqa: E402


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        name, _, version = line.partition("==")
        pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[\[=<>~!]", requirement)[0]).lower()


def test_the_cpu_image_gets_onnxruntimes_cpu_build_and_no_torch() -> None:
    cpu = requirements(["cpu"])
    names = [_name(r) for r in cpu]
    assert "onnxruntime==1.31.1" in cpu and "onnxruntime-gpu" not in names and "torch" not in names
    assert {"fastapi", "uvicorn", "numpy", "prometheus-client"} <= set(names)


def test_the_gpu_image_gets_the_cuda_and_cudnn_wheels() -> None:
    gpu = requirements(["gpu"])
    assert "onnxruntime-gpu[cuda,cudnn]==1.31.1" in gpu and "onnxruntime" not in [_name(r) for r in gpu]


def test_every_requirement_is_pinned_as_the_lock_pins_it() -> None:
    lock = _lock()
    for requirement in requirements(["cpu", "train"]) + requirements(["gpu"]):
        name, version = _name(requirement), requirement.rpartition("==")[2]
        assert "==" in requirement, f"{requirement} is not pinned"
        if name in lock:
            assert lock[name] == version, f"{requirement}: requirements.lock pins {lock[name]}"


def test_an_unknown_group_is_refused_by_the_command() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "docker" / "deps.py"), "cuda"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown dependency group(s) ['cuda']" in result.stderr
    with pytest.raises(ValueError, match="pyproject.toml has"):
        requirements(["nope"])
