"""Write a verified model version into the model repository, whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from repository.read import list_versions, load_config, load_version, sha256_bytes
from repository.schema import (
    CONFIG_FILE,
    MODEL_FILE,
    REPORT_FILE,
    VERSION_PATTERN,
    ModelConfig,
    ModelVersion,
    RepositoryError,
    VersionReport,
)

__all__ = ["write_version"]


def _write_durably(path: Path, data: bytes, mode: int = 0o644) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    path.chmod(mode)


def _write_config(model_dir: Path, config: ModelConfig, version: str) -> None:
    """Write config.json atomically; refuse to change the tensor contract that other versions rely on."""
    others = [v for v in list_versions(model_dir) if v != version]
    if others and (model_dir / CONFIG_FILE).exists():
        try:
            old = load_config(model_dir)
        except RepositoryError:
            old = None
        contract = ("inputs", "outputs", "max_batch_size")
        if old is not None and old.model_dump(include=set(contract)) != config.model_dump(include=set(contract)):
            raise ValueError(
                f"{config.name}: the new version changes {', '.join(contract)}, which version(s) {others} "
                "are served with; export it under a new model name, or remove the other versions first"
            )
    staging = model_dir / f".{CONFIG_FILE}.{uuid.uuid4().hex[:8]}"
    _write_durably(staging, config.model_dump_json(indent=2).encode())
    os.replace(staging, model_dir / CONFIG_FILE)


def write_version(
    root: Path,
    config: ModelConfig,
    version: str,
    model_bytes: bytes,
    report: dict[str, Any],
    files: dict[str, bytes] | None = None,
) -> ModelVersion:
    """Write ``config.json`` and ``<version>/{model.onnx, report.json}`` under ``root/<config.name>``,
    with ``files`` (name -> bytes, e.g. the batch-statistics graph) beside model.onnx.

    The version folder is written and synced beside its final place, then renamed into it: a new
    version appears whole or not at all. Replacing an existing version renames the old one away
    first (restored if the second rename fails), so for that instant the version is absent, never
    half-written. The report gets the sha256 of model.onnx and of every other file, and the written
    version is read back (its hashes checked) before it is returned.

    Raises:
        ValueError: ``version`` is not a positive integer, or the config changes the inputs,
            outputs or max batch size while other versions of the model exist.
    """
    if not VERSION_PATTERN.match(version):
        raise ValueError(f"version {version!r} is not a positive integer")
    model_dir = Path(root) / config.name
    model_dir.mkdir(parents=True, exist_ok=True)
    files = files or {}
    reserved = {MODEL_FILE, REPORT_FILE, CONFIG_FILE} & set(files)
    if reserved:
        raise ValueError(f"extra files may not be named {sorted(reserved)}; the repository writes those itself")
    report = {
        **report,
        "model": config.name,
        "version": version,
        "sha256": sha256_bytes(model_bytes),
        "files": {name: sha256_bytes(data) for name, data in files.items()},
    }
    VersionReport.model_validate(report)

    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".{version}.new-"))
    staging.chmod(0o755)  # mkdtemp makes it private; a server running as another user must read it
    try:
        _write_durably(staging / MODEL_FILE, model_bytes)
        for name, data in files.items():
            _write_durably(staging / name, data)
        _write_durably(staging / REPORT_FILE, json.dumps(report, indent=2).encode())
        _write_config(model_dir, config, version)
        final = model_dir / version
        if final.exists():
            old = model_dir / f".{version}.old-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            try:
                staging.rename(final)
            except OSError:
                old.rename(final)
                raise
            shutil.rmtree(old)
        else:
            staging.rename(final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return load_version(model_dir, version, config)
