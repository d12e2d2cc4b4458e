"""Write a verified model version into the model repository, atomically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from service.repository import (
    CONFIG_FILE,
    MODEL_FILE,
    REPORT_FILE,
    VERSION_PATTERN,
    ModelConfig,
    ModelVersion,
    VersionReport,
    load_version,
)

__all__ = ["write_version"]


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_version(
    root: Path, config: ModelConfig, version: str, model_bytes: bytes, report: dict[str, Any]
) -> ModelVersion:
    """Write ``config.json`` and ``<version>/{model.onnx, report.json}`` under ``root/<config.name>``.

    The version folder is built beside its final place and renamed into it, so a reader sees the
    old version or the new one, never half of one. The report gets the model's sha256; the written
    version is read back (and its hash checked) before it is returned.
    """
    if not VERSION_PATTERN.match(version):
        raise ValueError(f"version {version!r} is not a positive integer")
    model_dir = Path(root) / config.name
    model_dir.mkdir(parents=True, exist_ok=True)
    report = {**report, "model": config.name, "version": version, "sha256": hashlib.sha256(model_bytes).hexdigest()}
    VersionReport.model_validate(report)

    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".{version}.new-"))
    staging.chmod(0o755)  # mkdtemp makes it private; a server running as another user must read it
    try:
        (staging / MODEL_FILE).write_bytes(model_bytes)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2))
        _write_text_atomic(model_dir / CONFIG_FILE, config.model_dump_json(indent=2))
        final = model_dir / version
        if final.exists():
            old = model_dir / f".{version}.old-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            staging.rename(final)
            shutil.rmtree(old)
        else:
            staging.rename(final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return load_version(model_dir, version, config)
