"""The models the experiments train, cached on disk, trained two at a time and exported like the served ones.

A ``Run`` is one training: a ``ModelSpec`` (the default model's, or a variant of it) with its seed.
Its checkpoint goes to ``<cache>/runs/<name>/`` through ``models.train.train_model``, the same code
as ``make models``; a run that is exported also goes through ``export.build.export_model`` into
``<cache>/repository``, so its served graph and batch-statistics graph are verified like every
served model's. A rerun trains only what is missing or was made from another spec. Where the
default repository already holds a default model built from the same spec and seed, that model is
used as it is served.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from export.build import BuildOptions, export_checkpoint, up_to_date
from models.cnn import CNNConfig
from models.train import checkpoint_matches, train_model
from models.vit import ViTConfig
from models.zoo import ModelSpec

__all__ = ["Run", "Located", "ensure", "parallel", "shrink"]


@dataclass(frozen=True)
class Run:
    spec: ModelSpec  # spec.name is unique among the runs: it names the folders
    export: bool = False  # also fold, export and verify it into the experiments' repository
    max_steps: int | None = None  # stop early (the smoke settings)

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class Located:
    checkpoint: Path
    version: Path | None  # the exported version folder (model.onnx, batch_stats.onnx, report.json)


def shrink(spec: ModelSpec) -> ModelSpec:
    """The same kind of model, tiny, for a smoke run that takes seconds: no accuracy floor."""
    if isinstance(spec.config, CNNConfig):
        config: CNNConfig | ViTConfig = replace(spec.config, widths=(8, 16), blocks=(1, 1), groups=4)
    else:
        config = replace(spec.config, dim=16, depth=1, heads=2)
    train = replace(spec.train, epochs=1) if spec.train else None
    return replace(spec, config=config, train=train, min_test_accuracy=None)


def _default_location(run: Run, defaults: dict[str, ModelSpec], artifacts: Path, repository: Path) -> Located | None:
    """The served default model, where ``run`` is exactly one of the defaults and it is built and current."""
    if run.max_steps is not None or defaults.get(run.name) != run.spec:
        return None
    checkpoint = artifacts / run.name / "checkpoint.pt"
    if not checkpoint.exists() or not checkpoint_matches(checkpoint, run.spec):
        return None
    if (
        run.export
        and up_to_date(BuildOptions(artifacts=artifacts, repository=repository), run.name, checkpoint) is None
    ):
        return None
    return Located(checkpoint, repository / run.name / "1" if run.export else None)


def _worker_init() -> None:
    torch.set_num_threads(1)  # two single-threaded trainings beat one on two threads for models this small


def _train(run: Run, out: Path) -> str:
    train_model(run.spec, out, max_steps=run.max_steps, progress=False)
    return run.name


def _export(run: Run, checkpoint: Path, repository: Path) -> str:
    export_checkpoint(checkpoint, repository)
    return run.name


def ensure(
    runs: Iterable[Run],
    cache: Path,
    *,
    defaults: dict[str, ModelSpec] | None = None,
    artifacts: Path = Path("artifacts"),
    repository: Path = Path("model_repository"),
    jobs: int = 2,
) -> dict[str, Located]:
    """Train and export what ``runs`` lack, ``jobs`` at a time; return where each run's files are."""
    runs = list(runs)
    if len({r.name for r in runs}) != len(runs):
        raise ValueError("two runs share a name; each run needs its own spec name")
    located: dict[str, Located] = {}
    to_train, to_export = [], []
    for run in runs:
        if defaults and (found := _default_location(run, defaults, artifacts, repository)):
            located[run.name] = found
            continue
        checkpoint = cache / "runs" / run.name / "checkpoint.pt"
        version = cache / "repository" / run.name / "1" if run.export else None
        located[run.name] = Located(checkpoint, version)
        if not checkpoint.exists() or not checkpoint_matches(checkpoint, run.spec):
            to_train.append(run)
        if run.export and (
            run in to_train or up_to_date(BuildOptions(repository=cache / "repository"), run.name, checkpoint) is None
        ):
            to_export.append(run)
    if not to_train and not to_export:
        return located
    jobs = max(1, min(jobs, os.cpu_count() or 1))
    if jobs == 1:  # in this process: no workers to start
        for run in tqdm(to_train, desc="experiments: train", unit="model"):
            _train(run, located[run.name].checkpoint.parent)
        for run in tqdm(to_export, desc="experiments: export", unit="model"):
            _export(run, located[run.name].checkpoint, cache / "repository")
        return located
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
        _drain(pool, [(_train, r, located[r.name].checkpoint.parent) for r in to_train], "train", len(to_train))
        exports = [(_export, r, located[r.name].checkpoint, cache / "repository") for r in to_export]
        _drain(pool, exports, "export", len(to_export))
    return located


def _drain(pool: ProcessPoolExecutor, tasks: list[tuple[Any, ...]], what: str, total: int) -> None:
    if not tasks:
        return
    futures = [pool.submit(*task) for task in tasks]
    with tqdm(total=total, desc=f"experiments: {what}", unit="model") as bar:
        for future in as_completed(futures):
            bar.set_postfix_str(future.result())
            bar.update()


def parallel(fn: Any, items: list[Any], *, jobs: int = 2, desc: str = "") -> list[Any]:
    """``[fn(item) for item in items]``, ``jobs`` single-threaded processes at a time, in order, with progress."""
    jobs = max(1, min(jobs, os.cpu_count() or 1, len(items) or 1))
    if jobs == 1:
        return [fn(item) for item in tqdm(items, desc=f"experiments: {desc}", unit="run")]
    results: list[Any] = [None] * len(items)
    with (
        ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_worker_init) as pool,
        tqdm(total=len(items), desc=f"experiments: {desc}", unit="run") as bar,
    ):
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            bar.update()
    return results
